"""The local orchestration stack: a Prefect server, the work pools, the deployments of
prefect.yaml and a process worker, started and stopped as processes.

`up` records what it started (PIDs, commands, address) in <home>/stack/stack.json and `down`
stops exactly those processes, each with its process group (a worker's flow runs go with it),
after checking the PID still runs the command it started. Both are idempotent: `up` starts only
what is missing, `down` with nothing running does nothing. The server keeps its SQLite database
under PREFECT_HOME; set PREFECT_API_DATABASE_CONNECTION_URL for PostgreSQL.

This module drives the `prefect` command line; it imports nothing of Prefect.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from defectflow.config import REPO_ROOT
from defectflow.files import atomic_write

WORK_POOLS = ("defectflow", "defectflow-gpu")  # the names prefect.yaml's deployments use
LOCAL_POOL = "defectflow"


class StackError(RuntimeError):
    """The stack could not be brought up or down; the message says what and where the log is."""


@dataclass
class StackState:
    api_url: str
    processes: dict[str, dict] = field(default_factory=dict)  # name -> {"pid", "command", "log"}

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
    return StackState(api_url=data["api_url"], processes=data.get("processes", {}))


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
    )
    return env


def up(
    home: Path,
    host: str = "127.0.0.1",
    port: int = 4200,
    deploy: bool = True,
    worker: bool = True,
    startup_timeout: float = 180.0,
    say=print,
) -> StackState:
    """Start what is not running yet: server, work pools and deployments, worker."""
    state = read_state(home)
    api_url = f"http://{host}:{port}/api"
    if state is not None and is_running(state.processes.get("server", {})):
        api_url = state.api_url  # keep talking to the server that runs
    else:
        if healthy(api_url):
            raise StackError(
                f"something else already answers on {api_url}: stop it, or choose another --port"
            )
        state = StackState(api_url=api_url)
    env = stack_env(api_url)
    server = state.processes.get("server", {})
    if is_running(server):
        say(f"server already running (pid {server['pid']})")
    else:
        host_port = api_url.removeprefix("http://").removesuffix("/api")
        server_host, server_port = host_port.rsplit(":", 1)
        server, process = _start(
            "server",
            [_prefect(), "server", "start", "--host", server_host, "--port", server_port],
            env,
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
        say(f"server started (pid {server['pid']}, log {server['log']})")
    if deploy:
        for pool in WORK_POOLS:
            if not _pool_exists(api_url, pool):
                _run(
                    [_prefect(), "--no-prompt", "work-pool", "create", pool, "--type", "process"],
                    env,
                    f"creating work pool {pool}",
                )
                say(f"work pool {pool} created")
        _run([_prefect(), "--no-prompt", "deploy", "--all"], env, "applying prefect.yaml")
        say("deployments applied from prefect.yaml")
    if worker:
        record = state.processes.get("worker", {})
        if is_running(record):
            say(f"worker already running (pid {record['pid']})")
        else:
            record, _ = _start(
                "worker",
                [_prefect(), "worker", "start", "--pool", LOCAL_POOL, "--type", "process"],
                env,
                home,
            )
            state.processes["worker"] = record
            say(f"worker started on pool {LOCAL_POOL} (pid {record['pid']}, log {record['log']})")
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
    """Stop what `up` started (worker first, then server); returns the names stopped."""
    state = read_state(home)
    if state is None:
        say("nothing to stop: the stack is not running")
        return []
    stopped = []
    for name in ("worker", "server"):
        record = state.processes.get(name)
        if record and _stop(record, grace):
            stopped.append(name)
            say(f"{name} stopped (pid {record['pid']})")
        elif record:
            say(f"{name} was not running (pid {record['pid']})")
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
