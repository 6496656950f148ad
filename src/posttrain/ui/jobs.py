"""The subprocesses the studio starts: training runs and pipelines, and chat servers.

Only the project's own verbs run, always as `python -m posttrain.cli VERB ...` with an argument
list built here from fixed parts (a verb from the stage registry, a config file the studio
wrote, `--resume`/`--overwrite`), never a shell, so nothing a page sends can become a command.

A run's process writes its output to RUN_DIR/ui/log.txt; RUN_DIR/ui/job.json (written
atomically) records the command, pid, start, end and exit code, so a restarted studio still
knows what ran and can recognise a run that is still going (each process leads its own session:
stopping it stops its process group). Runs outlive the studio: closing it stops chat servers,
not training.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from posttrain.fileio import write_json_atomic
from posttrain.ports import free_port
from posttrain.ui.runs import JOB_DIR, _read_json

STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long
STATE_DIR = ".posttrain-ui"  # under the root: chat server logs, the default feedback database


def cli_argv(args: list[str], python: str = sys.executable) -> list[str]:
    return [python, "-m", "posttrain.cli", *args]


def _alive(pid: int) -> bool:
    """A process with this pid exists and runs posttrain (not a recycled pid)."""
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"posttrain" in cmdline


class Jobs:
    """One training run or pipeline per run directory, started and stopped from the studio."""

    def __init__(self, root: Path, python: str = sys.executable):
        self.root, self.python = root, python
        self.procs: dict[Path, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def state(self, run_dir: Path) -> dict | None:
        """The run's job record (None if the studio never started it), with `state` current:
        running, done, failed, stopped, or lost (recorded as running, but its process is gone)."""
        job = _read_json(run_dir / JOB_DIR / "job.json")
        if not isinstance(job, dict):
            return None
        if job.get("state") == "running":
            with self.lock:
                proc = self.procs.get(run_dir)
            if proc is None and not _alive(int(job.get("pid", 0))):
                job["state"] = "lost"
        return job

    def running(self, run_dir: Path) -> bool:
        job = self.state(run_dir)
        return job is not None and job["state"] == "running"

    def start(self, run_dir: Path, verb: str, args: list[str]) -> dict:
        """Start `posttrain VERB ARGS` for run_dir, cwd the root; refuses a run dir that is running."""
        if self.running(run_dir):
            raise RuntimeError(f"{run_dir.name} is running; stop it first")
        ui = run_dir / JOB_DIR
        ui.mkdir(parents=True, exist_ok=True)
        command = ["posttrain", verb, *args]
        log = open(ui / "log.txt", "ab")
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(cli_argv([verb, *args], self.python), cwd=self.root, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            log.close()
        job = {"verb": verb, "args": args, "command": " ".join(command), "pid": proc.pid, "started": time.time(),
               "ended": None, "returncode": None, "state": "running"}
        write_json_atomic(ui / "job.json", job)
        with self.lock:
            self.procs[run_dir] = proc
        threading.Thread(target=self._wait, args=(run_dir, proc, job), daemon=True).start()
        return job

    def _wait(self, run_dir: Path, proc: subprocess.Popen, job: dict) -> None:
        code = proc.wait()
        current = _read_json(run_dir / JOB_DIR / "job.json") or job
        stopped = current.get("stop_requested", False)
        job.update(current, ended=time.time(), returncode=code,
                   state="done" if code == 0 else "stopped" if stopped else "failed")
        with open(run_dir / JOB_DIR / "log.txt", "ab") as log:  # before the record: a log reader stops at "not running"
            log.write(f"=== exit code {code}{' (stopped)' if stopped else ''} after "
                      f"{job['ended'] - job['started']:.1f} s\n".encode())
        write_json_atomic(run_dir / JOB_DIR / "job.json", job)
        with self.lock:
            if self.procs.get(run_dir) is proc:
                del self.procs[run_dir]

    def stop(self, run_dir: Path) -> dict:
        """SIGTERM to the run's process group, SIGKILL after STOP_GRACE_S; the job then reads 'stopped'."""
        job = self.state(run_dir)
        if job is None or job["state"] != "running":
            raise RuntimeError(f"{run_dir.name} is not running")
        job["stop_requested"] = True
        write_json_atomic(run_dir / JOB_DIR / "job.json", job)
        pid = int(job["pid"])
        _signal_group(pid, signal.SIGTERM)
        with self.lock:
            proc = self.procs.get(run_dir)
        if proc is None:  # started by an earlier studio: nobody waits for it, so record the end here
            threading.Thread(target=self._reap_foreign, args=(run_dir, pid, job), daemon=True).start()
        else:
            threading.Timer(STOP_GRACE_S, lambda: proc.poll() is None and _signal_group(pid, signal.SIGKILL)).start()
        return job

    def _reap_foreign(self, run_dir: Path, pid: int, job: dict) -> None:
        deadline = time.time() + STOP_GRACE_S
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
        job.update(state="stopped", ended=time.time())
        write_json_atomic(run_dir / JOB_DIR / "job.json", job)

    def wait_all(self, timeout: float = 30) -> None:
        """Wait for the running jobs' processes to end (tests)."""
        deadline = time.time() + timeout
        with self.lock:
            procs = list(self.procs.values())
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def slot_of(spec: str) -> str:
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


class ChatServer:
    def __init__(self, spec: str, slot: str, port: int, proc: subprocess.Popen, log: Path):
        self.spec, self.slot, self.port, self.proc, self.log = spec, slot, port, proc, log
        self.ready = False
        self.used = time.time()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def info(self) -> dict:
        return {"slot": self.slot, "model": self.spec, "ready": self.ready, "pid": self.proc.pid}


class ChatServers:
    """`posttrain serve` subprocesses on free loopback ports, one per model, at most `limit` at once
    (the least recently used stops first). All write to one feedback database, so a choice between
    two models' replies to the same prompt can be recorded (both replies are in it)."""

    def __init__(self, root: Path, feedback_db: str | None, python: str = sys.executable, limit: int = 2,
                 start_timeout: float = 300.0):
        self.root, self.feedback_db, self.python, self.limit = root, feedback_db, python, limit
        self.start_timeout = start_timeout
        self.servers: dict[str, ChatServer] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    def get(self, slot: str) -> ChatServer | None:
        server = self.servers.get(slot)
        if server is not None:
            server.used = time.time()
        return server

    async def ensure(self, spec: str) -> ChatServer:
        """The server of model `spec`, started (and waited for) if it is not running."""
        import httpx

        slot = slot_of(spec)
        lock = self.locks.setdefault(slot, asyncio.Lock())
        async with lock:
            server = self.servers.get(slot)
            if server is not None and server.proc.poll() is None and server.ready:
                server.used = time.time()
                return server
            if server is not None:
                await asyncio.to_thread(self._stop, server)
            while len(self.servers) >= self.limit:
                await asyncio.to_thread(self._stop, min(self.servers.values(), key=lambda s: s.used))
            logs = self.root / STATE_DIR / "chat"
            logs.mkdir(parents=True, exist_ok=True)
            port = free_port()
            args = ["serve", spec, "--host", "127.0.0.1", "--port", str(port), "--name", spec,
                    "--feedback-db", self.feedback_db or "off"]
            log_path = logs / f"{slot}.log"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(cli_argv(args, self.python), cwd=self.root, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
            server = self.servers[slot] = ChatServer(spec, slot, port, proc, log_path)
            deadline = time.time() + self.start_timeout
            async with httpx.AsyncClient(timeout=2.0) as client:
                while time.time() < deadline:
                    if proc.poll() is not None:
                        del self.servers[slot]
                        raise RuntimeError(f"the chat server for {spec} exited with code {proc.returncode}:\n"
                                           + _tail(log_path))
                    try:
                        if (await client.get(server.url + "/health")).status_code == 200:
                            server.ready = True
                            return server
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.3)
            await asyncio.to_thread(self._stop, server)
            raise RuntimeError(f"the chat server for {spec} did not answer within {self.start_timeout:.0f} s:\n"
                               + _tail(log_path))

    def _stop(self, server: ChatServer) -> None:
        self.servers.pop(server.slot, None)
        if server.proc.poll() is None:
            _signal_group(server.proc.pid, signal.SIGTERM)
            try:
                server.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(server.proc.pid, signal.SIGKILL)
                server.proc.wait()

    def close(self) -> None:
        for server in list(self.servers.values()):
            self._stop(server)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
