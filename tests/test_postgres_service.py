"""mikros_trio.postgres inside a service: Resource lifecycle, health, metrics, spans, SIGTERM."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import trio
from dependency_injector import providers
from opentelemetry.trace import SpanKind

from helpers import (
    Spawn,
    leaked_forms,
    metrics_of,
    parse,
    toml_text,
    tracing_of,
    value,
)
from mikros_trio import Lifetime, ServiceContainer, postgres
from mikros_trio.testing import ServiceStarter

if TYPE_CHECKING:
    from mikros_trio._pgcluster import Cluster

pytestmark = pytest.mark.postgres

#: A password the DSN carries (trust authentication ignores it): it must never be shown.
PASSWORD = "pw-Zq81-never-shown"


def with_password(cluster: Cluster, dsn: str) -> str:
    """``dsn`` (a database of ``cluster``) with :data:`PASSWORD` in it."""
    return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{cluster.port}/{dsn.rsplit('/', 1)[1]}"


def service_config(tmp_path: Path, *, name: str = "orders", **tables: Any) -> Path:
    """A worker service reading DATABASE_URL as a secret, ``tables`` added; written to disk."""
    all_tables: dict[str, Any] = {
        "lifecycle": {"drain_timeout": 1.0, "shutdown_timeout": 8.0},
        "features.env": {"secrets": ["DATABASE_URL"]},
        **tables,
    }
    path = tmp_path / "service.toml"
    top = {"name": name, "types": ["worker"], "version": "1.0.0", "envs": ["DATABASE_URL"]}
    path.write_text(toml_text(top, all_tables))
    return path


async def idle(lifetime: Lifetime) -> None:
    await lifetime.wait_stopping()


def container(**options: Any) -> type[ServiceContainer]:
    """A worker service that only waits, its ``db`` pool made with ``options``."""

    class Container(ServiceContainer):
        db = providers.Resource(
            postgres.pool, dsn=ServiceContainer.env.provided.secret.call("DATABASE_URL"), **options
        )
        worker = providers.Object(idle)

    return Container


async def test_the_pool_is_warm_and_healthy_before_ready(
    mikros_service: ServiceStarter, tmp_path: Path, postgres_dsn: str
) -> None:
    """Ready means min_size connections are open; /healthz shows the pool under checks -> db."""
    running = await mikros_service.start(
        container(min_size=2, max_size=4),
        service_config(tmp_path),
        environ={"DATABASE_URL": postgres_dsn},
    )
    assert running.health.ready
    pool: postgres.Pool = running.container.db()
    assert isinstance(pool, postgres.Pool)
    assert pool.stats()["size"] == 2
    check = running.health.snapshot()["checks"]["db"]
    assert check == {"ok": True, "size": 2, "in_use": 0, "idle": 2, "waiters": 0}
    await running.stop()
    assert pool.stats()["size"] == 0


async def test_an_unreachable_database_fails_the_start_loudly(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    postgres_server: Cluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nothing listens where DATABASE_URL points: the service never gets ready, and says why."""
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/postgres"

    running = await mikros_service.start(
        container(timeout=0.5, connect_timeout=0.2),
        service_config(tmp_path),
        environ={"DATABASE_URL": dsn},
    )
    with trio.fail_after(10):
        await running.wait()
    assert not running.health.ready
    assert running.exit_code == 1
    text = capsys.readouterr().out
    assert "db: warmup failed: PoolTimeout" in text
    assert "could not connect to postgres@127.0.0.1:1/postgres within 0.5 s" in text
    assert leaked_forms(dsn, text) == []


async def test_queries_are_metrics_and_spans_without_secrets(
    mikros_service: ServiceStarter, tmp_path: Path, postgres_server: Cluster, postgres_dsn: str
) -> None:
    """Each query: a db_client_* sample by operation and outcome, a CLIENT span; no password."""
    dsn = with_password(postgres_server, postgres_dsn)
    config = service_config(
        tmp_path,
        **{
            "features.metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
            "features.tracing": {"enabled": True, "exporter": "memory"},
        },
    )
    running = await mikros_service.start(
        container(min_size=2, max_size=4), config, environ={"DATABASE_URL": dsn}
    )
    pool: postgres.Pool = running.container.db()
    dbname = postgres_dsn.rsplit("/", 1)[1]
    await pool.execute("CREATE TABLE t (id int PRIMARY KEY)")
    secret_value = "value-that-is-a-parameter"
    await pool.execute("INSERT INTO t VALUES (%s)", (1,))
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        await pool.fetchone("SELECT %s::int", (secret_value,))
    with trio.move_on_after(0.3):
        await pool.execute("SELECT pg_sleep(30)")
    assert await pool.fetchone("select id from t") == (1,)

    samples = parse(metrics_of(running).render().decode())
    total = "db_client_operations_total"
    labels = {"system": "postgresql"}
    assert value(samples, total, **labels, operation="CREATE", outcome="ok") == 1
    assert value(samples, total, **labels, operation="INSERT", outcome="ok") == 1
    assert value(samples, total, **labels, operation="SELECT", outcome="ok") == 1
    assert value(samples, total, **labels, operation="SELECT", outcome="error") == 1
    assert value(samples, total, **labels, operation="SELECT", outcome="cancelled") == 1
    count = "db_client_operation_duration_seconds_count"
    assert value(samples, count, **labels, operation="SELECT", outcome="cancelled") == 1
    pool_labels = {"system": "postgresql", "pool": "postgres"}
    assert value(samples, "db_client_connections", **pool_labels, state="idle") == 2
    assert value(samples, "db_client_connections", **pool_labels, state="used") == 0
    assert value(samples, "db_client_connections", **pool_labels, state="pending") == 0
    assert value(samples, "db_client_connections_max", **pool_labels) == 4
    async with pool.connection():  # sampled about once a second
        with trio.fail_after(5):
            while True:
                samples = parse(metrics_of(running).render().decode())
                if value(samples, "db_client_connections", **pool_labels, state="used") == 1:
                    break
                await trio.sleep(0.05)

    spans = [span for span in tracing_of(running).spans() if span.kind is SpanKind.CLIENT]
    assert [span.name for span in spans] == [
        f"{verb} {dbname}" for verb in ("CREATE", "INSERT", "SELECT", "SELECT", "SELECT")
    ]
    insert = spans[1]
    assert dict(insert.attributes or {}) == {
        "db.system": "postgresql",
        "db.operation": "INSERT",
        "db.name": dbname,
        "server.address": "127.0.0.1",
        "server.port": postgres_server.port,
    }
    failed = spans[2]
    assert failed.status.description == "InvalidTextRepresentation: SQLSTATE 22P02"
    texts = [repr(span.to_json()) for span in spans] + [metrics_of(running).render().decode()]
    for text in texts:
        assert leaked_forms(dsn, text) == []
        assert secret_value not in text
        assert "INSERT INTO t" not in text


WRITER_MAIN = """
import sys

import trio
from dependency_injector import providers

import mikros_trio
from mikros_trio import Lifetime, ServiceContainer, postgres


class Writer:
    def __init__(self, db: postgres.Pool) -> None:
        self.db = db

    async def run(self, lifetime: Lifetime) -> None:
        await self.db.execute("CREATE TABLE IF NOT EXISTS ticks (n int)")
        n = 0
        while not lifetime.stopping:
            async with self.db.transaction() as conn:
                await conn.execute("INSERT INTO ticks VALUES (%s)", (n,))
            n += 1
            if n == 5:
                print("writer running", flush=True)
            await trio.sleep(0.005)
        print("writer drained", n, flush=True)


DSN = ServiceContainer.env.provided.secret.call("DATABASE_URL")


class Container(ServiceContainer):
    db = providers.Resource(postgres.pool, dsn=DSN, min_size=2, max_size=4)
    worker = providers.Factory(Writer, db=db)


async def main() -> None:
    raise SystemExit(await mikros_trio.run(Container, sys.argv[1]))


trio.run(main)
"""


def test_a_real_process_closes_its_pool_after_its_worker_on_sigterm(
    tmp_path: Path, spawn: Spawn, postgres_server: Cluster, postgres_dsn: str
) -> None:
    """python main.py, SIGTERM: exit 0, the worker drains before the pool closes, rows kept."""
    dsn = with_password(postgres_server, postgres_dsn)
    config = service_config(tmp_path, name="writer")
    main = tmp_path / "main.py"
    main.write_text(WRITER_MAIN)
    child = spawn(
        sys.executable,
        main,
        config,
        cwd=tmp_path,
        env={"DATABASE_URL": dsn, "MIKROS_TRIO_VERBOSE": "1"},
    )
    child.wait_for("writer running")
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.report()
    drained = re.search(r"writer drained (\d+)", child.stdout)
    assert drained is not None, child.report()
    dbname = postgres_dsn.rsplit("/", 1)[1]
    # Every transaction the worker finished is in the database.
    assert postgres_server.psql("SELECT count(*) FROM ticks", dbname) == drained.group(1)
    assert (
        postgres_server.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{dbname}'")
        == "0"
    )
    stopped = re.findall(r"^\[[ \d.]+\] (\w+): stopped", child.stderr, re.MULTILINE)
    assert stopped.index("worker") < stopped.index("db"), child.report()
    assert leaked_forms(dsn, child.stdout + child.stderr) == []
