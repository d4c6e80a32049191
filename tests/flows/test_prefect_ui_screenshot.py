"""scripts/prefect_ui_screenshot.py end to end: a real `prefect server` on 127.0.0.1 (the
session's), a tiny flow run against it, the script as a subprocess in headless Chromium; the
PNG must show the run's page (name, state and first log line found in the rendered text, a
non-blank image). Skipped, saying why, without a Chromium binary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from helpers_processes import REPO_ROOT, isolated_env
from helpers_resources import skip_missing

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from browser import BROWSERS, find_browser  # noqa: E402

pytestmark = pytest.mark.integration

SCRIPT = REPO_ROOT / "scripts" / "prefect_ui_screenshot.py"

_FLOW = """
from prefect import flow, get_run_logger

@flow(name="ui-screenshot-smoke")
def smoke():
    get_run_logger().warning("smoke flow wrote this line")
    return 1

state = smoke(return_state=True)
print(state.state_details.flow_run_id, state.name)
"""


@pytest.fixture(scope="module")
def browser_binary() -> str:
    binary = find_browser()
    if binary is None:
        reason = (
            f"no Chromium found (tried {', '.join(BROWSERS)} on PATH and DEFECTFLOW_CHROMIUM): "
            "install the Debian package `chromium` (make test does)"
        )
        skip_missing("browser", reason)
    return binary


@pytest.fixture(scope="module")
def prefect_ui(browser_binary, prefect_server, tmp_path_factory):
    """The session's Prefect server (its UI told its own API URL, else the UI calls
    127.0.0.1:4200): its URL and the environment of a client of it."""
    root = tmp_path_factory.mktemp("prefect-ui")
    env = isolated_env(root / "home")
    (root / "home" / "prefect").mkdir(parents=True)
    env.update(PREFECT_HOME=str(root / "home" / "prefect"), PREFECT_LOGGING_LEVEL="WARNING")
    return {"url": prefect_server.url, "env": prefect_server.client_env(env), "root": root}


def test_screenshot_shows_the_flow_run(prefect_ui, tmp_path):
    ran = subprocess.run(
        [sys.executable, "-c", _FLOW],
        env=prefect_ui["env"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    run_id, state = ran.stdout.split()[-2:]
    assert state == "Completed"

    out = tmp_path / "flow-run.png"
    shot = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--ui-url",
            prefect_ui["url"],
            "--flow-run-id",
            run_id,
            "--out",
            str(out),
            "--timeout",
            "90",
        ],
        env=prefect_ui["env"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    print(shot.stdout, shot.stderr)
    assert shot.returncode == 0, shot.stderr[-3000:]
    result = json.loads(shot.stdout.strip().splitlines()[-1])
    assert result["screenshot"] == str(out.resolve())
    assert result["state"] == "Completed"
    # Name, state and the start of its first log line (the flow logs, so the page shows logs too).
    assert result["flow_run"] and result["found"][:2] == [result["flow_run"], "Completed"]
    assert result["found"][2] == "smoke flow wrote this"
    print(f"screenshot: {out}")

    image = cv2.imread(str(out))
    assert image is not None, f"{out} is not a readable PNG"
    assert image.shape[:2] == (1000, 1400)
    assert float(image.std()) > 10, "the screenshot is blank"


def test_screenshot_fails_clearly_for_an_unknown_run(prefect_ui, tmp_path):
    out = tmp_path / "missing.png"
    shot = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--ui-url",
            prefect_ui["url"],
            "--flow-run-id",
            "00000000-0000-0000-0000-000000000000",
            "--out",
            str(out),
            "--timeout",
            "10",
        ],
        env=prefect_ui["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 1
    assert "cannot read flow run" in shot.stderr and "404" in shot.stderr


def test_screenshot_exits_2_without_chromium(tmp_path):
    env = {"PATH": str(tmp_path), "DEFECTFLOW_CHROMIUM": str(tmp_path / "no-such-browser")}
    shot = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--ui-url",
            "http://127.0.0.1:9",
            "--flow-run-id",
            "x",
            "--out",
            str(tmp_path / "x.png"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shot.returncode == 2
    assert "no Chromium found" in shot.stderr
    assert not Path(tmp_path / "x.png").exists()
