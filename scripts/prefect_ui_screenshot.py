"""Screenshot the Prefect UI's page of one flow run in headless Chromium, and check it rendered.

    .venv/bin/python scripts/prefect_ui_screenshot.py --ui-url http://127.0.0.1:PORT \
        --flow-run-id ID --out run.png [--timeout 90]

`--ui-url` is the Prefect server (`prefect server start` serves the UI at / and the API at
/api). The script reads the run from `GET <ui-url>/api/flow_runs/<id>` (its name and state
name), opens `<ui-url>/runs/flow-run/<id>` in headless Chromium (1400x1000 window, temporary
profile), waits until the rendered page text (document.body.innerText, compared ignoring case
since the UI upper-cases some labels) contains the run's name, its state name and the first
words of its first log line (when it has logs), saves a PNG and prints one JSON line:

    {"screenshot": PATH, "flow_run": NAME, "state": STATE, "found": [NAME, STATE, LOG], ...}

Exit codes: 0 rendered; 1 the text never appeared within --timeout (sooner when the page says
it cannot connect to the API /ui-settings names), or the API/browser failed
(the screenshot is still saved when the page was opened, for debugging; the message says what
was missing); 2 no Chromium (install the Debian package `chromium`, or set
DEFECTFLOW_CHROMIUM).

The server must tell the UI where its API is. The UI is a single-page app that fetches
`/ui-settings` and then calls the API at the `api_url` found there, which is
PREFECT_UI_API_URL — by default derived from PREFECT_SERVER_API_HOST/PORT (127.0.0.1:4200),
NOT from the `--port` given to `prefect server start` (checked with Prefect 3.8.8:
`prefect server start --host 127.0.0.1 --port 34749` answered
`/ui-settings` -> {"api_url": "http://127.0.0.1:4200/api", ...}). On any port other than
4200, start the server with

    PREFECT_UI_API_URL=http://127.0.0.1:PORT/api prefect server start --host 127.0.0.1 --port PORT

otherwise the page stays on its loading state and this script fails (it then says so: it
compares /ui-settings' api_url with <ui-url>/api).

The DevTools client lives in scripts/browser.py, beside this file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import DevToolsError, find_browser, headless_chromium, new_tab  # noqa: E402

WIDTH, HEIGHT = 1400, 1000


def _get_json(url: str, timeout: float = 10, body: dict | None = None) -> dict | list:
    # No proxy: the server is local, and a proxy from the environment must not intercept.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        url,
        headers={"Accept": "application/json", "Content-Type": "application/json"},
        data=json.dumps(body).encode() if body is not None else None,
    )
    with opener.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def _first_log_words(ui: str, flow_run_id: str) -> str | None:
    """The start of the run's first log line: the page has rendered its logs when it shows it."""
    with suppress(urllib.error.URLError, OSError, ValueError):
        logs = _get_json(
            f"{ui}/api/logs/filter",
            body={
                "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                "sort": "TIMESTAMP_ASC",
                "limit": 1,
            },
        )
        if logs:
            return " ".join(logs[0]["message"].split()[:4]) or None
    return None


def _fail(message: str, code: int = 1, **fields) -> int:
    print(f"prefect_ui_screenshot: {message}", file=sys.stderr)
    print(json.dumps({**fields, "error": message}), flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ui-url", required=True, help="the Prefect server, e.g. http://127.0.0.1:4200"
    )
    parser.add_argument("--flow-run-id", required=True)
    parser.add_argument("--out", required=True, type=Path, help="PNG path")
    parser.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="seconds to wait for the page to show the run (default 90)",
    )
    args = parser.parse_args(argv)
    ui = args.ui_url.rstrip("/")
    out = args.out.expanduser().resolve()

    binary = find_browser()
    if binary is None:
        return _fail(
            "no Chromium found (tried chromium, chromium-browser, google-chrome on PATH, "
            "and DEFECTFLOW_CHROMIUM): install the Debian package `chromium`",
            code=2,
        )

    try:
        run = _get_json(f"{ui}/api/flow_runs/{args.flow_run_id}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return _fail(f"cannot read flow run {args.flow_run_id} from {ui}/api: {exc}")
    name = run.get("name") or ""
    state = (run.get("state") or {}).get("name") or run.get("state_name") or ""
    wanted = [w for w in (name, state) if w]
    if len(wanted) < 2:
        return _fail(
            f"flow run {args.flow_run_id} has no name or no state in the API answer",
            flow_run=name,
            state=state,
        )
    log_words = _first_log_words(ui, args.flow_run_id)
    if log_words:
        wanted.append(log_words)
    ui_api = None
    with suppress(urllib.error.URLError, OSError, ValueError):
        ui_api = _get_json(f"{ui}/ui-settings").get("api_url")

    # The UI will call ui_api: when that is not this server, its "Can't connect" is final.
    unreachable = bool(ui_api) and ui_api.rstrip("/") != f"{ui}/api"
    page_url = f"{ui}/runs/flow-run/{args.flow_run_id}"
    found: list[str] = []
    result = {
        "screenshot": str(out),
        "flow_run": name,
        "state": state,
        "found": found,
        "url": page_url,
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="prefect-ui-chromium-") as tmp:
        profile = Path(tmp)
        try:
            with (
                headless_chromium(
                    binary, profile, profile / "chromium.log", WIDTH, HEIGHT
                ) as browser,
                new_tab(browser, WIDTH, HEIGHT) as tab,
            ):
                navigated = tab.call("Page.navigate", url=page_url)
                if navigated.get("errorText"):
                    return _fail(
                        f"Chromium could not open {page_url}: {navigated['errorText']}", **result
                    )
                deadline = started + args.timeout
                text = ""
                while True:
                    text = tab.evaluate("document.body ? document.body.innerText : ''") or ""
                    found[:] = [w for w in wanted if w.lower() in text.lower()]
                    if len(found) == len(wanted) or time.monotonic() > deadline:
                        break
                    if unreachable and "can't connect to server api" in text.lower():
                        break  # the UI calls another server: waiting longer cannot help
                    time.sleep(0.25)
                if len(found) == len(wanted):
                    time.sleep(0.5)  # let the page finish drawing (icons, charts) before the shot
                tab.screenshot(out)
        except DevToolsError as exc:
            return _fail(f"browser failed: {exc}", **result)
    result["seconds"] = round(time.monotonic() - started, 1)
    if len(found) < len(wanted):
        missing = [w for w in wanted if w not in found]
        hint = ""
        if unreachable:
            hint = (
                f"; the server tells the UI its API is at {ui_api}, not {ui}/api: start it with "
                f"PREFECT_UI_API_URL={ui}/api"
            )
        snippet = " ".join(text.split())[:300]
        return _fail(
            f"{page_url} did not show {missing} after {result['seconds']:g} s (screenshot "
            f"{out}){hint}; page text: {snippet!r}",
            **result,
        )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
