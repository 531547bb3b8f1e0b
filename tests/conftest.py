"""Shared fixtures: the examples and the CLI run as real child processes; examples imported."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from helpers import (
    GATEWAY,
    GRPC,
    REPO,
    Child,
    Examples,
    Spawn,
    import_example,
    postgres_cluster,
)

if TYPE_CHECKING:
    from helpers import RedisServer
    from mikros_trio._pgcluster import Cluster


@pytest.fixture(name="spawn")
def fixture_spawn() -> Iterator[Spawn]:
    """Start child processes from the repository root; all are killed and closed at teardown.

    ``env`` adds to the inherited environment (``None`` removes a name);
    ``MIKROS_TRIO_VERBOSE`` is never inherited, only set on purpose.
    """
    children: list[Child] = []

    def spawn(
        *args: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        cwd: Path = REPO,
    ) -> Child:
        merged: dict[str, str | None] = {**os.environ, "MIKROS_TRIO_VERBOSE": None, **(env or {})}
        environ = {name: value for name, value in merged.items() if value is not None}
        child = Child([os.fspath(a) for a in args], environ, cwd)
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.close()


@pytest.fixture(name="examples", scope="module")
def fixture_examples() -> Iterator[Examples]:
    """Both examples' main.py, imported under names no other example's ``main`` takes."""
    greeter = import_example(GRPC / "main.py", "grpc_example_main_for_gateway")
    try:
        gateway = import_example(GATEWAY / "main.py", "gateway_example_main")
        try:
            yield Examples(greeter, gateway)
        finally:
            del sys.modules[gateway.__name__]
    finally:
        del sys.modules[greeter.__name__]


@pytest.fixture(name="postgres_server", scope="session")
def fixture_postgres_server() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the session: ``host``, ``port``, ``user``, ``dsn(db)``.

    Trust authentication on 127.0.0.1, removed at the end of the session.
    Fails (never skips) when PostgreSQL is not installed.
    """
    with postgres_cluster() as cluster:
        yield cluster


_DATABASES = itertools.count(1)


@pytest.fixture(name="postgres_dsn")
def fixture_postgres_dsn(postgres_server: Cluster) -> Iterator[str]:
    """A fresh, empty database per test: its DSN (dropped, with its sessions, after)."""
    name = f"test_{next(_DATABASES)}"
    dsn = postgres_server.create_database(name)
    yield dsn
    postgres_server.drop_database(name)


@pytest.fixture(name="redis_server", scope="session")
def fixture_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One throwaway redis-server for the session: ``host``, ``port``, ``url(db)``.

    No persistence, bound to 127.0.0.1, stopped at the end of the session.
    Fails (never skips) when Redis is not installed.
    """
    from helpers import redis_server_process

    with redis_server_process(
        tmp_path_factory.mktemp("redis"), "--enable-debug-command", "local"
    ) as server:
        yield server


@pytest.fixture(name="redis_url")
def fixture_redis_url(redis_server: RedisServer) -> str:
    """The session server's URL (db 0), emptied (FLUSHALL) and restarted if a test stopped it."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.restart()
    assert redis_server.command("FLUSHALL") == b"+OK\r\n"
    return redis_server.url(0)
