"""The Docker work pool for real: `defectflow up --pool docker --docker-workers 2` on 127.0.0.1
starts a Prefect server, the pool `defectflow-docker` (prefect-docker) and two Docker workers;
flow runs are containers of the local training image (built for the session when the code
changed, never pulled), the data dir mounted at its own path. Two runs at once on two
workers, the nightly concurrency limit, and a worker machine that vanishes mid-run (worker and
container killed): the zombie automation marks the run Crashed, Retry completes it on the
other worker. And a distributed KerasTuner search inside one flow-run container. Needs a
container engine (`container_engine`, tests/helpers_container.py)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import cv2
import httpx
import pytest
from helpers_container import train_image
from helpers_processes import free_port
from helpers_stack import FINAL, TINY, Stack, database_kind, reachable_dir

from defectflow.orchestration import stack as stack_module

pytestmark = pytest.mark.integration


class DockerStack(Stack):
    def __init__(self, home, port, image, docker):
        super().__init__(
            home, port, ("--pool", "docker", "--docker-workers", "2", "--image", image)
        )
        self.image, self.docker = image, docker

    def containers(self) -> list[str]:
        return stack_module.stack_containers(self.home)

    def flow_run_container(self, run_id: str) -> str | None:
        ids = self.docker.out(
            "ps", "--quiet", "--filter", f"label=io.prefect.flow-run-id={run_id}"
        ).split()
        return ids[0] if ids else None


@pytest.fixture(scope="module")
def docker_stack(container_engine, tmp_path_factory, tiny_dataset):
    image = train_image(container_engine, tmp_path_factory.mktemp("train-image"))
    with contextlib.ExitStack() as cleanup:
        home = (
            cleanup.enter_context(reachable_dir("defectflow-docker-stack-"))
            if database_kind() == "postgres"
            else tmp_path_factory.mktemp("docker-stack")
        )
        stack = DockerStack(home, free_port(), image, container_engine)
        # Flow-run containers see the data dir only: the dataset goes there.
        stack.data = shutil.copytree(tiny_dataset, home / "data" / "tiny")
        try:
            stack.first_up = stack.up()
            yield stack
        finally:
            stack.down()
            assert stack.containers() == [], "flow-run containers left after `defectflow down`"


def _params(stack: DockerStack, **extra) -> dict:
    return {
        "config": "tiny",
        "data_root": str(stack.data),
        "overrides": TINY,
        "tuner_trials": 0,
        **extra,
    }


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_up_creates_the_docker_pool_and_moves_the_training_deployments_to_it(docker_stack):
    stack = docker_stack
    assert "work pool defectflow-docker" in stack.first_up.stdout, stack.first_up.stdout
    again = stack.up()  # idempotent: the pool's job template updated, nothing started twice
    assert "docker-worker-1 already running" in again.stdout, again.stdout
    assert {"server", "worker", "docker-worker-1", "docker-worker-2"} == set(
        stack.state()["processes"]
    )

    pool = stack.get("/work_pools/defectflow-docker")
    assert pool["type"] == "docker"
    defaults = {
        key: spec.get("default")
        for key, spec in pool["base_job_template"]["variables"]["properties"].items()
    }
    home = str(stack.home.resolve())
    assert defaults["image"] == stack.image and defaults["image_pull_policy"] == "Never"
    assert defaults["volumes"] == [f"{home}:{home}"]
    assert defaults["env"]["DEFECTFLOW_HOME"] == home
    assert defaults["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    st = stack.home.stat()
    assert defaults["container_create_kwargs"] == {"user": f"{st.st_uid}:{st.st_gid}"}

    deployments = {d["name"]: d for d in stack.post("/deployments/filter", {})}
    for name in ("training-pipeline", "nightly-retrain"):
        assert deployments[name]["work_pool_name"] == "defectflow-docker", name
        assert deployments[name]["pull_steps"] in ([], None), deployments[name]["pull_steps"]
    assert deployments["evaluate"]["work_pool_name"] == "defectflow"
    nightly = deployments["nightly-retrain"]
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"

    automations = [
        a
        for a in stack.post("/automations/filter", {})
        if a["name"] == stack_module.ZOMBIE_AUTOMATION
    ]
    assert len(automations) == 1 and automations[0]["trigger"]["within"] == 90

    deadline = time.monotonic() + 120
    while True:  # both workers poll the pool
        workers = stack.post("/work_pools/defectflow-docker/workers/filter", {})
        if sum(w["status"] == "ONLINE" for w in workers) >= 2:
            break
        assert time.monotonic() < deadline, f"workers not online: {workers}" + stack.logs()
        time.sleep(1)


def test_two_workers_run_two_flow_runs_at_once_and_the_container_promotes(docker_stack):
    """Two training runs at once, one on each worker, each in its own container and run
    folder; the one allowed to promote makes its model production in the shared registry,
    with its Bento, as a run on a process worker does."""
    stack = docker_stack
    runs_dir = stack.home / "runs"
    before = set(os.listdir(runs_dir)) if runs_dir.exists() else set()
    promoted = stack.trigger(
        "training-pipeline/training-pipeline",
        _params(stack, overrides=["tune.epochs=1", "train.epochs=1"], promote=True),
    )
    candidate = stack.trigger("training-pipeline/training-pipeline", _params(stack, promote=False))
    seen_together = False
    deadline = time.monotonic() + 900
    while True:
        runs = [stack.get(f"/flow_runs/{run_id}") for run_id in (promoted, candidate)]
        states = [r["state_type"] for r in runs]
        seen_together |= states == ["RUNNING", "RUNNING"]
        if all(s in FINAL for s in states):
            break
        assert time.monotonic() < deadline, f"runs still {states}" + stack.logs()
        time.sleep(0.5)
    for run in runs:
        assert run["state_type"] == "COMPLETED", run["state"]["message"] + stack.logs()
        assert run["work_pool_name"] == "defectflow-docker"
        assert run["infrastructure_pid"], run  # the container the worker started
    first, second = runs
    assert seen_together or (
        _time(first["start_time"]) < _time(second["end_time"])
        and _time(second["start_time"]) < _time(first["end_time"])
    ), "the two runs did not overlap"

    new = sorted(set(os.listdir(runs_dir)) - before)
    assert len(new) == 2, new
    for name in new:  # each run wrote its own folder, with its own model
        assert (runs_dir / name / "config.yaml").exists()

    models = stack.models()
    production = [m for m in models if m["stage"] == "production"]
    assert len(production) == 1 and len(models) == 2, models
    assert first["state"]["message"].startswith("promoted"), first["state"]["message"]
    # The Bento the container built on promotion is in this machine's store.
    bento = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from defectflow.environment import configure_environment; "
            "configure_environment(); from defectflow import registry; "
            "print(registry.bento_of(sys.argv[1]))",
            production[0]["tag"],
        ],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bento.returncode == 0, bento.stderr[-2000:]
    assert bento.stdout.strip().startswith("defectflow:"), bento.stdout


def test_the_nightly_concurrency_limit_holds_on_the_docker_pool(docker_stack):
    """Two nightly runs with a free worker each: the second waits until the first has ended."""
    stack = docker_stack
    grown = shutil.copytree(stack.data, stack.home / "data" / "grown")
    extra = sorted((grown / "train" / "good").glob("*.png"))[0]
    # New data (a mirrored image: no duplicate), so the first nightly run retrains.
    cv2.imwrite(str(extra.with_name("extra-" + extra.name)), cv2.imread(str(extra))[:, ::-1])
    params = _params(stack)
    params["data_root"] = str(grown)
    first = stack.trigger("nightly-retrain/nightly-retrain", params)
    second = stack.trigger("nightly-retrain/nightly-retrain", params)
    deadline = time.monotonic() + 900
    while True:
        states = [stack.get(f"/flow_runs/{r}")["state_type"] for r in (first, second)]
        assert states != ["RUNNING", "RUNNING"], "two nightly runs ran at once"
        if all(s in FINAL for s in states):
            break
        assert time.monotonic() < deadline, f"nightly runs still {states}" + stack.logs()
        time.sleep(0.5)
    runs = [stack.get(f"/flow_runs/{r}") for r in (first, second)]
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], [
        r["state"]["message"] for r in runs
    ]
    ordered = sorted(runs, key=lambda r: _time(r["start_time"]))
    assert _time(ordered[1]["start_time"]) >= _time(ordered[0]["end_time"])
    waited = [s["name"] for s in stack.states(ordered[1]["id"])]
    assert "AwaitingConcurrencySlot" in waited, waited


def test_a_distributed_search_runs_inside_a_flow_run_container(docker_stack, tmp_path):
    """tune.workers=2 on the Docker pool: the KerasTuner chief and two workers are Prefect tasks
    of the flow run, processes in its container exchanging trials over the network (the
    chief's port on 127.0.0.1); both workers run trials, and the trials table has the columns
    of the single-process search on the same config."""
    stack = docker_stack
    search = ["tune.epochs=1", "tune.space.base_filters=[4,8]", "train.verbose=2"]
    runs_dir = stack.home / "runs"
    before = set(os.listdir(runs_dir)) if runs_dir.exists() else set()
    run = stack.run(
        "training-pipeline/training-pipeline",
        _params(stack, overrides=[*TINY, *search, "tune.workers=2"], tuner_trials=2, promote=False),
        timeout=900,
    )
    assert run["state_type"] == "COMPLETED", run["state"]["message"] + stack.logs()
    (name,) = sorted(set(os.listdir(runs_dir)) - before)
    run_dir = runs_dir / name
    trials = json.loads((run_dir / "tuning" / "result.json").read_text())["trials"]
    assert len(trials) == 2 and {t["base_filters"] for t in trials} == {4, 8}
    reports = [
        json.loads((run_dir / "tuning" / f"tuner{i}.trials.json").read_text()) for i in (0, 1)
    ]
    assert all(report["trials"] for report in reports), reports  # both workers took part
    with open(run_dir / "trials.csv") as f:
        columns = csv.DictReader(f).fieldnames

    from defectflow.config import load_config
    from defectflow.data.mvtec import class_names, scan_dataset
    from defectflow.data.split import select, stratified_split
    from defectflow.training.train import PreparedData
    from defectflow.training.tune import tune

    samples = scan_dataset(stack.data)
    rows = stratified_split(samples, 0.5, 0.25, 0.25, seed=0)
    data = PreparedData(select(rows, "train"), select(rows, "val"), class_names(samples))
    cfg = load_config(
        "tiny", [f"data.root={stack.data}", *search, "tune.max_trials=2", "tune.workers=0"]
    )
    _, single = tune(cfg, data, tmp_path / "single")
    assert [list(t) for t in trials] == [list(t) for t in single]
    with open(tmp_path / "single" / "trials.csv") as f:
        assert csv.DictReader(f).fieldnames == columns


def _heartbeats(stack: DockerStack, run_id: str) -> int:
    response = httpx.post(
        f"{stack.api}/events/filter",
        json={
            "filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{run_id}"]},
            },
            "limit": 50,
        },
        timeout=30,
    )
    response.raise_for_status()
    return len(response.json()["events"])


def test_a_vanished_worker_machine_crashes_its_run_and_a_retry_completes(docker_stack):
    """The worker that runs a flow run and the run's container are killed (SIGKILL, `docker
    kill`): nothing is left to report, so the run would stay Running; the zombie automation
    marks it Crashed once no heartbeat came for 90 s, and Retry completes it on the other
    worker."""
    stack = docker_stack
    stack.up()  # idempotent: both workers, also when this test runs alone
    run_id = stack.trigger("training-pipeline/training-pipeline", _params(stack, promote=False))
    deadline = time.monotonic() + 600
    while True:
        task = stack.task_run(run_id, "train-model")
        if task is not None and task["state_type"] == "RUNNING" and _heartbeats(stack, run_id):
            break
        run = stack.get(f"/flow_runs/{run_id}")
        assert run["state_type"] not in FINAL, run["state"]["message"] + stack.logs()
        assert time.monotonic() < deadline, f"train-model not Running: {task}" + stack.logs()
        time.sleep(0.2)
    owner = [
        name
        for name, record in stack.state()["processes"].items()
        if name.startswith("docker-worker")
        and f"submitting flow run '{run_id}'" in Path(record["log"]).read_text(errors="replace")
    ]
    assert len(owner) == 1, owner
    container = stack.flow_run_container(run_id)
    assert container, "no container runs the flow run"
    os.kill(stack.state()["processes"][owner[0]]["pid"], signal.SIGKILL)
    stack.docker("kill", container, check=False)
    killed = time.monotonic()

    bound = stack_module.ZOMBIE_AFTER + 2 * stack_module.HEARTBEAT_SECONDS + 60
    crashed = stack.wait(run_id, timeout=bound)
    assert crashed["state_type"] == "CRASHED", crashed["state"]
    assert "heartbeat" in crashed["state"]["message"], crashed["state"]["message"]
    print(f"\nCrashed {time.monotonic() - killed:.0f} s after the worker and container were killed")

    stack.retry(run_id)  # the UI's "Retry": the worker that lives takes it
    retried = stack.wait(run_id, timeout=900)
    assert retried["state_type"] == "COMPLETED", retried["state"]["message"] + stack.logs()
    assert retried["run_count"] >= 2
    survivor = next(n for n in ("docker-worker-1", "docker-worker-2") if n != owner[0])
    survivor_log = Path(stack.state()["processes"][survivor]["log"]).read_text(errors="replace")
    assert f"submitting flow run '{run_id}'" in survivor_log
    stack.up()  # a new worker where the killed one was
