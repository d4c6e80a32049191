"""The training flow as a deployment of a real Prefect server (not the temporary one)."""

import json
import os
import subprocess
import sys
import time

import pytest
from helpers_processes import BIN, free_port, running, wait_http

pytestmark = pytest.mark.integration


RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment("training-pipeline/test-pipeline", parameters=json.loads(sys.argv[1]), timeout=600)
print(json.dumps({"state": run.state.type.value, "message": run.state.message}))
"""


def test_deployment_run_on_a_prefect_server(tiny_dataset, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    server_cmd = [
        str(BIN / "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with running(server_cmd, env, tmp_path / "server.log") as server:
        wait_http(f"http://127.0.0.1:{port}/api/health", server, 120, tmp_path / "server.log")
        with running(
            [str(BIN / "defectflow"), "deploy", "--name", "test-pipeline"],
            env,
            tmp_path / "runner.log",
        ) as runner:
            params = {
                "config": "tiny",
                "overrides": [
                    f"data.root={tiny_dataset}",
                    "package.build_bento=false",
                    "tune.enabled=false",
                ],
            }
            deadline = time.monotonic() + 120
            while True:  # the deployment exists once the runner has registered it
                result = subprocess.run(
                    [sys.executable, "-c", RUN_DEPLOYMENT, json.dumps(params)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=700,
                )
                if (
                    result.returncode == 0
                    or time.monotonic() > deadline
                    or runner.poll() is not None
                ):
                    break
                time.sleep(3)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["state"] == "COMPLETED", state


def test_deploy_needs_a_server(capsys, monkeypatch):
    from defectflow.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["deploy"]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err
