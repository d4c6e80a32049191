"""A minimal Chrome DevTools Protocol client and a headless Chromium launcher (no Prefect, no
defectflow imports: usable from a fresh checkout).

Used by scripts/prefect_ui_screenshot.py (imported from its own directory) and by
tests/serving/web/test_ui_page.py (which puts scripts/ on sys.path). Needs `websockets` (a dependency of
the project) and a Chromium binary: the Debian package `chromium`, or DEFECTFLOW_CHROMIUM
naming another binary.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

#: Tried in order; DEFECTFLOW_CHROMIUM names another binary.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Default upper bound of a wait on the browser (start, page load).
WAIT = 60.0


class DevToolsError(RuntimeError):
    pass


class DevTools:
    """A minimal Chrome DevTools Protocol client on one websocket; every wait is bounded.

    Events that arrive while waiting for an answer are kept in `events`.
    """

    #: Evaluated in the page to describe it when a wait_for times out.
    describe = "JSON.stringify({url: location.href, text: document.body?.innerText.slice(0, 600)})"

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=10, proxy=None)
        self._id = 0
        self.events: list[dict] = []
        self.port: str | None = None

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        ident = self._id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevToolsError(f"{method}: no answer from the browser within {timeout} s")
            try:
                message = json.loads(self.ws.recv(timeout=remaining))
            except TimeoutError:
                continue
            if message.get("id") == ident:
                if "error" in message:
                    raise DevToolsError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, timeout: float = 30):
        result = self.call(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError(
                f"page script failed: {details.get('exception', {}).get('description') or details}"
            )
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = WAIT):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.evaluate(self.describe)
                raise DevToolsError(
                    f"timed out after {timeout} s waiting for {what}; page: {state}"
                )
            time.sleep(0.1)

    def screenshot(self, path: Path, beyond_viewport: bool = False) -> Path:
        data = self.call(
            "Page.captureScreenshot", format="png", captureBeyondViewport=beyond_viewport
        )["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.ws.close()


def find_browser() -> str | None:
    """DEFECTFLOW_CHROMIUM if set (a name on PATH or a path), else the first of BROWSERS on PATH."""
    named = os.environ.get("DEFECTFLOW_CHROMIUM")
    if named:
        return shutil.which(named) or (named if os.access(named, os.X_OK) else None)
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def chromium_command(binary: str, profile: Path, width: int = 1280, height: int = 900) -> list[str]:
    """Headless Chromium on a fresh profile; port 0: Chromium picks a free DevTools port and
    writes it to <profile>/DevToolsActivePort (no race)."""
    return [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-proxy-server",
        f"--window-size={width},{height}",
        "about:blank",
    ]


def connect_browser(
    profile: Path, proc: subprocess.Popen, timeout: float = WAIT, log: Path | None = None
) -> DevTools:
    """Wait for the DevToolsActivePort file of a starting Chromium; a connection to the browser."""
    start = time.monotonic()
    active = Path(profile) / "DevToolsActivePort"
    tail = (lambda: "\n" + log.read_text(errors="replace")[-3000:]) if log else (lambda: "")
    while not (active.exists() and len(active.read_text().split()) >= 2):
        if proc.poll() is not None:
            raise DevToolsError(f"{proc.args[0]} exited {proc.returncode}" + tail())
        if time.monotonic() - start > timeout:
            raise DevToolsError(
                f"{proc.args[0]} did not open its DevTools port within {timeout} s" + tail()
            )
        time.sleep(0.1)
    port, path = active.read_text().split()[:2]
    connection = DevTools(f"ws://127.0.0.1:{port}{path}")
    connection.port = port
    return connection


@contextmanager
def headless_chromium(
    binary: str,
    profile: Path,
    log: Path,
    width: int = 1280,
    height: int = 900,
    timeout: float = WAIT,
) -> Iterator[DevTools]:
    """Start Chromium in its own process group; yield the browser connection; always stop it."""
    with Path(log).open("wb") as out:
        proc = subprocess.Popen(
            chromium_command(binary, profile, width, height),
            cwd=profile,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    connection = None
    try:
        connection = connect_browser(profile, proc, timeout, log)
        yield connection
    finally:
        if connection is not None:
            connection.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@contextmanager
def new_tab(
    browser: DevTools,
    width: int = 1280,
    height: int = 900,
    domains: tuple[str, ...] = ("Page", "Runtime"),
) -> Iterator[DevTools]:
    """A new about:blank tab of `browser` with `domains` enabled and a width x height viewport."""
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    tab = DevTools(f"ws://127.0.0.1:{browser.port}/devtools/page/{target}")
    try:
        for domain in domains:
            tab.call(f"{domain}.enable")
        tab.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        yield tab
    finally:
        tab.close()
        with suppress(DevToolsError, OSError):  # the browser may already be gone
            browser.call("Target.closeTarget", targetId=target)
