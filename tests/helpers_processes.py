"""Servers the integration tests start as subprocesses, on 127.0.0.1 only, always stopped; and
the repository's stand-alone scripts (scripts/, benchmarks/) loaded as modules."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def load_file_module(folder: str, name: str):
    """<folder>/<name>.py of the repository (scripts/ and benchmarks/ are not packages), freshly
    loaded as module `name`."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def isolated_env(home: Path) -> dict[str, str]:
    """This process's environment with every state folder under `home` (a fresh store, no
    Prefect server) and telemetry off: for a subprocess that must not see the test session's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEFECTFLOW_", "BENTOML_", "PREFECT_", "KERAS_"))
    }
    env.update(
        DEFECTFLOW_HOME=str(home),
        BENTOML_HOME=str(home / "bentoml"),
        KERAS_HOME=str(home / "keras"),
        BENTOML_DO_NOT_TRACK="true",
        DO_NOT_TRACK="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> float:
    """Poll `url` until it answers 200; fail the test if the process dies or time runs out."""
    start = time.monotonic()
    tail = (lambda: "\n" + log.read_text()[-3000:]) if log else (lambda: "")
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{' '.join(map(str, proc.args[:3]))} exited {proc.returncode}" + tail())
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        if time.monotonic() - start > timeout:
            pytest.fail(f"{url} did not answer within {timeout} s" + tail())
        time.sleep(0.25)


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, with its whole process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def running(
    command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO_ROOT
) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )  # own process group: stop() reaches workers
    try:
        yield proc
    finally:
        stop(proc)


@dataclass(frozen=True)
class ServedBento:
    """A running `bentoml serve`: its URL, the pid of its process tree's root, its log."""

    url: str
    pid: int
    log: Path


@contextmanager
def served_bento(
    target: str,
    env: dict[str, str],
    log: Path,
    timeout: float = 120,
    python: Path | None = None,
    cwd: Path = REPO_ROOT,
) -> Iterator[ServedBento]:
    """`bentoml serve target` on a free port until /readyz answers. With `python`, BentoML
    runs in that interpreter (`python -m bentoml`)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bentoml = [str(python), "-m", "bentoml"] if python else [str(BIN / "bentoml")]
    command = [*bentoml, "serve", str(target), "--host", "127.0.0.1", "--port", str(port)]
    with running(command, env, log, cwd=cwd) as proc:
        seconds = wait_http(f"{url}/readyz", proc, timeout, log)
        print(f"\n{target} ready in {seconds:.1f} s")
        yield ServedBento(url=url, pid=proc.pid, log=log)


@contextmanager
def serve_bento(
    target: str,
    env: dict[str, str],
    log: Path,
    timeout: float = 120,
    python: Path | None = None,
    cwd: Path = REPO_ROOT,
) -> Iterator[str]:
    """served_bento, yielding only its URL."""
    with served_bento(target, env, log, timeout, python, cwd) as served:
        yield served.url


@dataclass(frozen=True)
class PrefectServer:
    """A `prefect server start` subprocess: its base URL (the UI), API URL, home and log."""

    url: str
    home: Path
    log: Path

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def client_env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` for a subprocess that is to run its flows on this server."""
        return {**env, "PREFECT_API_URL": self.api_url}


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A PostgreSQL cluster of Debian's postgresql for one Prefect server, in a fresh folder
    of /var/tmp (as root it runs as `postgres`, which cannot enter pytest's private tmp
    dirs); yields its connection URL; stopped and removed on exit."""
    import shutil
    import tempfile

    from defectflow.orchestration import postgres

    folder = Path(tempfile.mkdtemp(prefix="defectflow-pg-", dir="/var/tmp"))
    folder.chmod(0o711)
    try:
        cluster = postgres.start(folder / "cluster")
        try:
            yield cluster.url()
        finally:
            postgres.stop(cluster.directory)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def prefect_server(root: Path, timeout: float = 180) -> Iterator[PrefectServer]:
    """`prefect server start` on a free 127.0.0.1 port, with its PREFECT_HOME (database, UI
    build) and log under `root`, until /api/health answers; stopped on exit. The UI is told
    its own API URL (else it calls 127.0.0.1:4200). With DEFECTFLOW_TEST_DATABASE=postgres its
    database is a PostgreSQL cluster of its own (postgres_cluster), else SQLite."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = isolated_env(root / "home")
    (root / "home" / "prefect").mkdir(parents=True, exist_ok=True)
    env.update(
        PREFECT_HOME=str(root / "home" / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=f"{url}/api",
    )
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = root / "prefect-server.log"
    with contextlib.ExitStack() as stack:
        if os.environ.get("DEFECTFLOW_TEST_DATABASE") == "postgres":
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = stack.enter_context(postgres_cluster())
        proc = stack.enter_context(running(command, env, log))
        seconds = wait_http(f"{url}/api/health", proc, timeout, log)
        print(f"\nprefect server ready in {seconds:.1f} s at {url} (log: {log})")
        yield PrefectServer(url=url, home=root / "home" / "prefect", log=log)
