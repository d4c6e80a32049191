"""The training flow as a deployment of a real Prefect server (not the temporary one)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment("training-pipeline/test-pipeline", parameters=json.loads(sys.argv[1]), timeout=600)
print(json.dumps({"state": run.state.type.value, "message": run.state.message}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)


def test_deployment_run_on_a_prefect_server(tiny_dataset, tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    log = (tmp_path / "processes.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    runner = None
    try:
        _wait(f"http://127.0.0.1:{port}/api/health", server, 120)
        runner = subprocess.Popen([str(BIN / "defectflow"), "deploy", "--name", "test-pipeline"], cwd=REPO_ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        params = {"config": "tiny", "overrides": [f"data.root={tiny_dataset}", "package.build_bento=false"]}
        deadline = time.monotonic() + 120
        while True:  # the deployment exists once the runner has registered it
            result = subprocess.run([sys.executable, "-c", RUN_DEPLOYMENT, json.dumps(params)], env=env,
                                    capture_output=True, text=True, timeout=700)
            if result.returncode == 0 or time.monotonic() > deadline or runner.poll() is not None:
                break
            time.sleep(3)
        assert result.returncode == 0, result.stderr[-3000:]
        state = json.loads(result.stdout.strip().splitlines()[-1])
        assert state["state"] == "COMPLETED", state
    finally:
        if runner is not None:
            _stop(runner)
        _stop(server)
        log.close()


def test_deploy_needs_a_server(capsys, monkeypatch):
    from defectflow.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["deploy"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err
