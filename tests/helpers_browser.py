"""Headless Chromium for the page tests: the DevTools client of scripts/browser.py, a browser
per module, a tab per test recording exceptions, requests and CSP violations, a real mouse
click, and the check that a page threw nothing and fetched nothing from elsewhere.

Without a Chromium binary the browser tests fail, unless DEFECTFLOW_ALLOW_MISSING lets them
skip (helpers_resources.skip_missing).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_processes import running
from helpers_resources import skip_missing

# The DevTools client is shared with scripts/prefect_ui_screenshot.py (scripts/ is no package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from browser import BROWSERS, chromium_command, find_browser  # noqa: E402
from browser import DevTools as CDPClient  # noqa: E402

#: Upper bound of every wait on the browser (start, page load, one inspection).
WAIT = 60.0


class DevTools(CDPClient):
    """The CDP client of scripts/browser.py; a timed-out wait also reports the page's state."""

    describe = (
        "JSON.stringify({url: location.href, state: "
        "document.getElementById('result')?.dataset.state, "
        "text: document.body?.innerText.slice(0, 600)})"
    )


@pytest.fixture(scope="module")
def browser_binary() -> str:
    binary = find_browser()
    if binary is None:
        reason = (
            f"no Chromium found (tried {', '.join(BROWSERS)} on PATH"
            f"{', DEFECTFLOW_CHROMIUM' if os.environ.get('DEFECTFLOW_CHROMIUM') else ''}): "
            "install the Debian package `chromium` (make test does)"
        )
        skip_missing("browser", reason)
    return binary


@pytest.fixture(scope="module")
def browser(browser_binary, tmp_path_factory) -> Iterator[DevTools]:
    """Headless Chromium on a fresh profile; a DevTools connection to the browser itself."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    log = profile.parent / "chromium.log"
    command = chromium_command(browser_binary, profile, 1280, 900)
    start = time.monotonic()
    with running(command, dict(os.environ), log, cwd=profile) as proc:
        active = profile / "DevToolsActivePort"
        while not (active.exists() and len(active.read_text().split()) >= 2):
            if proc.poll() is not None:
                pytest.fail(
                    f"{browser_binary} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            if time.monotonic() - start > WAIT:
                pytest.fail(
                    f"{browser_binary} did not open its DevTools port within {WAIT} s:\n"
                    f"{log.read_text()[-3000:]}"
                )
            time.sleep(0.1)
        port, path = active.read_text().split()[:2]
        connection = DevTools(f"ws://127.0.0.1:{port}{path}")
        connection.port = port
        version = connection.call("Browser.getVersion")["product"]
        print(f"\n{version} ready in {time.monotonic() - start:.1f} s")
        try:
            yield connection
        finally:
            connection.close()  # `running` then ends the browser's whole process group


@pytest.fixture
def page(browser) -> Iterator[DevTools]:
    """A new tab, recording exceptions, requests and CSP violations."""
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    tab = DevTools(f"ws://127.0.0.1:{browser.port}/devtools/page/{target}")
    try:
        for domain in ("Page", "Runtime", "Network", "Log"):
            tab.call(f"{domain}.enable")
        tab.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        tab.call(
            "Page.addScriptToEvaluateOnNewDocument",
            source=(
                "window.__violations = [];"
                "document.addEventListener('securitypolicyviolation', (e) =>"
                " window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));"
            ),
        )
        yield tab
    finally:
        tab.close()
        browser.call("Target.closeTarget", targetId=target)


def no_page_problems(page: DevTools, origin: str) -> None:
    exceptions = [
        e["params"]["exceptionDetails"]
        for e in page.events
        if e["method"] == "Runtime.exceptionThrown"
    ]
    assert not exceptions, f"the page threw: {exceptions}"
    assert page.evaluate("window.__violations") == []
    requested = {
        e["params"]["request"]["url"]
        for e in page.events
        if e["method"] == "Network.requestWillBeSent"
    }
    elsewhere = sorted(u for u in requested if not u.startswith((origin + "/", "data:", "blob:")))
    assert not elsewhere, f"the page requested resources elsewhere: {elsewhere}"


def click(page, selector: str) -> None:
    """A real mouse click in the middle of the element."""
    box = page.evaluate(f"""(() => {{
      const e = document.querySelector({json.dumps(selector)});
      if (!e) return null;
      e.scrollIntoView({{block: 'center'}});
      const r = e.getBoundingClientRect();
      return r.width > 0 && r.height > 0 ? [r.left + r.width / 2, r.top + r.height / 2] : null;
    }})()""")
    assert box, f"{selector} is not on the page (or not visible)"
    x, y = box
    page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
