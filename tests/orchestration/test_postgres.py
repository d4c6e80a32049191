"""PostgreSQL for the Prefect server (defectflow.orchestration.postgres): URLs, a cluster of
Debian's postgresql in a folder, and `defectflow up --database postgres` for real (the
server's tables land in that cluster; `down` stops it). Debian's postgresql comes with `make
host-packages`; as root the cluster runs as the system user `postgres`."""

from __future__ import annotations

import asyncio

import pytest
from helpers_processes import free_port
from helpers_stack import Stack, reachable_dir

from defectflow.orchestration import postgres


@pytest.mark.parametrize(
    "url",
    ["sqlite:///prefect.db", "postgresql://user:pw@host:5432", "mysql://u:p@h/db", "", "postgres"],
)
def test_anything_but_a_postgresql_url_with_a_database_is_refused(url):
    with pytest.raises(postgres.PostgresError, match="expected postgresql://"):
        postgres.connection_url(url)


def test_urls_take_asyncpg_and_messages_never_show_the_password():
    assert (
        postgres.connection_url("postgresql://prefect:s3cret@db:5432/prefect")
        == "postgresql+asyncpg://prefect:s3cret@db:5432/prefect"
    )
    url = "postgresql+asyncpg://prefect:s3cret@db:5432/prefect"
    assert postgres.connection_url(url) == url
    assert "s3cret" not in postgres.redact(url) and "***" in postgres.redact(url)
    with pytest.raises(postgres.PostgresError) as error:
        postgres.connection_url("mysql://prefect:s3cret@db/prefect")
    assert "s3cret" not in str(error.value)


def _tables(url: str) -> set[str]:
    import asyncpg

    async def query() -> set[str]:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            rows = await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        finally:
            await connection.close()
        return {row["tablename"] for row in rows}

    return asyncio.run(query())


@pytest.mark.integration
def test_a_cluster_is_made_once_started_again_and_stopped():
    with reachable_dir("defectflow-pg-test-") as folder:
        cluster = postgres.start(folder / "cluster")
        try:
            assert postgres.is_running(cluster)
            assert (cluster.data / "PG_VERSION").exists()
            again = postgres.start(folder / "cluster")  # running: nothing new
            assert again == cluster
            postgres.ensure_database(cluster.url("other"))  # created when missing
            postgres.ensure_database(cluster.url("other"))  # and left alone after
            assert _tables(cluster.url("other")) == set()
        finally:
            assert postgres.stop(folder / "cluster")
        assert not postgres.is_running(cluster)
        assert postgres.stop(folder / "cluster") is False  # idempotent
        restarted = postgres.start(folder / "cluster")  # the same cluster, its data kept
        try:
            assert restarted.port == cluster.port and restarted.password == cluster.password
        finally:
            postgres.stop(folder / "cluster")


@pytest.mark.integration
def test_up_with_postgres_puts_the_prefect_server_on_it():
    with reachable_dir("defectflow-pg-stack-") as home:
        stack = Stack(home, free_port(), ("--database", "postgres", "--no-worker"))
        try:
            result = stack.up()
            assert "server started on postgres" in result.stdout, result.stdout
            database = stack.state()["database"]
            assert database["kind"] == "postgres" and "***" in database["url"]
            cluster = postgres.read_cluster(home / "postgres")
            assert cluster is not None and postgres.is_running(cluster)
            # Prefect's tables, and the deployments `up` applied, are in the cluster.
            assert {"deployment", "flow_run", "work_pool"} <= _tables(cluster.url())
            names = {d["name"] for d in stack.post("/deployments/filter", {})}
            assert {"training-pipeline", "nightly-retrain"} <= names
        finally:
            down = stack.cli("down", timeout=180)
        assert "PostgreSQL stopped" in down.stdout, down.stdout + down.stderr
        assert not postgres.is_running(cluster)


def test_up_refuses_a_database_url_that_is_not_postgresql(tmp_path):
    stack = Stack(tmp_path, free_port())
    result = stack.cli("up", "--port", str(stack.port), "--database-url", "mysql://u:p@h/db")
    assert result.returncode == 1
    assert "expected postgresql://" in result.stderr and "u:p@" not in result.stderr
    assert not (tmp_path / "stack" / "stack.json").exists()
