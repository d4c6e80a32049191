"""A `defectflow up` stack for the orchestration tests: its CLI, its Prefect API, and runs
triggered as the UI's "Run" button does (tests/flows/test_orchestration.py on the process pool,
tests/orchestration/test_docker_pool.py on the Docker pool).

DEFECTFLOW_TEST_DATABASE=postgres (`make test-postgres`) puts every such stack's Prefect server
on PostgreSQL (`defectflow up --database postgres`: a cluster of Debian's postgresql in the
stack's data dir), the session's server too (helpers_processes.prefect_server)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from helpers_processes import BIN, REPO_ROOT, isolated_env

DATABASE_ENV = "DEFECTFLOW_TEST_DATABASE"

# run_deployment is what the UI's "Run" button amounts to: a flow run of the deployment,
# with these parameters, for a worker of its pool to pick up.
RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=0)
print(run.id)
"""
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
TINY = ["tune.epochs=1", "train.epochs=1", "package.build_bento=false"]


def database_kind() -> str:
    """The database the tests' Prefect servers use: sqlite (default) or postgres."""
    kind = os.environ.get(DATABASE_ENV, "sqlite") or "sqlite"
    if kind not in ("sqlite", "postgres"):
        raise pytest.UsageError(f"{DATABASE_ENV}={kind!r}: sqlite or postgres")
    return kind


@contextmanager
def reachable_dir(prefix: str) -> Iterator[Path]:
    """A fresh folder that other users may enter (not list): PostgreSQL runs as `postgres`
    when the tests run as root, and pytest's tmp dirs are private to their owner."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(stat.S_IRWXU | stat.S_IXGRP | stat.S_IXOTH)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Stack:
    def __init__(self, home: Path, port: int, up_args: tuple[str, ...] = ()):
        self.home, self.port = home, port
        self.env = isolated_env(home)
        self.api = f"http://127.0.0.1:{port}/api"
        self.up_args = up_args
        if database_kind() == "postgres" and "--database" not in up_args:
            self.up_args = (*up_args, "--database", "postgres")

    @property
    def database(self) -> str:
        """sqlite or postgres: the database `up` gives this stack's Prefect server."""
        args = list(self.up_args)
        return args[args.index("--database") + 1] if "--database" in args else "sqlite"

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "defectflow"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
        )

    def up(self, *extra: str) -> subprocess.CompletedProcess:
        result = self.cli("up", "--port", str(self.port), *self.up_args, *extra)
        assert result.returncode == 0, result.stdout + result.stderr + self.logs()
        return result

    def state(self) -> dict:
        return json.loads((self.home / "stack" / "stack.json").read_text())

    def logs(self) -> str:
        return "".join(
            f"\n--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted((self.home / "stack").glob("*.log"))
        )

    def get(self, path: str) -> dict:
        response = httpx.get(f"{self.api}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> dict | list:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def trigger(self, deployment: str, parameters: dict) -> str:
        result = subprocess.run(
            [sys.executable, "-c", RUN_DEPLOYMENT, deployment, json.dumps(parameters)],
            env={**self.env, "PREFECT_API_URL": self.api},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.strip().splitlines()[-1]

    def wait(self, run_id: str, states: set[str] = FINAL, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(f"/flow_runs/{run_id}")
            if run["state_type"] in states:
                return run
            if time.monotonic() > deadline:
                pytest.fail(
                    f"flow run {run_id} still {run['state_type']} after {timeout} s" + self.logs()
                )
            time.sleep(1)

    def run(self, deployment: str, parameters: dict, timeout: float = 600) -> dict:
        return self.wait(self.trigger(deployment, parameters), timeout=timeout)

    def retry(self, run_id: str) -> None:
        """The UI's "Retry" on a finished run: the same flow run, scheduled again."""
        self.post(
            f"/flow_runs/{run_id}/set_state",
            {
                "state": {
                    "type": "SCHEDULED",
                    "name": "AwaitingRetry",
                    "message": "retried (test)",
                },
                "force": True,
            },
        )

    def states(self, run_id: str) -> list[dict]:
        return httpx.get(
            f"{self.api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=30
        ).json()

    def artifacts(self, run_id: str) -> dict[str, dict]:
        found = self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        return {a["key"]: a for a in found if a.get("key")}

    def models(self) -> list[dict]:
        result = self.cli("models", "list", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def task_run(self, run_id: str, prefix: str) -> dict | None:
        """The flow run's latest task run whose name or key starts with `prefix`."""
        tasks = self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
        key = prefix.replace("-", "_")
        found = [t for t in tasks if t["task_key"].startswith(key) or t["name"].startswith(prefix)]
        return found[-1] if found else None

    def down(self) -> None:
        self.cli("down", timeout=180)
        leftover = (
            [
                name
                for name, record in self.state().get("processes", {}).items()
                if alive(record["pid"])
            ]
            if (self.home / "stack" / "stack.json").exists()
            else []
        )
        assert not leftover, f"still running after `defectflow down`: {leftover}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
