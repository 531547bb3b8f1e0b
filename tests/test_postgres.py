"""mikros_trio.postgres: the Trio-native pool against a real, throwaway PostgreSQL cluster."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
import pytest

if TYPE_CHECKING:
    from mikros_trio._pgcluster import Cluster

pytestmark = pytest.mark.postgres


def test_fixture_gives_each_test_its_own_database(
    postgres_server: Cluster, postgres_dsn: str
) -> None:
    """postgres_dsn names a fresh database on the session's cluster, on 127.0.0.1."""
    with psycopg.connect(postgres_dsn) as conn:
        name, tables = conn.execute(
            "SELECT current_database(), count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone() or ("", -1)
    assert name.startswith("test_")
    assert tables == 0
    assert postgres_server.host == "127.0.0.1"
    assert postgres_server.dsn(name) == postgres_dsn
    assert postgres_server.psql("SHOW listen_addresses") == "127.0.0.1"
