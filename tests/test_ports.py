import socket

from posttrain.ports import free_port


def test_the_port_is_free_to_listen_on_at_that_host():
    for host in ("127.0.0.1", ""):
        port = free_port(host)
        assert 0 < port < 65536
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, port))  # raises if something already holds it
            s.listen()
