"""A real browser for the HTML tests: headless Chromium over the DevTools protocol.

The protocol runs on a pipe (`--remote-debugging-pipe`: the browser reads commands on
its fd 3 and writes replies and events on its fd 4, each message JSON ended by a NUL
byte), so no port and no websocket library are needed. A page is opened from the file
system with host resolution switched off; what it logs, throws and requests is
collected, and a full-page screenshot is saved.

Which browser: $SAESWEEP_BROWSER when it names an executable, else `chromium` (Debian),
`chromium-browser` or `google-chrome` on PATH. Tests skip when there is none and
$SAESWEEP_BROWSER is unset; when it is set (CI sets it), a missing browser fails them.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing outside the file can load
    "--window-size=1400,1000",
    "--remote-debugging-pipe",
)


def find_browser() -> str | None:
    chosen = os.environ.get("SAESWEEP_BROWSER", "")
    if chosen and shutil.which(chosen):
        return shutil.which(chosen)
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def browser_or_skip() -> str:
    path = find_browser()
    if path is None:
        if os.environ.get("SAESWEEP_BROWSER"):
            pytest.fail(f"SAESWEEP_BROWSER is set but no browser found (tried it and {', '.join(NAMES)} on PATH)")
        pytest.skip("no chromium on PATH (apt-get install -y chromium; set SAESWEEP_BROWSER to require it)")
    return path


@dataclass
class PageReport:
    errors: list[str] = field(default_factory=list)  # exceptions, console.error/assert, error log entries
    console: list[str] = field(default_factory=list)  # every console message, as "type: text"
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    value: Any = None  # the `probe` expression's value once the page was ready


class _Pipe:
    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int):
        self.proc, self.out, self.inp = proc, to_browser, from_browser
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        return self.next_id

    def receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the browser did not answer in time")
            ready, _, _ = select.select([self.inp], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.inp, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"the browser closed the pipe (exit code {self.proc.poll()})")
                self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> Any:
        """Send a command and return its result; events that arrive meanwhile are kept."""
        wanted = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)


def _collect(event: dict[str, Any], report: PageReport) -> None:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        text = details.get("exception", {}).get("description") or details.get("text", "")
        report.errors.append(f"exception: {text}")
    elif method == "Runtime.consoleAPICalled":
        text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
        report.console.append(f"{params.get('type')}: {text}")
        if params.get("type") in ("error", "assert"):
            report.errors.append(f"console.{params.get('type')}: {text}")
    elif method == "Log.entryAdded":
        entry = params.get("entry", {})
        if entry.get("level") == "error":
            report.errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
    elif method == "Network.requestWillBeSent":
        report.requests.append(params.get("request", {}).get("url", ""))


def open_page(
    browser: str, page: Path, screenshot: Path, ready: str = "true", probe: str = "null", timeout: float = 120
) -> PageReport:
    """Load `page`, wait until the JS expression `ready` is true, evaluate `probe`, save a
    full-page PNG to `screenshot`; everything the page logged or threw is in the report."""
    report = PageReport()
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def give_fds() -> None:  # the browser expects its ends at fds 3 and 4 exactly
        a, b = os.dup(to_browser_r), os.dup(from_browser_w)
        os.dup2(a, 3)
        os.dup2(b, 4)

    with tempfile.TemporaryDirectory(prefix="saesweep-chromium-") as profile:
        proc = subprocess.Popen(
            [browser, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=give_fds,
            pass_fds=(3, 4),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        pipe = _Pipe(proc, to_browser_w, from_browser_r)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            deadline = time.monotonic() + timeout
            while True:
                state = pipe.call(
                    "Runtime.evaluate",
                    {"expression": f"document.readyState === 'complete' && Boolean({ready})", "returnByValue": True},
                    session=session,
                )
                if state.get("result", {}).get("value") is True:
                    break
                if time.monotonic() > deadline:
                    for event in pipe.events:
                        _collect(event, report)
                    raise TimeoutError(f"{page} never became ready ({ready}); errors: {report.errors}")
                time.sleep(0.2)
            report.value = pipe.call("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=session)[
                "result"
            ].get("value")
            size = pipe.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
            shot = pipe.call(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
                },
                session=session,
            )
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            time.sleep(0.2)  # late console messages
            pipe.call("Runtime.evaluate", {"expression": "0"}, session=session)
            for event in pipe.events:
                if event.get("sessionId") == session:
                    _collect(event, report)
            try:
                pipe.call("Browser.close", timeout=10)
            except (RuntimeError, TimeoutError):
                pass
        finally:
            os.close(to_browser_w)
            os.close(from_browser_r)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return report
