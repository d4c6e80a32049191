#!/usr/bin/env python3
"""The production stack of compose.yaml: built here, started, served, stopped.

    python scripts/compose_stack.py up     # images, then PostgreSQL, Prefect server, setup, worker (+ serve)
    python scripts/compose_stack.py serve  # the Bento container of the production model, (re)started
    python scripts/compose_stack.py down   # everything, the flow-run containers of its worker too
    python scripts/compose_stack.py status # its containers and their health

`up` makes what is missing (the local Debian base, the training image, the PostgreSQL image:
scripts/container.py, no registry), writes the variables compose.yaml reads (the data dir and
its owner, the docker socket's group, a PostgreSQL password kept in
$DEFECTFLOW_HOME/compose/db-password, the network, the ports), runs `docker-compose up -d` and
waits, bounded, until every service is healthy (setup: exited 0). When the registry has a
production model, the Bento container of it is built and started too (`serve`, also after a
promotion: a new model needs a new image).

Docker must run and stay running (the stack lives in it): `up` starts `dockerd` when none
answers and leaves it running. Debian's `docker-compose` (1.29) is used, or `docker compose`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "compose.yaml"
SERVICES = ("postgres", "prefect-server", "setup", "worker")
DEFAULT_PROJECT = "defectflow"

container = sys.modules.get("defectflow_container")
if container is None:
    _spec = importlib.util.spec_from_file_location(
        "defectflow_container", Path(__file__).with_name("container.py")
    )
    container = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = container  # dataclasses look their module up there
    _spec.loader.exec_module(container)


def log(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def compose_command() -> list[str]:
    """Debian's docker-compose, else the `docker compose` plugin."""
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose")]
    for docker in (shutil.which("docker"), "/usr/bin/docker"):
        if (
            docker
            and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
        ):
            return [docker, "compose"]
    raise container.EngineUnavailable(
        "no docker-compose: install Debian's docker-compose (`make host-packages` does)"
    )


@dataclass
class Stack:
    """One compose stack: its project name, data dir, ports and images."""

    project: str
    home: Path
    prefect_port: int = 4200
    serve_port: int = 3000
    train_image: str = "defectflow-train:latest"
    serve_image: str = "defectflow:latest"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def network(self) -> str:
        return f"{self.project}-net"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    def db_password(self) -> str:
        path = self.home / "compose" / "db-password"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(24))
            path.chmod(0o600)
        return path.read_text().strip()

    def env(self) -> dict[str, str]:
        socket_path = Path("/var/run/docker.sock")
        st = self.home.stat()
        return {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "DEFECTFLOW_HOME": str(self.home),
            "DEFECTFLOW_UID": str(st.st_uid),
            "DEFECTFLOW_GID": str(st.st_gid),
            "DOCKER_GID": str(socket_path.stat().st_gid if socket_path.exists() else 0),
            "DEFECTFLOW_DB_PASSWORD": self.db_password(),
            "STACK_NETWORK": self.network,
            "PREFECT_PORT": str(self.prefect_port),
            "SERVE_PORT": str(self.serve_port),
            "DEFECTFLOW_TRAIN_IMAGE": self.train_image,
            "DEFECTFLOW_SERVE_IMAGE": self.serve_image,
            **self.extra_env,
        }

    def compose(
        self, *args: str, timeout: float = 600, check: bool = True, profiles: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess:
        command = [*compose_command(), "--project-name", self.project, "--file", str(COMPOSE_FILE)]
        for profile in profiles:
            command += ["--profile", profile]
        done = subprocess.run(
            [*command, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command[-4:])} {' '.join(args)} exited {done.returncode}:\n"
                f"{(done.stdout + done.stderr)[-4000:]}"
            )
        return done


def containers(docker, project: str) -> list[dict]:
    """The containers of the compose project: name, service, state, health, exit code."""
    ids = docker.out(
        "ps", "--all", "--quiet", "--filter", f"label=com.docker.compose.project={project}"
    ).split()
    found = []
    for cid in ids:
        info = json.loads(docker.out("inspect", cid))[0]
        state = info["State"]
        found.append(
            {
                "id": cid,
                "name": info["Name"].lstrip("/"),
                "service": info["Config"]["Labels"].get("com.docker.compose.service", ""),
                "status": state["Status"],
                "health": (state.get("Health") or {}).get("Status"),
                "exit_code": state.get("ExitCode"),
                "memory": None,
            }
        )
    return found


def wait_healthy(docker, stack: Stack, services: tuple[str, ...], timeout: float = 600) -> None:
    """Until every service in `services` is healthy (setup: exited 0); bounded, with logs."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {c["service"]: c for c in containers(docker, stack.project)}
        pending = []
        for service in services:
            row = rows.get(service)
            if row is None:
                pending.append(f"{service}: no container")
            elif service == "setup":
                if row["status"] == "exited" and row["exit_code"] != 0:
                    raise RuntimeError(f"setup exited {row['exit_code']}:\n{logs(stack, 'setup')}")
                if row["status"] != "exited":
                    pending.append(f"setup: {row['status']}")
            elif row["health"] != "healthy":
                if row["status"] in ("exited", "dead"):
                    raise RuntimeError(f"{service} {row['status']}:\n{logs(stack, service)}")
                pending.append(f"{service}: {row['health'] or row['status']}")
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"not healthy within {timeout:.0f} s: {'; '.join(pending)}\n"
                + "".join(logs(stack, s) for s in services)
            )
        time.sleep(2)


def logs(stack: Stack, service: str, tail: int = 60) -> str:
    done = stack.compose("logs", "--no-color", "--tail", str(tail), service, check=False)
    return f"--- {service}\n{(done.stdout + done.stderr)[-4000:]}\n"


def ensure_images(docker, stack: Stack, rebuild: bool = False) -> dict:
    """The training and PostgreSQL images, built when missing (or with `rebuild`)."""
    state = stack.home / "compose"
    state.mkdir(parents=True, exist_ok=True)
    built = {}
    if rebuild or not docker.image_exists(stack.train_image):
        if stack.train_image != f"{container.TRAIN_REPOSITORY}:latest":
            raise RuntimeError(f"no image {stack.train_image}: build it (make image-train)")
        built["train"] = container.build_train_image(docker, log_file=state / "train-image.log")
    if rebuild or not docker.image_exists(container.POSTGRES_IMAGE):
        built["postgres"] = container.build_postgres_image(
            docker, log_file=state / "postgres-image.log"
        )
    return built


def production_model(stack: Stack) -> str | None:
    """The registry's production model in the stack's data dir (read on this machine)."""
    env = {**os.environ, "DEFECTFLOW_HOME": str(stack.home)}
    for key in ("BENTOML_HOME", "PREFECT_HOME", "KERAS_HOME"):
        env.pop(key, None)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from defectflow.environment import configure_environment; "
            "configure_environment(); from defectflow import registry; "
            "print(registry.production_tag() or '')",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"reading the registry failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else None


def serve(docker, stack: Stack, timeout: float = 300) -> dict:
    """Build the Bento container of the production model as `stack.serve_image` and (re)start
    the `serve` service on it; returns the model tag and the image."""
    tag = production_model(stack)
    if not tag:
        raise RuntimeError("no production model in the registry yet: train one first")
    env = {
        **os.environ,
        "DEFECTFLOW_HOME": str(stack.home),
        "BENTOML_HOME": str(stack.home / "bentoml"),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from defectflow.environment import configure_environment; "
            "configure_environment(); from defectflow import registry; from defectflow.config import REPO_ROOT; "
            "print(registry.build_bento(sys.argv[1], REPO_ROOT / 'bentofile.yaml', REPO_ROOT))",
            tag,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the Bento of {tag} failed:\n{done.stderr[-3000:]}")
    bento = done.stdout.strip().splitlines()[-1]
    figures = container.build_image(
        docker,
        bento,
        stack.serve_image,
        env=env,
        log_file=stack.home / "compose" / "containerize.log",
    )
    stack.compose("up", "-d", "--force-recreate", "serve", profiles=("serve",), timeout=300)
    wait_healthy(docker, stack, ("serve",), timeout=timeout)
    log(f"serve: {stack.serve_image} ({figures['model']}) healthy on {stack.serve_url}")
    return {"model": figures["model"], "image": stack.serve_image, "bento": bento}


def up(docker, stack: Stack, timeout: float = 600, with_serve: bool = True) -> dict:
    stack.home.mkdir(parents=True, exist_ok=True)
    built = ensure_images(docker, stack)
    start = time.monotonic()
    stack.compose("up", "-d", *SERVICES, timeout=timeout)
    wait_healthy(docker, stack, SERVICES, timeout=timeout)
    log(f"up in {time.monotonic() - start:.0f} s: Prefect UI http://127.0.0.1:{stack.prefect_port}")
    served = None
    if with_serve and production_model(stack):
        served = serve(docker, stack)
    elif with_serve:
        log("no production model yet: `scripts/compose_stack.py serve` after the first promotion")
    return {"built": built, "served": served}


def down(docker, stack: Stack, volumes: bool = False) -> list[str]:
    """Stop the worker, remove the flow-run containers it started (they are on the stack's
    network, by the label of the data dir), then the stack's containers and network (and its
    database volume with `volumes`). Returns what is left (nothing, normally)."""
    from defectflow.orchestration.stack import STACK_LABEL, stack_id

    stack.compose("stop", "--timeout", "20", "worker", check=False)
    label = f"label={STACK_LABEL}={stack_id(stack.home)}"
    ids = docker.out("ps", "--all", "--quiet", "--filter", label).split()
    if ids:
        docker("rm", "--force", *ids, check=False)
        log(f"removed {len(ids)} flow-run container(s)")
    args = ["down", "--remove-orphans", "--timeout", "20"]
    if volumes:
        args.append("--volumes")
    stack.compose(*args, profiles=("serve",), timeout=300)
    left = [c["name"] for c in containers(docker, stack.project)]
    return left + docker.out("ps", "--all", "--quiet", "--filter", label).split()


@contextlib.contextmanager
def lasting_engine():
    """A docker engine that outlives this command: dockerd is started (and left running) when
    none answers; then scripts/container.py's engine for the builds."""
    binary, _ = container.choose_client()
    answers, why = container._daemon_answers(binary)
    if not answers:
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if not os.access(dockerd, os.X_OK) or os.geteuid() != 0:
            raise container.EngineUnavailable(f"no docker daemon answers ({why}); start dockerd")
        state = Path(os.environ.get("DEFECTFLOW_HOME", REPO_ROOT / ".defectflow")) / "compose"
        state.mkdir(parents=True, exist_ok=True)
        with (state / "dockerd.log").open("ab") as out:
            proc = subprocess.Popen(
                [dockerd], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        log(f"started dockerd (pid {proc.pid}, log {state / 'dockerd.log'}); it keeps running")
        deadline = time.monotonic() + 90
        while not container._daemon_answers(binary)[0]:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise container.EngineUnavailable("dockerd did not come up within 90 s")
            time.sleep(0.5)
    with container.engine(
        Path(os.environ.get("DEFECTFLOW_HOME", REPO_ROOT / ".defectflow")) / "compose"
    ) as docker:
        yield docker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("up", "serve", "down", "status"))
    parser.add_argument("--project", default=DEFAULT_PROJECT, help="compose project name")
    parser.add_argument(
        "--prefect-port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200))
    )
    parser.add_argument("--serve-port", type=int, default=int(os.environ.get("SERVE_PORT", 3000)))
    parser.add_argument(
        "--volumes", action="store_true", help="down: remove the database volume too"
    )
    args = parser.parse_args(argv)
    home = Path(os.environ.get("DEFECTFLOW_HOME", REPO_ROOT / ".defectflow")).resolve()
    stack = Stack(args.project, home, args.prefect_port, args.serve_port)
    try:
        with lasting_engine() as docker:
            if args.command == "up":
                up(docker, stack)
            elif args.command == "serve":
                serve(docker, stack)
            elif args.command == "down":
                left = down(docker, stack, volumes=args.volumes)
                if left:
                    raise RuntimeError(f"still there after down: {left}")
                log(f"stack {stack.project} is down")
            else:
                for row in containers(docker, stack.project):
                    print(f"{row['service']:15} {row['status']:10} {row['health'] or ''}")
    except container.EngineUnavailable as exc:
        print(f"container engine unavailable: {exc}", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
