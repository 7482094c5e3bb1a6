"""Headless Chromium driven over the DevTools protocol, for tests that must see a page as its
reader's browser does: console errors, uncaught exceptions, content-security-policy
violations, whether images decoded, what scripts built, and a screenshot.

``find_chromium()`` looks for Chromium on PATH; where there is none and we are root with
apt-get, it installs Debian's ``chromium`` package (once per session), else it skips the test,
saying why. ``browser()`` starts it headless on a free DevTools port in a temporary profile,
and gives a ``Browser``: one tab, driven through a websocket (the ``websockets`` package).
``serve`` puts a page on 127.0.0.1 with the headers a test names (a content-security policy).
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_TIMEOUT_S = 240
START_TIMEOUT_S = 30
_install_tried: list[str] = []  # the outcome of this session's one apt-get try


def find_chromium() -> str:
    """The path of a Chromium; installs Debian's package once per session where none is on
    PATH and we are root with apt-get; else skips the calling test with the reason."""
    found = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if found:
        return found
    if not _install_tried:
        _install_tried.append(_install_chromium())
    found = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not found:
        pytest.skip(f"no Chromium on PATH ({', '.join(CHROMIUM_NAMES)}): {_install_tried[0]}")
    return found


def _install_chromium() -> str:
    """Install Debian's ``chromium`` (reading the package lists first where the install finds
    none); returns why it could not be, or "" once installed."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root with apt-get, so it was not installed; install chromium to run this"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    for command in (install, ["apt-get", "update"], install):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return f"'{' '.join(command)}' ran out of the {INSTALL_TIMEOUT_S} s given"
        if done.returncode == 0 and command is install:
            return ""
    return f"'{' '.join(command)}' failed: {(done.stdout + done.stderr)[-500:]}"


class Browser:
    """One tab of a headless Chromium, driven through ``socket`` (its DevTools websocket).
    Events of the page are gathered as they come: ``console_errors``, ``exceptions``,
    ``log_entries`` (the browser's own messages, CSP refusals among them) and, from the page's
    ``securitypolicyviolation`` events, ``csp_violations()``."""

    def __init__(self, socket, width: int, height: int):
        self.socket = socket
        self.ids = itertools.count(1)
        self.console_errors: list[str] = []
        self.exceptions: list[str] = []
        self.log_entries: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width,
                  height=height, deviceScaleFactor=1, mobile=False)
        # Gathered by the page itself, since a blocked script may log nothing else.
        self.call("Page.addScriptToEvaluateOnNewDocument", session=True, source=(
            "window.__csp = []; document.addEventListener('securitypolicyviolation', e => "
            "window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"))

    def call(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        """Send one DevTools command and wait for its answer, gathering events meanwhile."""
        message = {"id": next(self.ids), "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self._event(reply)

    def _event(self, event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.console_errors.append(" ".join(str(a.get("value", a.get("description")))
                                                for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.exceptions.append(details.get("exception", {}).get("description")
                                   or details["text"])
        elif method == "Log.entryAdded":
            self.log_entries.append(params["entry"])

    def open(self, url: str, timeout: float = 60) -> None:
        """Navigate and wait for the page to load; what went wrong before is forgotten."""
        self.console_errors, self.exceptions, self.log_entries = [], [], []
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + timeout
        while not self.evaluate("document.readyState === 'complete'"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load in {timeout} s")
            time.sleep(0.1)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited where it is a promise)."""
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(0.2)

    def errors(self) -> list[str]:
        """Everything that went wrong: console errors, uncaught exceptions, the browser's
        error messages (failed loads, CSP refusals) and the page's CSP violation events."""
        logged = [f"{e['source']}: {e['text']}" for e in self.log_entries
                  if e["level"] == "error" or e["source"] == "security"
                  or "Content Security Policy" in e["text"]]
        return self.console_errors + self.exceptions + logged + self.csp_violations()

    def csp_violations(self) -> list[str]:
        return self.evaluate("window.__csp || []")

    def screenshot(self, path: Path) -> Path:
        """The whole page as a PNG."""
        size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16_000),
                "scale": 1}
        data = self.call("Page.captureScreenshot", session=True, format="png", clip=clip,
                         captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.contextmanager
def browser(width: int = 1200, height: int = 900) -> Iterator[Browser]:
    """A headless Chromium in a temporary profile, and its tab; stopped and removed after."""
    from websockets.sync.client import connect

    # ignore_cleanup_errors: a helper process that outlived the group kill may still be
    # writing its last file into the scratch profile; that must not fail the test.
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [find_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port, path = _devtools_address(process, Path(profile))
            with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as socket:
                yield Browser(socket, width, height)
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """Stop Chromium and every helper process it started (its own session's group): the
    renderers outlive the browser process by a moment and keep writing to the profile."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.5)  # let the group's other processes take the signal too


def _devtools_address(process: subprocess.Popen, profile: Path) -> tuple[str, str]:
    """Chromium writes its DevTools port and browser path to ``DevToolsActivePort`` once
    it is ready."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Chromium exited with {process.returncode} at start")
        lines = marker.read_text().split() if marker.exists() else []
        if len(lines) == 2:
            return lines[0], lines[1]
        time.sleep(0.1)
    raise RuntimeError(f"Chromium wrote no {marker} in {START_TIMEOUT_S} s")


@contextlib.contextmanager
def serve(page: bytes, headers: dict[str, str]) -> Iterator[str]:
    """``page`` served at the returned URL on 127.0.0.1 (any path), with ``headers``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/report.html"
    finally:
        server.shutdown()
        server.server_close()
