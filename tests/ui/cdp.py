"""A small Chrome DevTools Protocol client for the browser tests, over --remote-debugging-pipe.

Chromium reads commands from fd 3 and writes replies and events to fd 4, each a JSON message
ended by a NUL byte: no port, no websocket library. A reader thread files replies by id and
keeps every event; the page's console errors, uncaught exceptions and failed loads are
collected in `problems` (the tests fail on any).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class CDPError(RuntimeError):
    pass


def _high(*fds: int) -> tuple[int, ...]:
    """The fds moved to numbers >= 10, so `3<&N 4>&M` cannot clobber one of them (bash: dash takes one-digit fds only)."""
    import fcntl

    moved = []
    for fd in fds:
        moved.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return tuple(moved)


class Browser:
    """One headless Chromium with one page (a flattened session on a new target)."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900, log: Path | None = None):
        cmd_r, cmd_w = _high(*os.pipe())  # we write, Chromium reads (its fd 3)
        out_r, out_w = _high(*os.pipe())  # Chromium writes (its fd 4), we read
        flags = ["--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                 "--disable-sync", "--disable-component-update", "--mute-audio", "--hide-scrollbars",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        script = f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'
        self.log = open(log or os.devnull, "ab")
        self.proc = subprocess.Popen(["bash", "-c", script, CHROMIUM, *flags], pass_fds=(cmd_r, out_w),
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        os.close(cmd_r)
        os.close(out_w)
        self.wfd, self.rfd = cmd_w, out_r
        self.next_id = 0
        self.replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self.problems: list[str] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=True)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = os.read(self.rfd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                with self.cond:
                    self.cond.notify_all()
                return
            buf += data
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self.cond:
                    if "id" in msg:
                        self.replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                        self._note(msg)
                    self.cond.notify_all()

    def _note(self, msg: dict) -> None:
        """Record what counts as a page error: console.error/assert, uncaught exceptions, error log
        entries (failed loads, CSP violations, 4xx/5xx answers), and failed requests."""
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.problems.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.problems.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.problems.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            self.problems.append(f"request failed: {params.get('errorText')} ({params.get('type')})")

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 60) -> dict:
        with self.cond:
            self.next_id += 1
            mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self.wfd, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        with self.cond:
            while mid not in self.replies:
                if self.proc.poll() is not None:
                    raise CDPError(f"chromium exited with code {self.proc.returncode}")
                if not self.cond.wait(max(0.0, deadline - time.time())) and time.time() >= deadline:
                    raise CDPError(f"{method}: no reply within {timeout} s")
            reply = self.replies.pop(mid)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def eval(self, expression: str, timeout: float = 60):
        """The value of a JS expression (awaited if it is a promise); a thrown error raises CDPError."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                           session=True, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(f"{expression[:80]}: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def goto(self, url: str, timeout: float = 30) -> None:
        """Load url (a change of the #fragment only navigates within the document)."""
        start = len(self.events)
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_event(("Page.loadEventFired", "Page.navigatedWithinDocument"), start, timeout)

    def wait_event(self, methods: str | tuple[str, ...], start: int = 0, timeout: float = 30) -> dict:
        methods = (methods,) if isinstance(methods, str) else methods
        deadline = time.time() + timeout
        with self.cond:
            while True:
                for ev in self.events[start:]:
                    if ev.get("method") in methods:
                        return ev
                if time.time() >= deadline:
                    raise CDPError(f"none of {methods} within {timeout} s")
                self.cond.wait(max(0.0, deadline - time.time()))

    def wait(self, expression: str, timeout: float = 120, poll: float = 0.1):
        """Poll a JS expression until it is truthy (an element counts; an expression that throws,
        e.g. on an element not drawn yet, counts as not yet); returns its value. The default timeout
        is long because it costs nothing when the page is quick: on a loaded machine the studio's
        first imports (torch, for a stage's config) can take a minute."""
        deadline = time.time() + timeout
        last = None
        while True:
            try:
                value = self.eval(f"(() => {{ const v = ({expression}); return v instanceof Node ? true : v; }})()")
            except CDPError as exc:
                if self.proc.poll() is not None:
                    raise
                value, last = None, exc
            if value:
                return value
            if time.time() >= deadline:
                raise CDPError(f"timed out after {timeout} s waiting for: {expression}" + (f" (last: {last})" if last else ""))
            time.sleep(poll)

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params = {"format": "png"}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics", session=True)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": size["width"],
                                                              "height": min(size["height"], 4000), "scale": 1})
        data = self.call("Page.captureScreenshot", params, session=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.wfd, self.rfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()
