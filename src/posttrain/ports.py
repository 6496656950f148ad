"""A TCP port that is free now, for the servers and process groups posttrain starts itself."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now ("" = every interface, for a process group other
    hosts join). Another process may still take it before the caller binds it: callers retry or fail loudly."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
