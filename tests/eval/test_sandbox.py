"""The sandbox contains each threat; parametrised over the audit-hook guard so the OS layers
are shown to hold on their own (as root, where every layer is available)."""

from __future__ import annotations

import os
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest

from posttrain.eval.sandbox import SandboxLimits, run_many, run_python, session_pids, uid_pids

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")
ROOT = os.geteuid() == 0
GUARD = pytest.mark.parametrize("guard", [True, False], ids=["guard", "os-only"])


def assert_no_strays(result) -> None:
    """Nothing of the run survives: not in its session, not under its uid."""
    assert session_pids(result.pid) == []
    if result.uid is not None:
        assert uid_pids(result.uid) == []


def test_correct_solution_passes_and_can_use_its_temp_dir():
    r = run_python("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\nassert 1 + 1 == 2\n")
    assert r.status == "passed" and r.passed and r.returncode == 0
    assert r.stdout.strip() == "ok"
    if ROOT:
        assert {"netns", "readonly-mounts", "rlimits", "uid", "guard"} <= set(r.layers)
        assert r.uid is not None and r.uid != 0


def test_wrong_solution_fails_with_the_reason():
    r = run_python("def add(a, b):\n    return a - b\nassert add(2, 2) == 4, 'add is wrong'\n")
    assert r.status == "failed" and not r.passed
    assert r.reason == "AssertionError: add is wrong"
    assert r.returncode == 1


@GUARD
def test_infinite_loop_times_out_promptly(guard):
    start = time.monotonic()
    r = run_python("while True:\n    pass\n", SandboxLimits(timeout=1.0), guard=guard)
    assert r.status == "timeout" and "1 s" in r.reason
    assert time.monotonic() - start < 1.0 + 2.0
    assert_no_strays(r)


@GUARD
def test_fork_bomb_is_contained_and_leaves_nothing(guard):
    # children leave the session (setsid), so only the kill-by-uid catches them
    bomb = ("import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
            "    except Exception:\n        pass\n")
    start = time.monotonic()
    r = run_python(bomb, SandboxLimits(timeout=1.5), guard=guard)
    assert time.monotonic() - start < 1.5 + 3.0
    assert not r.passed
    assert_no_strays(r)


@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC per run needs the run's own uid (root only)")
def test_process_limit_binds_without_the_guard():
    prog = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e.errno)\n")
    r = run_python(prog, SandboxLimits(timeout=5, max_processes=8), guard=False)
    n, errno = map(int, r.stdout.split())
    assert n == 7 and errno == 11  # 8 processes in all, then EAGAIN
    assert_no_strays(r)


@pytest.fixture
def outside_dirs():
    """Directories outside the sandbox: root-owned 0755, world-writable 1777, and the caller's home."""
    made = [Path(tempfile.mkdtemp(prefix="sbx-outside-")) for _ in range(2)]
    made[0].chmod(0o755)
    made[1].chmod(0o1777)
    yield made
    for d in made:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


@GUARD
def test_writes_outside_the_temp_dir_do_not_happen(guard, outside_dirs):
    home = Path(os.path.expanduser("~"))
    targets = [outside_dirs[0] / "evil.txt", outside_dirs[1] / "evil.txt", home / f"sbx-evil-{os.getpid()}.txt"]
    for target in targets:
        r = run_python(f"open({str(target)!r}, 'w').write('pwned')\n", guard=guard)
        assert r.status == "failed", (target, r)
        assert "PermissionError" in r.reason or "Read-only file system" in r.reason or "Permission denied" in r.reason
        assert not target.exists(), target
    # other ways of writing: os.open, rename out of the temp dir, mkdir
    prog = (f"import os\nfd = os.open('x', os.O_WRONLY | os.O_CREAT)\nos.close(fd)\n"
            f"os.rename('x', {str(outside_dirs[1] / 'moved')!r})\n")
    r = run_python(prog, guard=guard)
    assert r.status == "failed" and not (outside_dirs[1] / "moved").exists()
    r = run_python(f"import os\nos.mkdir({str(outside_dirs[1] / 'd')!r})\n", guard=guard)
    assert r.status == "failed" and not (outside_dirs[1] / "d").exists()
    assert stat.S_IMODE(outside_dirs[0].stat().st_mode) == 0o755


@GUARD
def test_network_is_cut(guard):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        prog = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
        r = run_python(prog, guard=guard)
        assert r.status == "failed" and "connected" not in r.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody reached the listener


@GUARD
@pytest.mark.parametrize("hog", ["x = bytearray(8 * 1024 ** 3)\n",
                                 "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 ** 2))\n"])
def test_memory_hog_fails(guard, hog):
    r = run_python(hog, SandboxLimits(timeout=5, memory_mb=512), guard=guard)
    assert r.status in ("failed", "killed")
    assert r.status == "killed" or "MemoryError" in r.reason
    assert_no_strays(r)


def test_output_is_bounded_and_limits_are_checked():
    r = run_python("print('x' * 200_000)\n", SandboxLimits(output_bytes=1000))
    assert r.passed and len(r.stdout) < 1100 and r.stdout.startswith("[")
    with pytest.raises(ValueError, match="timeout"):
        SandboxLimits(timeout=0)


def test_run_many_keeps_order():
    results = run_many([f"print({i})" if i != 2 else "raise SystemExit(3)" for i in range(5)], workers=2)
    assert [r.status for r in results] == ["passed", "passed", "failed", "passed", "passed"]
    assert [r.stdout.strip() for r in results] == ["0", "1", "", "3", "4"]
    assert results[2].reason == "exit code 3"
