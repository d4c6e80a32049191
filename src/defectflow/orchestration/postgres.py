"""PostgreSQL for the Prefect server: a cluster of Debian's `postgresql` in a folder of the
project data dir, or a server someone else runs (a URL).

`start` runs `initdb` once (a generated password, scram-sha-256, TCP on 127.0.0.1 only, the
Unix socket in the cluster's own folder) and `pg_ctl start`; `stop` is `pg_ctl stop -m fast`.
PostgreSQL refuses to run as root: as root the cluster belongs to, and runs as, the system
user `postgres` that Debian's package creates, which must be able to reach the folder.

`connection_url` is what Prefect's server reads from PREFECT_API_DATABASE_CONNECTION_URL:
`postgresql+asyncpg://...` (asyncpg comes with prefect). `ensure_database` creates the
database a URL names when it is missing, so one PostgreSQL can hold the databases of several
Prefect servers (the tests give each server its own).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

#: The database user and database of the cluster `start` makes.
USER = "prefect"
DATABASE = "prefect"
#: The system user a cluster runs as when this process is root.
SYSTEM_USER = "postgres"
_URL = re.compile(r"^postgresql(\+asyncpg)?://[^/]+/[A-Za-z_][A-Za-z0-9_]*(\?.*)?$")


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, started, stopped or reached; the message says why."""


@dataclass(frozen=True)
class Cluster:
    """A cluster `start` made: its folder, port, password and the user it runs as."""

    directory: Path
    port: int
    password: str
    run_as: str | None  # None: this process's user

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "postgres.log"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql+asyncpg://{USER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{database}"


def binaries() -> Path:
    """The folder of Debian's initdb and pg_ctl (/usr/lib/postgresql/<version>/bin, newest)."""
    found = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_ctl").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).resolve().parent
    raise PostgresError(
        "no PostgreSQL server programs (initdb, pg_ctl): install Debian's postgresql "
        "(`apt-get install postgresql`; `make host-packages` does), or pass a database URL"
    )


def connection_url(url: str) -> str:
    """`url` as Prefect's server wants it (postgresql+asyncpg://); a clear error for anything
    that is not a PostgreSQL URL with a database name."""
    if not _URL.match(url or ""):
        raise PostgresError(
            f"database URL {_redact(url)!r}: expected postgresql://user:password@host:port/database "
            "(or postgresql+asyncpg://...)"
        )
    return url if url.startswith("postgresql+asyncpg://") else "postgresql+asyncpg" + url[10:]


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url or "")


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    return _redact(url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresError(
            f"PostgreSQL does not run as root and there is no system user {SYSTEM_USER!r} "
            "(Debian's postgresql package creates it): install it, or pass a database URL"
        ) from None
    return SYSTEM_USER


def _run(command: list[str], run_as: str | None, what: str, timeout: float = 120, **kwargs):
    try:
        done = subprocess.run(
            command,
            user=run_as,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            **kwargs,
        )
    except subprocess.TimeoutExpired:
        raise PostgresError(f"{what}: no answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise PostgresError(f"{what} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done


def _reachable_by(path: Path, user: str) -> Path | None:
    """The first folder on the way to `path` that `user` cannot enter (None: all can be)."""
    entry = pwd.getpwnam(user)
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    for folder in [*reversed(path.parents), path]:
        if not folder.exists():
            break
        st = folder.stat()
        if st.st_uid == entry.pw_uid:
            bit = st.st_mode & 0o100
        elif st.st_gid in groups:
            bit = st.st_mode & 0o010
        else:
            bit = st.st_mode & 0o001
        if not bit:
            return folder
    return None


def _settings_file(directory: Path) -> Path:
    return directory / "cluster.json"


def read_cluster(directory: Path) -> Cluster | None:
    path = _settings_file(directory)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Cluster(Path(data["directory"]), data["port"], data["password"], data.get("run_as"))


def is_running(cluster: Cluster) -> bool:
    done = subprocess.run(
        [str(binaries() / "pg_ctl"), "status", "-D", str(cluster.data)],
        user=cluster.run_as,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    return done.returncode == 0


def start(directory: Path, port: int | None = None, timeout: float = 60) -> Cluster:
    """The cluster in `directory`, made on first use and started when it is not running."""
    directory = directory.resolve()
    run_as = _run_as()
    cluster = read_cluster(directory)
    bin_dir = binaries()
    if cluster is None:
        if run_as:
            blocked = _reachable_by(directory.parent, run_as)
            if blocked is not None:
                raise PostgresError(
                    f"PostgreSQL runs as {run_as!r} here (not root), which cannot enter {blocked} "
                    f"(mode {blocked.stat().st_mode & 0o777:o}): use a data dir it can reach "
                    f"(e.g. `chmod o+x {blocked}`), or pass a database URL"
                )
        if directory.exists() and any(directory.iterdir()):
            raise PostgresError(f"{directory} exists and is not a cluster defectflow made")
        directory.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(directory, port or _free_port(), secrets.token_urlsafe(24), run_as)
        password_file = directory / "initdb-password"
        password_file.write_text(cluster.password + "\n")
        os.chmod(password_file, 0o600)
        if run_as:
            entry = pwd.getpwnam(run_as)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
            os.chown(password_file, entry.pw_uid, entry.pw_gid)
        try:
            _run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(cluster.data),
                    "--username",
                    USER,
                    "--pwfile",
                    str(password_file),
                    "--auth",
                    "scram-sha-256",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                ],
                run_as,
                "initdb",
            )
        finally:
            password_file.unlink(missing_ok=True)
        conf = cluster.data / "postgresql.conf"
        with conf.open("a") as out:
            out.write(
                "\n# defectflow: local to this machine\n"
                f"listen_addresses = '127.0.0.1'\nport = {cluster.port}\n"
                f"unix_socket_directories = '{directory}'\n"
                "max_connections = 100\nshared_buffers = 64MB\n"
            )
        _settings_file(directory).write_text(
            json.dumps(
                {
                    "directory": str(directory),
                    "port": cluster.port,
                    "password": cluster.password,
                    "run_as": run_as,
                },
                indent=2,
            )
        )
        os.chmod(_settings_file(directory), 0o600)
    if not is_running(cluster):
        _run(
            [
                str(bin_dir / "pg_ctl"),
                "start",
                "-D",
                str(cluster.data),
                "-l",
                str(cluster.log),
                "-w",
                "-t",
                str(int(timeout)),
            ],
            cluster.run_as,
            f"pg_ctl start (log {cluster.log})",
            timeout=timeout + 10,
        )
    ensure_database(cluster.url())
    return cluster


def stop(directory: Path, timeout: float = 60) -> bool:
    """Stop the cluster in `directory`; False when there is none or it was not running."""
    cluster = read_cluster(directory.resolve())
    if cluster is None or not is_running(cluster):
        return False
    _run(
        [str(binaries() / "pg_ctl"), "stop", "-D", str(cluster.data), "-m", "fast", "-w"],
        cluster.run_as,
        "pg_ctl stop",
        timeout=timeout,
    )
    return True


def ensure_database(url: str, timeout: float = 30) -> None:
    """Create the database `url` names when it does not exist (connecting to `postgres`)."""
    import asyncio

    import asyncpg

    url = connection_url(url)
    parts = urlsplit(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    database = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres", query=""))

    async def create() -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                connection = await asyncpg.connect(admin, timeout=10)
                break
            except (OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() > deadline:
                    raise PostgresError(f"cannot connect to {redact(admin)}: {exc}") from exc
                await asyncio.sleep(0.5)
        try:
            exists = await connection.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", database
            )
            if not exists:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await connection.execute(f'CREATE DATABASE "{database}"')
        finally:
            await connection.close()

    asyncio.run(create())
