"""The local orchestration stack: a Prefect server (SQLite, or PostgreSQL), the work pools, the
deployments of prefect.yaml and workers (a process worker, or Docker workers), started and
stopped as processes.

`up` records what it started (PIDs, commands, address) in <home>/stack/stack.json and `down`
stops exactly those processes, each with its process group (a process worker's flow runs go
with it), after checking the PID still runs the command it started; then the flow-run
containers of this stack's Docker workers (by their label) and the PostgreSQL cluster it
started. Both are idempotent: `up` starts only what is missing, `down` with nothing running
does nothing.

Database: SQLite under PREFECT_HOME by default; `database="postgres"` starts a cluster of
Debian's postgresql under <home>/postgres (`defectflow.orchestration.postgres`), or
`database_url` points the server at a PostgreSQL someone else runs.

Pools: `pool="process"` runs `training-pipeline` and `nightly-retrain` on the process pool
`defectflow` (prefect.yaml as it is); `pool="docker"` creates the Docker pool
`defectflow-docker` (prefect-docker) whose flow runs are containers of the local training
image (never pulled), with the data dir mounted at the same path, runs as its owner, and
re-applies those two deployments to it (the others stay on the process pool). Flow runs send
heartbeats every HEARTBEAT_SECONDS and an automation marks a run Crashed when ZOMBIE_AFTER
seconds pass without one (a machine, worker or container that vanished).

This module drives the `prefect` and `docker` command lines and the server's REST API; it
imports nothing of Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from defectflow.config import REPO_ROOT
from defectflow.files import atomic_write
from defectflow.orchestration import postgres

WORK_POOLS = ("defectflow", "defectflow-gpu")  # the names prefect.yaml's deployments use
LOCAL_POOL = "defectflow"
DOCKER_POOL = "defectflow-docker"
POOLS = ("process", "docker")
DATABASES = ("sqlite", "postgres")
#: The deployments `pool="docker"` moves to the Docker pool (the others stay on the process
#: pool: they read and write the registry only).
DOCKER_DEPLOYMENTS = ("training-pipeline", "nightly-retrain")
#: The training image of `make image-train` (scripts/container.py).
DEFAULT_IMAGE = "defectflow-train:latest"
#: Seconds between a flow run's heartbeats (Prefect's minimum is 30) ...
HEARTBEAT_SECONDS = 30
#: ... and without one after which the zombie automation marks the run Crashed.
ZOMBIE_AFTER = 90
ZOMBIE_AUTOMATION = "defectflow: crash flow runs without heartbeat"
#: The label of the flow-run containers of one stack (value: stack_id(home)).
STACK_LABEL = "org.defectflow.stack"


class StackError(RuntimeError):
    """The stack could not be brought up or down; the message says what and where the log is."""


@dataclass
class StackState:
    api_url: str
    processes: dict[str, dict] = field(default_factory=dict)  # name -> {"pid", "command", "log"}
    pool: str = "process"
    database: dict = field(
        default_factory=lambda: {"kind": "sqlite"}
    )  # kind, url (no password), cluster

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")


def stack_dir(home: Path) -> Path:
    return home / "stack"


def _state_file(home: Path) -> Path:
    return stack_dir(home) / "stack.json"


def read_state(home: Path) -> StackState | None:
    path = _state_file(home)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return StackState(
        api_url=data["api_url"],
        processes=data.get("processes", {}),
        pool=data.get("pool", "process"),
        database=data.get("database", {"kind": "sqlite"}),
    )


def _write_state(home: Path, state: StackState) -> None:
    atomic_write(_state_file(home), json.dumps(asdict(state), indent=2).encode())


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def is_running(record: dict) -> bool:
    """The recorded PID is alive and still runs the command we started (PIDs get reused)."""
    pid = record.get("pid")
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, TypeError):
        return False
    if (
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    ):  # exited, not reaped
        return False
    args = [part.decode(errors="replace") for part in cmdline if part]
    command = record["command"]
    # `prefect ...` runs as `python .../prefect ...`: compare the program name and the arguments.
    return args[-len(command) + 1 :] == command[1:] and any(
        a.endswith(Path(command[0]).name) for a in args
    )


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _pool_exists(api_url: str, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/work_pools/{name}", timeout=10):
            return True
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise StackError(
            f"asking the server about work pool {name} failed: HTTP {exc.code}"
        ) from exc


def _start(name: str, command: list[str], env: dict, home: Path) -> tuple[dict, subprocess.Popen]:
    log = stack_dir(home) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # Its own session: it outlives this command, and `down` can stop it with its children.
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    return {"pid": process.pid, "command": command, "log": str(log)}, process


def _tail(path: str | Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run(command: list[str], env: dict, what: str) -> str:
    result = subprocess.run(
        command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        raise StackError(
            f"{what} failed ({' '.join(command[1:])}):\n{(result.stdout + result.stderr)[-3000:]}"
        )
    return result.stdout


def stack_env(api_url: str) -> dict:
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_UI_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        # Flow runs (the process worker's, which inherit this) send heartbeats.
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_SECONDS),
    )
    return env


def stack_id(home: Path) -> str:
    """A short name of the stack of `home`: the label value of its flow-run containers."""
    return hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- docker


def _docker_client(timeout: float = 60):
    """A client of the Docker daemon (DOCKER_HOST or the local socket), through the `docker`
    package prefect-docker brings; StackError when none answers."""
    try:
        import docker
    except ImportError:
        raise StackError(
            "the Docker pool needs prefect-docker: pip install -e '.[docker]' (`make install` does)"
        ) from None
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        raise StackError(f"no Docker daemon answers ({exc}): start dockerd") from None
    return client


def check_docker(image: str) -> None:
    """The daemon answers and `image` is there (the Docker pool never pulls); else a clear error."""
    import docker

    client = _docker_client()
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise StackError(
            f"no image {image} here, and the Docker pool never pulls one: "
            "build it with `make image-train`"
        ) from None
    finally:
        client.close()


def data_owner(home: Path) -> str:
    """uid:gid of the data dir: flow-run containers run as it, so what they write there has
    the same owner as what this machine's processes write."""
    st = Path(home).stat()
    return f"{st.st_uid}:{st.st_gid}"


def flow_run_env(home: Path) -> dict[str, str]:
    """The environment of a flow-run container: every state folder in the shared data dir, at
    the same path as on this machine, heartbeats on, telemetry off."""
    home = Path(home).resolve()
    return {
        "DEFECTFLOW_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "BENTOML_HOME": str(home / "bentoml"),
        "KERAS_HOME": str(home / "keras"),
        "MPLCONFIGDIR": str(home / "matplotlib"),
        "HOME": "/tmp",  # the data dir's owner may have no home in the image
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
        "PREFECT_LOGGING_EXTRA_LOGGERS": "defectflow",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "BENTOML_DO_NOT_TRACK": "true",
    }


def docker_job_defaults(home: Path, image: str = DEFAULT_IMAGE, network: str | None = None) -> dict:
    """The defaults of the Docker pool's job variables: the local training image, never pulled;
    the data dir mounted at its own path; the host's network (the server on 127.0.0.1), or
    `network` (a compose stack's); the data dir's owner as user; labelled with the stack."""
    home = Path(home).resolve()
    return {
        "image": image,
        "image_pull_policy": "Never",
        "volumes": [f"{home}:{home}"],
        "env": flow_run_env(home),
        "labels": {STACK_LABEL: stack_id(home)},
        "network_mode": None if network else "host",
        "networks": [network] if network else [],
        "auto_remove": True,
        "stream_output": True,
        "container_create_kwargs": {"user": data_owner(home)},
    }


def docker_base_job_template(env: dict, defaults: dict) -> dict:
    """prefect-docker's default base job template with `defaults` as the variables' defaults."""
    with tempfile.TemporaryDirectory(prefix="defectflow-pool-") as tmp:
        path = Path(tmp) / "docker.json"
        _run(
            [
                _prefect(),
                "--no-prompt",
                "work-pool",
                "get-default-base-job-template",
                "--type",
                "docker",
                "--file",
                str(path),
            ],
            env,
            "reading the Docker pool's default job template (is prefect-docker installed?)",
        )
        template = json.loads(path.read_text())
    properties = template["variables"]["properties"]
    unknown = sorted(set(defaults) - set(properties))
    if unknown:
        raise StackError(f"prefect-docker's job template has no variable(s) {unknown}")
    for key, value in defaults.items():
        properties[key]["default"] = value
    return template


def _ensure_pool(
    api_url: str, env: dict, name: str, kind: str, template: dict | None = None
) -> str:
    """Create the pool, or (with a template) update the job template of an existing one."""
    exists = _pool_exists(api_url, name)
    if exists and template is None:
        return "exists"
    command = [_prefect(), "--no-prompt", "work-pool", "update" if exists else "create", name]
    if not exists:
        command += ["--type", kind]
    with tempfile.TemporaryDirectory(prefix="defectflow-pool-") as tmp:
        if template is not None:
            path = Path(tmp) / "template.json"
            path.write_text(json.dumps(template))
            command += ["--base-job-template", str(path)]
        _run(command, env, f"{'updating' if exists else 'creating'} work pool {name}")
    return "updated" if exists else "created"


def docker_prefect_file(home: Path, pool: str = DOCKER_POOL) -> Path:
    """prefect.yaml's DOCKER_DEPLOYMENTS moved to `pool`: entrypoints as module paths of the
    installed package and no pull step (a container has no checkout of this machine's)."""
    import yaml

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    chosen = []
    for deployment in spec["deployments"]:
        if deployment["name"] not in DOCKER_DEPLOYMENTS:
            continue
        path, function = deployment["entrypoint"].split(":")
        module = "defectflow.orchestration." + path.removesuffix(".py").replace("/", ".")
        chosen.append(
            {
                **deployment,
                "entrypoint": f"{module}.{function}",
                "pull": [],
                "work_pool": {"name": pool, "work_queue_name": "default", "job_variables": {}},
            }
        )
    missing = set(DOCKER_DEPLOYMENTS) - {d["name"] for d in chosen}
    if missing:
        raise StackError(f"prefect.yaml has no deployment(s) {sorted(missing)}")
    out = stack_dir(home) / "prefect-docker.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "# Generated by `defectflow up --pool docker` from prefect.yaml: do not edit.\n"
    out.write_text(
        header
        + yaml.safe_dump(
            {
                "name": spec["name"],
                "prefect-version": spec["prefect-version"],
                "deployments": chosen,
            },
            sort_keys=False,
        )
    )
    return out


def stack_containers(home: Path, remove: bool = False) -> list[str]:
    """Names of the flow-run containers of this stack (running or not), removed with
    `remove`; empty when no Docker daemon answers (nothing of ours can run then)."""
    try:
        client = _docker_client(timeout=30)
    except StackError:
        return []
    try:
        found = client.containers.list(
            all=True, filters={"label": f"{STACK_LABEL}={stack_id(home)}"}
        )
        for container in found if remove else ():
            with contextlib.suppress(Exception):  # gone meanwhile (auto_remove)
                container.remove(force=True)
        return [c.name for c in found]
    finally:
        client.close()


# --------------------------------------------------------------------------- zombies


def _api(api_url: str, method: str, path: str, body: dict | None = None) -> dict | list:
    request = urllib.request.Request(
        f"{api_url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
    except urllib.error.HTTPError as exc:
        raise StackError(
            f"{method} {path} answered HTTP {exc.code}: {exc.read()[:1000]!r}"
        ) from exc
    return json.loads(text) if text else {}


def zombie_automation(within: int = ZOMBIE_AFTER) -> dict:
    """Prefect's "detect zombie flows" automation: a flow run that sent a heartbeat and then,
    for `within` seconds, neither another one nor a final state is set Crashed."""
    return {
        "name": ZOMBIE_AUTOMATION,
        "description": (
            f"A flow run without a heartbeat for {within} s (its machine, worker or container "
            "vanished) is Crashed; Retry runs it again on a worker that lives."
        ),
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["prefect.flow-run.heartbeat"],
            "expect": [
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            ],
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": within,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "name": "Crashed",
                "message": f"no heartbeat for {within} s: the flow run's machine, worker or container vanished",
            }
        ],
    }


def ensure_zombie_automation(api_url: str, within: int = ZOMBIE_AFTER) -> str:
    wanted = zombie_automation(within)
    existing = [
        a
        for a in _api(api_url, "POST", "/automations/filter", {})
        if a.get("name") == ZOMBIE_AUTOMATION
    ]
    if existing:
        have = existing[0]
        if have["trigger"].get("within") == within and have.get("enabled"):
            return "exists"
        _api(api_url, "PUT", f"/automations/{have['id']}", wanted)
        return "updated"
    _api(api_url, "POST", "/automations/", wanted)
    return "created"


def _database(
    home: Path, state: StackState, database: str, database_url: str | None, say
) -> dict[str, str]:
    """The server's database settings (environment), starting the cluster when asked."""
    if database_url:
        url = postgres.connection_url(database_url)
        postgres.ensure_database(url)
        state.database = {"kind": "postgres", "url": postgres.redact(url)}
        return {"PREFECT_API_DATABASE_CONNECTION_URL": url}
    if database == "postgres":
        cluster = postgres.start(home / "postgres")
        say(f"PostgreSQL running on 127.0.0.1:{cluster.port} (cluster {cluster.directory})")
        state.database = {
            "kind": "postgres",
            "url": postgres.redact(cluster.url()),
            "cluster": str(cluster.directory),
        }
        return {"PREFECT_API_DATABASE_CONNECTION_URL": cluster.url()}
    if database != "sqlite":
        raise StackError(f"database {database!r}: choose one of {', '.join(DATABASES)}")
    state.database = {"kind": "sqlite"}
    return {}


def up(
    home: Path,
    host: str = "127.0.0.1",
    port: int = 4200,
    deploy: bool = True,
    worker: bool = True,
    startup_timeout: float = 180.0,
    say=print,
    pool: str = "process",
    docker_workers: int = 1,
    database: str = "sqlite",
    database_url: str | None = None,
    image: str = DEFAULT_IMAGE,
    server_url: str | None = None,
    docker_network: str | None = None,
) -> StackState:
    """Start what is not running yet: database, server, work pools and deployments, workers.

    `pool`: "process" (a process worker on `defectflow`) or "docker" (`docker_workers` Docker
    workers on `defectflow-docker`, each one flow run at a time). `server_url`: configure a
    server someone else runs (no server, no database here). `docker_network`: the network of
    the flow-run containers instead of the host's (a compose stack)."""
    if pool not in POOLS:
        raise StackError(f"pool {pool!r}: choose one of {', '.join(POOLS)}")
    if database not in DATABASES:
        raise StackError(f"database {database!r}: choose one of {', '.join(DATABASES)}")
    if docker_workers < 1:
        raise StackError(f"docker workers: {docker_workers}, at least 1")
    if pool == "docker":
        check_docker(image)
    home = Path(home).resolve()
    state = read_state(home)
    if server_url:
        api_url = server_url.rstrip("/").removesuffix("/api") + "/api"
        if not healthy(api_url, timeout=10):
            raise StackError(f"no Prefect server answers on {api_url}")
        if state is None or state.api_url != api_url:
            state = StackState(api_url=api_url)
    else:
        api_url = f"http://{host}:{port}/api"
        if state is not None and is_running(state.processes.get("server", {})):
            api_url = state.api_url  # keep talking to the server that runs
        else:
            if healthy(api_url):
                raise StackError(
                    f"something else already answers on {api_url}: stop it, or choose another --port"
                )
            state = StackState(api_url=api_url)
    state.pool = pool
    env = stack_env(api_url)
    server = state.processes.get("server", {})
    if server_url:
        say(f"using the Prefect server at {api_url}")
    elif is_running(server):
        say(f"server already running (pid {server['pid']})")
    else:
        try:
            server_env = {**env, **_database(home, state, database, database_url, say)}
        except postgres.PostgresError as exc:
            raise StackError(str(exc)) from exc
        host_port = api_url.removeprefix("http://").removesuffix("/api")
        server_host, server_port = host_port.rsplit(":", 1)
        server, process = _start(
            "server",
            [_prefect(), "server", "start", "--host", server_host, "--port", server_port],
            server_env,
            home,
        )
        state.processes["server"] = server
        _write_state(home, state)
        deadline = time.monotonic() + startup_timeout
        while not healthy(api_url):
            problem = (
                "exited while starting"
                if process.poll() is not None
                else f"did not answer on {api_url} within {startup_timeout:.0f} s"
                if time.monotonic() > deadline
                else None
            )
            if problem:
                _stop(server, grace=5)
                state.processes.pop("server")
                _write_state(home, state)
                raise StackError(
                    f"the Prefect server {problem}; log {server['log']}:\n{_tail(server['log'])}"
                )
            time.sleep(0.5)
        say(
            f"server started on {state.database['kind']} (pid {server['pid']}, log {server['log']})"
        )
    if deploy:
        for name in WORK_POOLS:
            if _ensure_pool(api_url, env, name, "process") == "created":
                say(f"work pool {name} created")
        _run([_prefect(), "--no-prompt", "deploy", "--all"], env, "applying prefect.yaml")
        say("deployments applied from prefect.yaml")
        if pool == "docker":
            template = docker_base_job_template(
                env, docker_job_defaults(home, image, docker_network)
            )
            done = _ensure_pool(api_url, env, DOCKER_POOL, "docker", template)
            say(f"work pool {DOCKER_POOL} (docker, image {image}, never pulled) {done}")
            _run(
                [
                    _prefect(),
                    "--no-prompt",
                    "deploy",
                    "--all",
                    "--prefect-file",
                    str(docker_prefect_file(home)),
                ],
                env,
                "applying the Docker pool's deployments",
            )
            say(f"deployments {', '.join(DOCKER_DEPLOYMENTS)} on the Docker pool {DOCKER_POOL}")
        say(
            f"zombie detection (no heartbeat for {ZOMBIE_AFTER} s: Crashed) "
            f"{ensure_zombie_automation(api_url)}"
        )
    if worker:
        # The process worker runs what stays on the process pool (evaluate, promote); with
        # pool="docker" the Docker workers run the training flows.
        wanted = {
            "worker": [_prefect(), "worker", "start", "--pool", LOCAL_POOL, "--type", "process"]
        }
        if pool == "docker":
            wanted.update(
                {
                    f"docker-worker-{i}": [
                        _prefect(),
                        "worker",
                        "start",
                        "--pool",
                        DOCKER_POOL,
                        "--type",
                        "docker",
                        "--name",
                        f"{DOCKER_POOL}-{stack_id(home)}-{i}",
                        "--limit",
                        "1",
                    ]
                    for i in range(1, docker_workers + 1)
                }
            )
        for name, command in wanted.items():
            record = state.processes.get(name, {})
            if is_running(record):
                say(f"{name} already running (pid {record['pid']})")
                continue
            record, _ = _start(name, command, env, home)
            state.processes[name] = record
            say(f"{name} started on pool {command[4]} (pid {record['pid']}, log {record['log']})")
    if not server_url:  # a server someone else runs is theirs to record (a compose stack)
        _write_state(home, state)
    return state


def _stop(record: dict, grace: float) -> bool:
    if not is_running(record):
        return False
    pid = record["pid"]
    try:
        os.killpg(pid, signal.SIGTERM)  # the process group: a worker's flow runs stop with it
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while is_running(record) and time.monotonic() < deadline:
        time.sleep(0.2)
    if is_running(record):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


def down(home: Path, grace: float = 20.0, say=print) -> list[str]:
    """Stop what `up` started: workers, this stack's flow-run containers, the server, the
    PostgreSQL cluster; returns the names stopped."""
    home = Path(home).resolve()
    state = read_state(home)
    if state is None:
        say("nothing to stop: the stack is not running")
        return []
    stopped = []

    def stop(name: str) -> None:
        record = state.processes[name]
        if _stop(record, grace):
            stopped.append(name)
            say(f"{name} stopped (pid {record['pid']})")
        else:
            say(f"{name} was not running (pid {record['pid']})")

    for name in [n for n in state.processes if n != "server"]:  # workers first
        stop(name)
    containers = stack_containers(home, remove=True)
    if containers:
        stopped.append("flow-run containers")
        say(f"{len(containers)} flow-run container(s) of this stack removed")
    if "server" in state.processes:
        stop("server")
    cluster = state.database.get("cluster")
    if cluster:
        try:
            if postgres.stop(Path(cluster)):
                stopped.append("postgres")
                say(f"PostgreSQL stopped (cluster {cluster})")
        except postgres.PostgresError as exc:
            say(f"PostgreSQL could not be stopped: {exc}")
    _state_file(home).unlink(missing_ok=True)
    return stopped


def status(home: Path) -> dict:
    state = read_state(home)
    if state is None:
        return {"running": False}
    return {
        "running": True,
        "api_url": state.api_url,
        "ui_url": state.ui_url,
        "pool": state.pool,
        "database": state.database,
        "containers": len(stack_containers(home)),
        "healthy": healthy(state.api_url),
        "processes": {
            name: {**record, "running": is_running(record)}
            for name, record in state.processes.items()
        },
    }


def use_server(api_url: str | None) -> None:
    """Point the project's Prefect profile (under PREFECT_HOME) at `api_url`, or back to a
    temporary local server (None), so `defectflow train` and friends report to the UI."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    command = (
        ["config", "set", f"PREFECT_API_URL={api_url}"]
        if api_url
        else ["config", "unset", "PREFECT_API_URL"]
    )
    try:
        _run([_prefect(), "--no-prompt", *command], env, "updating the Prefect profile")
    except StackError as exc:
        if api_url or "is not set" not in str(exc):  # unsetting what is not set is done already
            raise
