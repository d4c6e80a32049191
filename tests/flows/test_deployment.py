"""The training flow as a deployment of a real Prefect server (the session's, not a temporary one)."""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from helpers_processes import BIN, running

pytestmark = pytest.mark.integration


RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[2], parameters=json.loads(sys.argv[1]), timeout=600)
print(json.dumps({"state": run.state.type.value, "message": run.state.message}))
"""


def test_deployment_run_on_a_prefect_server(prefect_server, tiny_dataset, tmp_path):
    name = f"test-pipeline-{uuid.uuid4().hex[:8]}"  # the server is shared: a name of its own
    env = prefect_server.client_env({**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    with running(
        [str(BIN / "defectflow"), "deploy", "--name", name],
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
                [
                    sys.executable,
                    "-c",
                    RUN_DEPLOYMENT,
                    json.dumps(params),
                    f"training-pipeline/{name}",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=700,
            )
            if result.returncode == 0 or time.monotonic() > deadline or runner.poll() is not None:
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
