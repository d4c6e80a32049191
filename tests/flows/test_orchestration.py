"""The orchestration stack for real: `defectflow up` starts a Prefect server, the work pools, the
deployments of prefect.yaml and a process worker on 127.0.0.1; runs are triggered as the UI's
"Run" button does; then faults: a killed worker, a server restart, a nightly run on bad data."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers_processes import REPO_ROOT, free_port
from helpers_stack import FINAL, TINY, Stack, database_kind, reachable_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request, tmp_path_factory):
    """Every test of this file runs once on SQLite, then once with Prefect on PostgreSQL (`up
    --database postgres`, also what DEFECTFLOW_TEST_DATABASE=postgres asks for)."""
    database = "postgres" if database_kind() == "postgres" else request.param
    with contextlib.ExitStack() as cleanup:
        # On PostgreSQL the cluster in the data dir runs as `postgres`: pytest's tmp dirs are
        # private to their owner.
        home = (
            cleanup.enter_context(reachable_dir("defectflow-stack-"))
            if database == "postgres"
            else tmp_path_factory.mktemp("stack-home")
        )
        stack = Stack(home, free_port(), ("--database", database))
        try:
            yield stack
        finally:
            stack.down()


def test_up_is_idempotent_and_applies_the_deployments(stack):
    first = stack.up()
    assert f"Prefect UI: http://127.0.0.1:{stack.port}" in first.stdout
    pids = {name: record["pid"] for name, record in stack.state()["processes"].items()}
    assert set(pids) == {"server", "worker"}
    again = stack.up()
    assert "server already running" in again.stdout and "worker already running" in again.stdout
    assert {name: record["pid"] for name, record in stack.state()["processes"].items()} == pids

    names = {d["name"]: d for d in stack.post("/deployments/filter", {})}
    assert {
        "training-pipeline",
        "nightly-retrain",
        "evaluate",
        "promote",
        "training-pipeline-gpu",
    } <= set(names)
    nightly = names["nightly-retrain"]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    form = names["training-pipeline"]["parameter_openapi_schema"]["properties"]
    assert {"config", "overrides", "data_root", "tuner_trials", "promote"} <= set(form)
    assert form["promote"]["type"] == "boolean" and form["promote"]["default"] is True
    assert all(field.get("description") for field in form.values())
    assert names["training-pipeline-gpu"]["work_pool_name"] == "defectflow-gpu"


def test_training_pipeline_from_the_ui_button(stack, tiny_dataset, tmp_path):
    run = stack.run(
        "training-pipeline/training-pipeline",
        {"config": "tiny", "data_root": str(tiny_dataset), "overrides": TINY, "promote": False},
    )
    assert run["state_type"] == "COMPLETED", run["state"]["message"] + stack.logs()
    assert "promotion is off" in run["state"]["message"], run["state"]["message"]
    artifacts = stack.artifacts(run["id"])
    for key in (
        "data-validation",
        "tuner-trials",
        "test-metrics",
        "gate-decision",
        "evaluation-report",
        "metrics-comparison",
        "promotion",
    ):
        assert key in artifacts, sorted(artifacts)
    assert "Data Docs" in artifacts["data-validation"]["data"]
    assert artifacts["metrics-comparison"]["type"] == "table"
    models = stack.models()
    assert (
        len(models) == 1 and models[0]["stage"] == "candidate"
    )  # promote=False: registered, not promoted

    logs = stack.post(
        "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}
    )
    assert any("data valid" in entry["message"] for entry in logs)

    # The flow-run page of the Prefect UI renders this run (headless Chromium).
    shot = tmp_path / "flow-run.png"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "prefect_ui_screenshot.py"),
            "--ui-url",
            f"http://127.0.0.1:{stack.port}",
            "--flow-run-id",
            run["id"],
            "--out",
            str(shot),
        ],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if result.returncode == 2:
        print(f"no Chromium: UI screenshot not checked ({result.stderr.strip()})")
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert shot.stat().st_size > 10_000
        assert run["name"] in json.loads(result.stdout.strip().splitlines()[-1])["found"]


def test_nightly_retrains_once_then_skips_unchanged_data(stack, tiny_dataset):
    params = {
        "config": "tiny",
        "data_root": str(tiny_dataset),
        "overrides": TINY,
        "tuner_trials": 0,
    }
    first = stack.run("nightly-retrain/nightly-retrain", params)
    assert first["state_type"] == "COMPLETED", first["state"]["message"] + stack.logs()
    assert first["state"]["message"].startswith("promoted"), first["state"][
        "message"
    ]  # no production yet
    production = [m for m in stack.models() if m["stage"] == "production"]
    assert len(production) == 1

    second = stack.run("nightly-retrain/nightly-retrain", params)
    assert second["state_type"] == "COMPLETED"
    assert second["state"]["message"].startswith("skipped: no new data"), second["state"]["message"]
    assert [m["tag"] for m in stack.models() if m["stage"] == "production"] == [
        production[0]["tag"]
    ]
    assert len(stack.models()) == 2  # nothing trained
    # The data hash came from the cache (persisted result of the first night), not from the files.
    tasks = stack.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [second["id"]]}}})
    fingerprint = [t for t in tasks if t["name"].startswith("fingerprint-data")]
    assert fingerprint and fingerprint[0]["state"]["name"] == "Cached"


def test_failing_nightly_never_changes_production(stack, tiny_dataset, tmp_path):
    broken = shutil.copytree(tiny_dataset, tmp_path / "broken")
    next((broken / "test" / "crack").glob("*.png")).write_bytes(b"not an image")
    production = [m["tag"] for m in stack.models() if m["stage"] == "production"]
    run = stack.run(
        "nightly-retrain/nightly-retrain",
        {"config": "tiny", "data_root": str(broken), "overrides": TINY},
    )
    assert run["state_type"] == "FAILED", run["state"]
    assert [m["tag"] for m in stack.models() if m["stage"] == "production"] == production


def test_killed_worker_crashes_the_run_and_a_retry_completes(stack, tiny_dataset):
    """The worker is SIGKILLed while the run's `train-model` task is Running (polled from the
    API, not guessed with a sleep): the flow run ends Crashed, that task never completes, and a
    retry on a new worker completes."""
    stack.up()  # idempotent: lets this test run on its own
    run_id = stack.trigger(
        "training-pipeline/training-pipeline",
        {
            "config": "tiny",
            "data_root": str(tiny_dataset),
            "overrides": TINY,
            "promote": False,
            "tuner_trials": 0,
        },
    )
    deadline = time.monotonic() + 300
    while True:  # the training task is short (one tiny epoch): poll often
        task = stack.task_run(run_id, "train-model")
        if task is not None and task["state_type"] == "RUNNING":
            break
        flow_run = stack.get(f"/flow_runs/{run_id}")
        assert flow_run["state_type"] not in FINAL, (
            f"the run ended {flow_run['state_type']} before train-model was seen Running: {task}"
            + stack.logs()
        )
        assert task is None or task["state_type"] in ("PENDING", "SCHEDULED"), task
        assert time.monotonic() < deadline, (
            f"train-model not Running after 300 s: {task}" + stack.logs()
        )
        time.sleep(0.1)
    os.kill(stack.state()["processes"]["worker"]["pid"], signal.SIGKILL)
    crashed = stack.wait(run_id, timeout=120)
    assert crashed["state_type"] == "CRASHED", crashed["state"]
    killed_task = stack.task_run(run_id, "train-model")
    assert killed_task["id"] == task["id"] and killed_task["state_type"] != "COMPLETED", (
        killed_task["state"]
    )

    stack.up()  # starts only what is missing: a new worker
    stack.retry(run_id)  # the UI's "Retry" on the crashed run
    retried = stack.wait(run_id)
    assert retried["state_type"] == "COMPLETED", retried["state"]["message"] + stack.logs()
    assert retried["run_count"] >= 2


def test_deployments_and_schedules_survive_a_server_restart(stack):
    before = {d["name"]: d["schedules"] for d in stack.post("/deployments/filter", {})}
    down = stack.cli("down", timeout=120)
    assert down.returncode == 0 and "server stopped" in down.stdout, down.stdout + down.stderr
    assert stack.cli("down").returncode == 0  # idempotent
    restart = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from defectflow.environment import configure_environment; configure_environment(); "
            "from defectflow.orchestration import stack; stack.up(Path(sys.argv[1]), port=int(sys.argv[2]), "
            "deploy=False, worker=False, database=sys.argv[3])",
            str(stack.home),
            str(stack.port),
            stack.database,
        ],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert restart.returncode == 0, restart.stderr + stack.logs()
    after = {d["name"]: d["schedules"] for d in stack.post("/deployments/filter", {})}
    assert set(after) == set(before)
    assert [s["schedule"] for s in after["nightly-retrain"]] == [
        s["schedule"] for s in before["nightly-retrain"]
    ]
