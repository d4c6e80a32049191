"""Bringing the orchestration stack up and down: bookkeeping by PID, idempotence, failures."""

from __future__ import annotations

import http.server
import subprocess
import threading
from pathlib import Path

import pytest
from helpers_processes import free_port

from defectflow.orchestration import stack


def test_down_with_nothing_running_does_nothing(tmp_path):
    assert stack.down(tmp_path, say=lambda _: None) == []
    assert stack.status(tmp_path) == {"running": False}


def test_down_stops_exactly_the_recorded_processes(tmp_path):
    ours = subprocess.Popen(["sleep", "300"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "301"], start_new_session=True)
    try:
        state = stack.StackState(
            api_url="http://127.0.0.1:1/api",
            processes={
                "worker": {"pid": ours.pid, "command": ["sleep", "300"], "log": ""},
                # A PID now running something else (reused): never signalled.
                "server": {
                    "pid": stranger.pid,
                    "command": ["prefect", "server", "start"],
                    "log": "",
                },
            },
        )
        stack._write_state(tmp_path, state)
        assert stack.status(tmp_path)["processes"]["worker"]["running"]
        assert stack.down(tmp_path, grace=5, say=lambda _: None) == ["worker"]
        assert ours.wait(timeout=10) is not None
        assert stranger.poll() is None
        assert stack.read_state(tmp_path) is None
    finally:
        for p in (ours, stranger):
            p.kill()
            p.wait()


def test_up_refuses_a_port_something_else_answers_on(tmp_path):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", free_port()), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(stack.StackError, match="something else already answers"):
            stack.up(tmp_path, port=server.server_address[1], say=lambda _: None)
    finally:
        server.shutdown()
    assert stack.read_state(tmp_path) is None


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path, monkeypatch):
    fake = tmp_path / "prefect"
    fake.write_text("#!/bin/sh\necho 'database is locked' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(stack, "_prefect", lambda: str(fake))
    with pytest.raises(stack.StackError, match="exited while starting(.|\n)*database is locked"):
        stack.up(tmp_path, port=free_port(), say=lambda _: None)
    assert "server" not in stack.read_state(tmp_path).processes  # nothing left recorded as running
    assert Path(tmp_path / "stack" / "server.log").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pool": "kubernetes"}, "pool 'kubernetes': choose one of process, docker"),
        ({"database": "mysql"}, "database 'mysql': choose one of sqlite, postgres"),
        ({"pool": "docker", "docker_workers": 0}, "docker workers: 0, at least 1"),
    ],
)
def test_up_refuses_unknown_pools_databases_and_worker_counts(tmp_path, kwargs, message):
    with pytest.raises(stack.StackError, match=message):
        stack.up(tmp_path, port=free_port(), say=lambda _: None, **kwargs)
    assert stack.read_state(tmp_path) is None


def test_the_docker_pool_says_when_the_image_is_missing(tmp_path, monkeypatch):
    """No local training image: a clear error naming `make image-train`, nothing started."""

    class Images:
        def get(self, name):
            import docker

            raise docker.errors.ImageNotFound(name)

    class Client:
        images = Images()

        def close(self):
            pass

    monkeypatch.setattr(stack, "_docker_client", lambda timeout=60: Client())
    with pytest.raises(stack.StackError, match="no image nope:1.*make image-train"):
        stack.up(tmp_path, port=free_port(), pool="docker", image="nope:1", say=lambda _: None)
    assert stack.read_state(tmp_path) is None


def test_docker_deployments_load_from_the_installed_package_on_the_docker_pool(tmp_path):
    import yaml

    spec = yaml.safe_load(stack.docker_prefect_file(tmp_path).read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == set(stack.DOCKER_DEPLOYMENTS)
    assert (
        deployments["training-pipeline"]["entrypoint"]
        == "defectflow.orchestration.flows.training.training_pipeline"
    )
    assert (
        deployments["nightly-retrain"]["entrypoint"]
        == "defectflow.orchestration.flows.nightly.nightly_retrain"
    )
    for deployment in deployments.values():
        assert deployment["pull"] == []  # no checkout in a container
        assert deployment["work_pool"]["name"] == stack.DOCKER_POOL
    # What prefect.yaml says of the nightly run still holds there.
    assert deployments["nightly-retrain"]["concurrency_limit"]["limit"] == 1
    assert deployments["nightly-retrain"]["schedules"][0]["cron"] == "0 2 * * *"
    from prefect.flows import load_flow_from_entrypoint

    for deployment in deployments.values():
        assert load_flow_from_entrypoint(deployment["entrypoint"]).name == deployment["name"]


def test_flow_run_containers_share_the_data_dir_at_its_own_path(tmp_path):
    defaults = stack.docker_job_defaults(tmp_path, "defectflow-train:9")
    home = str(tmp_path.resolve())
    assert defaults["image"] == "defectflow-train:9" and defaults["image_pull_policy"] == "Never"
    assert defaults["volumes"] == [f"{home}:{home}"]
    assert {defaults["env"][k] for k in ("DEFECTFLOW_HOME",)} == {home}
    assert defaults["env"]["PREFECT_HOME"] == f"{home}/prefect"
    assert defaults["env"]["BENTOML_HOME"] == f"{home}/bentoml"
    assert defaults["network_mode"] == "host" and defaults["networks"] == []
    st = tmp_path.stat()
    assert defaults["container_create_kwargs"] == {"user": f"{st.st_uid}:{st.st_gid}"}
    assert defaults["labels"] == {stack.STACK_LABEL: stack.stack_id(tmp_path)}
    on_network = stack.docker_job_defaults(tmp_path, network="defectflow-net")
    assert on_network["network_mode"] is None and on_network["networks"] == ["defectflow-net"]


def test_the_zombie_automation_crashes_runs_silent_for_its_window():
    automation = stack.zombie_automation(within=90)
    trigger = automation["trigger"]
    assert trigger["posture"] == "Proactive" and trigger["within"] == 90
    assert trigger["after"] == ["prefect.flow-run.heartbeat"]
    assert "prefect.flow-run.Completed" in trigger["expect"]
    assert trigger["for_each"] == ["prefect.resource.id"]
    assert automation["actions"] == [
        {
            "type": "change-flow-run-state",
            "state": "CRASHED",
            "name": "Crashed",
            "message": "no heartbeat for 90 s: the flow run's machine, worker or container vanished",
        }
    ]
    # Prefect's minimum heartbeat is 30 s; the window allows missing two of them.
    assert stack.ZOMBIE_AFTER >= 3 * stack.HEARTBEAT_SECONDS >= 90
