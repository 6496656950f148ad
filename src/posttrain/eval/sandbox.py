"""Run untrusted Python (model-written code) in a contained subprocess.

Each run is a fresh `python -I -B` in a new session, with a new temporary directory as its
cwd and HOME, a minimal environment, and stdout/stderr going to files the parent reads
back (bounded). A small trusted bootstrap sets up the containment, then execs the program
in-process. The layers, and what each one stops:

| threat                      | OS layer (Linux)                                   | in-process guard (audit hook)      |
|-----------------------------|----------------------------------------------------|------------------------------------|
| infinite loop               | wall-clock timeout -> SIGKILL of the whole sandbox; RLIMIT_CPU | -                      |
| memory hog                  | RLIMIT_AS (MemoryError, or the kernel kills it)    | -                                  |
| fork bomb / stray processes | RLIMIT_NPROC, binding because the code runs as a  | os.fork, subprocess, os.system,    |
|                             | non-root uid of its own; afterwards every process  | exec, spawn refused                |
|                             | of that uid is killed (also ones that left the     |                                    |
|                             | session); process group kill when not root         |                                    |
| writes outside the temp dir | runs as an unprivileged uid (root-owned dirs,     | open-for-write / remove / rename / |
|                             | home); a private mount namespace in which every    | mkdir / chmod outside it refused   |
|                             | mount but the temp dir is read-only (/tmp too)     |                                    |
| network                     | a new, empty network namespace (no interface up,  | socket creation refused            |
|                             | so 127.0.0.1 is unreachable)                       |                                    |
| huge output / files         | RLIMIT_FSIZE; output read back up to a bound      | -                                  |

As root (here and in CI) every OS layer is on: the bootstrap unshares the network and
mount namespaces, remounts everything read-only except the temp dir, sets the limits, then
drops to a uid/gid of its own (a slot from `UID_BASE`, claimed with a lock file so
concurrent runs never share a uid). As a normal user, only what the kernel allows is on:
a user+network namespace when unprivileged user namespaces are enabled, the rlimits
(RLIMIT_NPROC then counts all of the user's processes), the process-group kill and the
guard; `SandboxResult.layers` says which layers were active. The non-root path is not
exercised by the tests here (they run as root).

NOT guaranteed: this is a harness for scoring model-written code, not a security boundary
against a determined attacker. The code can read whatever its uid may read (world-readable
files), use CPU up to the limits, and the audit hook can be bypassed by code that goes
through ctypes/native extensions (the hook refuses the obvious ctypes entry points, which
is not a proof). For hostile code use a container, gVisor or a VM.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

STATUSES = ("passed", "failed", "timeout", "killed")
UID_BASE = 1_600_000  # sandbox uids/gids: UID_BASE + slot; no passwd entry needed
UID_SLOTS = 64
LOCK_DIR = Path(tempfile.gettempdir()) / "posttrain-sandbox-locks"
_SETUP_FAILED = 71  # bootstrap exit code when containment could not be set up


@dataclass
class SandboxLimits:
    """Per-run limits. memory_mb caps the address space (RLIMIT_AS), not resident memory."""

    timeout: float = 5.0
    memory_mb: int = 1024
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    output_bytes: int = 16_384  # of stdout and of stderr kept in the result

    def __post_init__(self) -> None:
        for name in ("timeout", "memory_mb", "max_processes", "max_file_mb", "max_open_files", "output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")


@dataclass
class SandboxResult:
    """status: passed (exit 0), failed (non-zero exit; reason = last stderr line), timeout
    (no exit within the wall-clock limit), killed (ended by a signal, e.g. the CPU limit)."""

    status: str
    reason: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    pid: int
    uid: int | None  # the uid the code ran as (None: not root, ran as the caller)
    layers: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------ the bootstrap
# Runs in the child before the untrusted program (argv[1]: JSON config). Trusted code:
# it must set up every layer or exit with _SETUP_FAILED so the parent raises instead of
# scoring a broken harness as "the model failed".

_BOOTSTRAP = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
work = cfg["work"]
layers = []
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
NEWNS, NEWUSER, NEWNET = 0x00020000, 0x10000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, NOATIME, NODIRATIME, BIND, REC, PRIVATE, RELATIME = (
    1, 2, 4, 8, 32, 1024, 2048, 4096, 16384, 1 << 18, 1 << 21)

def fail(msg):
    sys.stderr.write("sandbox setup failed: " + msg + "\n")
    os._exit(%(setup_failed)d)

def mount(src, target, flags, fstype=None, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        return os.strerror(ctypes.get_errno()) + " (" + str(target) + ")"
    return None

def expose_interpreter():
    """The interpreter's files under a directory others cannot enter (pyenv under /root, mode
    0700): a tmpfs over that directory with only the needed entries bound back (ro later)."""
    needs = {}
    for path in {os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, *sys.path] if p}:
        parts = path.split("/")
        for i in range(2, len(parts)):
            parent = "/".join(parts[:i])
            if not os.stat(parent).st_mode & 0o001:
                needs.setdefault(parent, set()).add(parts[i])
                break
    for parent, names in needs.items():
        fds = {n: os.open(parent + "/" + n, os.O_PATH) for n in names if os.path.lexists(parent + "/" + n)}
        err = mount("tmpfs", parent, NOSUID | NODEV, "tmpfs", "mode=0755")
        for name, fd in fds.items():
            target = parent + "/" + name
            if os.path.isdir("/proc/self/fd/%%d" %% fd):
                os.mkdir(target)
            else:
                open(target, "w").close()
            err = err or mount("/proc/self/fd/%%d" %% fd, target, BIND | REC)
            os.close(fd)
        if err:
            fail("exposing the interpreter: " + err)

def readonly_view():
    """Private mount namespace: every mount read-only except the temp dir (bound onto itself)."""
    err = mount(None, "/", REC | PRIVATE)
    expose_interpreter()
    err = err or mount(work, work, BIND)
    if err:
        fail("mount namespace: " + err)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = parts[4].encode().decode("unicode_escape")
            opts = parts[5].split(",")
            bits = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC, "noatime": NOATIME,
                    "nodiratime": NODIRATIME, "relatime": RELATIME}
            points.append((point, sum(v for k, v in bits.items() if k in opts)))
    failed = []
    for point, keep in points:
        if point != work and mount(None, point, BIND | REMOUNT | RDONLY | keep):
            failed.append(point)
    probe = os.path.join(os.path.dirname(work), ".sandbox-probe-%%d" %% os.getpid())
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
        fail("the directory above the temp dir is still writable after the read-only remount (%%s)" %% failed)
    except OSError:
        pass
    layers.append("readonly-mounts")

if cfg["uid"] is not None:  # root: namespaces, then drop to the run's own uid
    if libc.unshare(NEWNET | NEWNS) != 0:
        fail("unshare(CLONE_NEWNET|CLONE_NEWNS): " + os.strerror(ctypes.get_errno()))
    layers.append("netns")
    readonly_view()
elif libc.unshare(NEWUSER | NEWNET) == 0:
    layers.append("netns")
with open(cfg["program"]) as f:
    source = f.read()
lim = cfg["limits"]
for name, value in (("RLIMIT_AS", lim["memory_mb"] << 20), ("RLIMIT_CPU", lim["cpu_s"]),
                    ("RLIMIT_NPROC", lim["max_processes"]), ("RLIMIT_FSIZE", lim["max_file_mb"] << 20),
                    ("RLIMIT_NOFILE", lim["max_open_files"]), ("RLIMIT_CORE", 0)):
    hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL a second later
    resource.setrlimit(getattr(resource, name), (value, hard))
layers.append("rlimits")
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    if os.getuid() != cfg["uid"] or os.geteuid() != cfg["uid"]:
        fail("could not drop privileges")
    try:
        os.listdir(os.path.dirname(os.__file__))
    except OSError as exc:
        fail("the standard library is not readable by the sandbox uid: %%s" %% exc)
    layers.append("uid")
os.chdir(work)
os.umask(0o077)
if cfg["guard"]:
    def install_guard(work=work):
        realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                       "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
        refused = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "os.fork",
                   "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec", "subprocess.Popen",
                   "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "sys.addaudithook"}

        def inside(p):
            try:
                p = realpath(fsdecode(p))
            except (TypeError, ValueError):
                return False
            return p == work or p.startswith(work + sep)

        def hook(event, args):
            if event in refused:
                raise PermissionError("sandbox: " + event + " is not allowed")
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None))[:3]
                writing = (isinstance(flags, int) and flags & writes) or (
                    isinstance(mode, str) and any(c in mode for c in "wax+"))
                if writing and isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError("sandbox: writing outside the temp dir is not allowed: %%r" %% (path,))
            elif event in path_events:
                for a in args:
                    if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                        raise PermissionError("sandbox: %%s outside the temp dir is not allowed: %%r" %% (event, a))
        sys.addaudithook(hook)
    install_guard()
    layers.append("guard")
os.write(cfg["report_fd"], json.dumps(layers).encode())
os.close(cfg["report_fd"])
sys.argv = ["program.py"]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
''' % {"setup_failed": _SETUP_FAILED}


# ------------------------------------------------------------------------ uids and processes

def _pids(match: Callable[[dict[str, str]], bool], zombies: bool = False) -> list[int]:
    """Pids of processes (zombies only if asked) whose /proc/PID/status fields satisfy `match`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # gone meanwhile
        if (zombies or fields.get("State", "").split()[:1] != ["Z"]) and match(fields):
            pids.append(int(name))
    return pids


def uid_pids(uid: int, zombies: bool = False) -> list[int]:
    """Processes whose real uid is `uid` (live ones; with zombies=True also the unreaped dead)."""
    return _pids(lambda f: int(f["Uid"].split()[0]) == uid, zombies)


def session_pids(sid: int) -> list[int]:
    """Live processes in session `sid` (the sandbox's session id is its first pid)."""
    out = []
    for pid in _pids(lambda f: True):
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except OSError:
            pass
    return out


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`, including ones that left the session: kill(-1) sent
    *as* that uid reaches exactly its processes, and the kernel blocks forks while it runs."""
    for _ in range(20):
        if not uid_pids(uid):
            return
        subprocess.run(["/bin/sh", "-c", "kill -9 -1 2>/dev/null; exit 0"],
                       user=uid, group=uid, extra_groups=[], env={}, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", timeout=30)
        time.sleep(0.01)
    left = uid_pids(uid)
    if left:
        raise RuntimeError(f"sandbox uid {uid}: processes {left} survived SIGKILL")


_next_slot = itertools.count()


class _UidSlot:
    """A sandbox uid held for one run: an exclusive flock on LOCK_DIR/uid-N.lock, so runs in
    other threads or processes never share a uid (kill-by-uid and RLIMIT_NPROC rely on it).

    Slots rotate, and one with zombies left is passed over for up to `patience` seconds: killed
    processes are reaped by init (here after ~1.6 s), and until then they count against the
    next run's RLIMIT_NPROC."""

    def __init__(self, patience: float = 3.0):
        self.patience = patience

    def __enter__(self) -> int:
        LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        deadline = time.monotonic() + self.patience
        while True:
            for _ in range(UID_SLOTS):
                uid = UID_BASE + next(_next_slot) % UID_SLOTS
                fd = os.open(LOCK_DIR / f"uid-{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                _kill_uid(uid)  # leftovers of a crashed earlier run
                if not uid_pids(uid, zombies=True) or time.monotonic() > deadline:
                    self.fd, self.uid = fd, uid
                    return uid
                os.close(fd)
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


class _NoSlot:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        pass


# ------------------------------------------------------------------------ running

def _tail(path: Path, limit: int) -> str:
    """The last `limit` bytes of a file (a traceback's verdict is at the end)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        data = f.read(limit)
    text = data.decode("utf-8", "replace")
    return text if size <= limit else f"[{size - limit} bytes cut]\n" + text


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else ""


def run_python(program: str, limits: SandboxLimits | None = None, guard: bool = True) -> SandboxResult:
    """Run `program` (Python source) in the sandbox and say how it ended.

    guard=False leaves out the in-process audit hook, so tests can show that the OS layers
    alone contain each threat. Raises RuntimeError when the containment itself could not be
    set up (never scored as a failure of the program).
    """
    if not sys.platform.startswith("linux"):
        raise RuntimeError("the sandbox needs Linux (namespaces, /proc, rlimits)")
    limits = limits or SandboxLimits()
    root = os.geteuid() == 0
    private = Path(tempfile.mkdtemp(prefix="posttrain-sbx-out-"))  # parent-only: outputs, program
    work = Path(tempfile.mkdtemp(prefix="posttrain-sbx-")).resolve()
    try:
        with (_UidSlot() if root else _NoSlot()) as uid:
            return _run(program, limits, guard, uid, private, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def _run(program: str, limits: SandboxLimits, guard: bool, uid: int | None, private: Path,
         work: Path) -> SandboxResult:
    prog = private / "program.py"
    prog.write_text(program, encoding="utf-8")  # read by the bootstrap before it drops privileges
    if uid is not None:
        os.chown(work, uid, uid)
    read_end, write_end = os.pipe()
    config = {"work": str(work), "program": str(prog), "uid": uid, "guard": guard, "report_fd": write_end,
              "limits": {"memory_mb": limits.memory_mb, "cpu_s": math.ceil(limits.timeout) + 1,
                         "max_processes": limits.max_processes, "max_file_mb": limits.max_file_mb,
                         "max_open_files": limits.max_open_files}}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
    start = time.monotonic()
    with open(private / "stdout", "wb") as out, open(private / "stderr", "wb") as err:
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _BOOTSTRAP, json.dumps(config)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work, env=env,
                                    start_new_session=True, pass_fds=(write_end,))
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
    timed_out = False
    try:
        rc = proc.wait(timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # the whole sandbox goes, however the program ended: its group, then its uid
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rc = proc.wait()
        if uid is not None:
            _kill_uid(uid)
    seconds = time.monotonic() - start
    os.set_blocking(read_end, False)
    try:
        report = os.read(read_end, 65536)
    except BlockingIOError:
        report = b""
    finally:
        os.close(read_end)
    stdout = _tail(private / "stdout", limits.output_bytes)
    stderr = _tail(private / "stderr", limits.output_bytes)
    if rc == _SETUP_FAILED and not report:
        raise RuntimeError(f"sandbox setup failed: {stderr.strip()}")
    if not report and not timed_out:
        raise RuntimeError(f"the sandbox bootstrap ended (exit {rc}) before running the program: {stderr.strip()}")
    layers = json.loads(report) if report else []
    if timed_out:
        status, reason = "timeout", f"no exit within {limits.timeout:g} s; killed"
    elif rc == 0:
        status, reason = "passed", ""
    elif rc < 0:
        sig = signal.Signals(-rc).name
        why = {"SIGXCPU": "CPU time limit", "SIGKILL": "killed (CPU or memory limit)",
               "SIGSEGV": "segmentation fault"}.get(sig, sig)
        status, reason = "killed", f"{sig}: {why}"
    else:
        status, reason = "failed", _last_line(stderr) or f"exit code {rc}"
    return SandboxResult(status=status, reason=reason, returncode=None if timed_out else rc, stdout=stdout,
                         stderr=stderr, seconds=round(seconds, 3), pid=proc.pid, uid=uid, layers=layers)


def run_many(programs: Sequence[str], limits: SandboxLimits | None = None, workers: int | None = None,
             guard: bool = True, progress: Callable[[int], None] | None = None) -> list[SandboxResult]:
    """run_python over many programs, `workers` at a time (default: the CPU count), in order."""
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def one(program: str) -> SandboxResult:
        result = run_python(program, limits, guard)
        if progress is not None:
            progress(1)
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))
