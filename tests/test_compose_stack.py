"""The production stack of compose.yaml for real (scripts/compose_stack.py): built here (no
registry), brought up under a project name of its own on free 127.0.0.1 ports with a data dir
of its own, one training run triggered through the Prefect API on its Docker worker, the model
that run promoted served by the Bento container and answering /predict, then brought down with
nothing of it left running. Needs a container engine (`container_engine`,
tests/helpers_container.py) and Debian's docker-compose (`make host-packages`)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from helpers_container import container, load_script, train_image
from helpers_processes import free_port
from helpers_stack import TINY
from helpers_stack import Stack as PrefectStack

pytestmark = pytest.mark.integration

compose_stack = load_script("compose_stack")


def _memory_mb(docker, name: str) -> float:
    """What `docker stats` says the container uses, in MiB."""
    usage = docker.out("stats", "--no-stream", "--format", "{{.MemUsage}}", name)
    value, unit = re.match(r"\s*([\d.]+)\s*([KMG]i?B)", usage).groups()
    return (
        float(value)
        * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "kB": 1 / 1024, "MB": 1, "GB": 1024}[unit]
    )


def test_the_compose_stack_trains_promotes_serves_and_goes_away(
    container_engine, tiny_dataset, tmp_path_factory
):
    docker = container_engine
    image = train_image(docker, tmp_path_factory.mktemp("train-image"))
    home = tmp_path_factory.mktemp("compose-home")
    data = shutil.copytree(tiny_dataset, home / "data" / "tiny")
    project = f"defectflow-test-{os.getpid()}"
    stack = compose_stack.Stack(
        project,
        home,
        prefect_port=free_port(),
        serve_port=free_port(),
        train_image=image,
        serve_image=f"defectflow-stacktest:{os.getpid()}",
    )
    prefect = PrefectStack(home, stack.prefect_port)
    try:
        started = compose_stack.up(docker, stack, timeout=900)
        assert started["served"] is None  # no production model yet
        rows = {c["service"]: c for c in compose_stack.containers(docker, project)}
        assert {rows[s]["health"] for s in ("postgres", "prefect-server", "worker")} == {"healthy"}
        assert rows["setup"]["status"] == "exited" and rows["setup"]["exit_code"] == 0
        for service, policy in {
            "postgres": "unless-stopped",
            "prefect-server": "unless-stopped",
            "worker": "unless-stopped",
            "setup": "no",
        }.items():
            info = json.loads(docker.out("inspect", rows[service]["id"]))[0]
            assert info["HostConfig"]["RestartPolicy"]["Name"] == policy, service
        # The UI answers on the published port.
        status, page = container._http("GET", f"http://127.0.0.1:{stack.prefect_port}/", 30)
        assert status == 200 and b"<html" in page.lower(), (status, page[:300])
        # The server keeps its database in the PostgreSQL container.
        server = json.loads(docker.out("inspect", rows["prefect-server"]["id"]))[0]
        assert any(
            e.startswith("PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:")
            and "@postgres:5432/" in e
            for e in server["Config"]["Env"]
        )

        run_id = prefect.trigger(
            "training-pipeline/training-pipeline",
            {
                "config": "tiny",
                "data_root": str(data),
                "overrides": [o for o in TINY if not o.startswith("package.build_bento")],
                "tuner_trials": 0,
            },
        )
        run = prefect.wait(run_id, timeout=1200)
        logs = "".join(compose_stack.logs(stack, s) for s in ("worker", "prefect-server"))
        assert run["state_type"] == "COMPLETED", run["state"]["message"] + logs
        assert run["state"]["message"].startswith("promoted"), run["state"]["message"]
        assert run["work_pool_name"] == "defectflow-docker"
        promoted = compose_stack.production_model(stack)
        models = prefect.models()  # the registry in the data dir, read on this machine
        assert [(m["tag"], m["stage"]) for m in models] == [(promoted, "production")], models

        served = compose_stack.serve(docker, stack)
        assert served["model"] == promoted
        png = sorted((data / "test" / "crack").glob("*.png"))[0].read_bytes()
        status, body = container.post_image(stack.serve_url, png)
        assert status == 200, body[:500]
        answer = json.loads(body)
        assert answer["model"] == promoted
        assert container.answer_problems(answer, 64, 64) == []

        memory = {
            row["service"]: _memory_mb(docker, row["name"])
            for row in compose_stack.containers(docker, project)
            if row["status"] == "running"
        }
        print(f"\nmemory of the stack's containers (MiB): {memory}")
        assert set(memory) == {"postgres", "prefect-server", "worker", "serve"}
    finally:
        left = compose_stack.down(docker, stack, volumes=True)
        docker("rmi", "--force", stack.serve_image, check=False)
    assert left == [], f"left after stack down: {left}"
    networks = docker.out("network", "ls", "--quiet", "--filter", f"name={stack.network}")
    assert networks == ""
