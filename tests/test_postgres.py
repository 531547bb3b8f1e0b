"""mikros_trio.postgres: the Trio-native pool against a real, throwaway PostgreSQL cluster."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import trio
from psycopg.rows import dict_row

from helpers import leaked_forms, postgres_cluster
from mikros_trio import postgres
from mikros_trio._pgconn import CANCEL_TIMEOUT

if TYPE_CHECKING:
    from mikros_trio._pgcluster import Cluster

pytestmark = pytest.mark.postgres

#: No wait on the server in these tests may take longer than this (seconds, real clock).
BOUND = 10.0

#: A password the DSNs carry (trust authentication ignores it): it must never be shown.
PASSWORD = "pw-Zq81-never-shown"


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


@pytest.fixture(name="observer")
async def _observer(postgres_dsn: str) -> AsyncIterator[postgres.Pool]:
    """A second pool on the test's database, to look at the server from outside."""
    async with postgres.Pool(postgres_dsn, name="observer", min_size=1, max_size=1) as pool:
        yield pool


async def backend_state(observer: postgres.Pool, pid: int) -> str | None:
    """``pg_stat_activity.state`` of backend ``pid`` (None once it is gone)."""
    row = await observer.fetchone("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
    return None if row is None else str(row[0])


async def sleeping(observer: postgres.Pool) -> list[int]:
    """Backends running ``pg_sleep`` now."""
    rows = await observer.fetchall(
        "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%%pg_sleep(30)%%'"
        " AND pid <> pg_backend_pid()"
    )
    return [row[0] for row in rows]


async def until(check: Callable[[], Awaitable[bool] | bool]) -> None:
    """Poll ``check`` until it is true, within :data:`BOUND` (the server has no event for us)."""
    with trio.fail_after(BOUND):
        while True:
            done = check()
            if done if isinstance(done, bool) else await done:
                return
            await trio.sleep(0.02)


async def until_sleeping(observer: postgres.Pool) -> list[int]:
    """Poll (bounded) until a backend runs ``pg_sleep(30)``; the pids of those that do."""
    pids: list[int] = []

    async def found() -> bool:
        pids[:] = await sleeping(observer)
        return bool(pids)

    await until(found)
    return pids


# -- queries, rows, transactions ------------------------------------------------------


async def test_queries_rows_and_row_counts(postgres_dsn: str) -> None:
    """execute/fetchone/fetchall and a leased connection behave as psycopg's AsyncConnection."""
    async with postgres.Pool(postgres_dsn, min_size=1, max_size=2) as pool:
        await pool.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        inserted = await pool.execute(
            "INSERT INTO items VALUES (%s, %s), (%s, %s)", (1, "a", 2, "b")
        )
        assert inserted == 2
        assert await pool.fetchone("SELECT name FROM items WHERE id = %s", (2,)) == ("b",)
        assert await pool.fetchone("SELECT name FROM items WHERE id = %s", (9,)) is None
        rows = await pool.fetchall("SELECT id, name FROM items ORDER BY id", row_factory=dict_row)
        assert rows == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
        async with pool.connection() as conn:
            assert isinstance(conn, psycopg.AsyncConnection)
            cursor = await conn.execute("UPDATE items SET name = 'z'")
            assert cursor.rowcount == 2
            async with conn.cursor(row_factory=dict_row) as named:
                await named.execute("SELECT count(*) AS n FROM items WHERE name = 'z'")
                assert await named.fetchone() == {"n": 2}

            async def savepoint_failing() -> None:
                async with conn.transaction():
                    await conn.execute("DELETE FROM items")
                    raise ZeroDivisionError

            # A nested transaction (savepoint) rolled back keeps the outer work.
            with pytest.raises(ZeroDivisionError):
                await savepoint_failing()
        assert await pool.fetchall("SELECT name FROM items ORDER BY id") == [("z",), ("z",)]
        stats = pool.stats()
        assert stats["in_use"] == 0
        assert stats["idle"] == stats["size"] >= 1


async def test_pipeline_copy_large_values_and_notifications_work_under_trio(
    postgres_dsn: str,
) -> None:
    """The rest of psycopg's async API goes through the same Trio waits (read-or-write too)."""
    async with postgres.Pool(postgres_dsn, min_size=2, max_size=2, autocommit=True) as pool:
        async with pool.connection() as conn:
            async with conn.pipeline():
                cursors = [await conn.execute("SELECT %s::int", (n,)) for n in range(50)]
            assert [(await cursor.fetchone()) for cursor in cursors] == [(n,) for n in range(50)]
            await conn.execute("CREATE TABLE rows (id int, text text)")
            async with conn.cursor().copy("COPY rows FROM STDIN") as copy:
                for n in range(20_000):
                    await copy.write_row((n, "x" * 50))
            assert await (await conn.execute("SELECT count(*) FROM rows")).fetchone() == (20_000,)
            # Larger than the socket's buffer: psycopg waits for read-or-write while sending.
            big = "y" * 5_000_000
            assert await (await conn.execute("SELECT length(%s)", (big,))).fetchone() == (
                5_000_000,
            )
        async with pool.connection() as listener:
            await listener.execute("LISTEN channel")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.execute, "NOTIFY channel, 'hello'")
                notes = [
                    note.payload async for note in listener.notifies(timeout=BOUND, stop_after=1)
                ]
            assert notes == ["hello"]
            began = trio.current_time()
            assert [note async for note in listener.notifies(timeout=0.2)] == []
            assert 0.2 <= trio.current_time() - began < 1.0


async def test_a_failed_statement_rolls_back_and_the_connection_serves_again(
    postgres_dsn: str,
) -> None:
    """A database error inside a lease rolls the transaction back; the connection is reused."""
    async with postgres.Pool(postgres_dsn, min_size=1, max_size=1) as pool:
        pid = await pool.fetchone("SELECT pg_backend_pid()")

        async def failing() -> None:
            async with pool.connection() as conn:
                await conn.execute("CREATE TABLE t (id int)")
                await conn.execute("SELECT 1 / 0")

        with pytest.raises(psycopg.errors.DivisionByZero):
            await failing()
        assert await pool.fetchone("SELECT to_regclass('t') IS NULL") == (True,)
        assert await pool.fetchone("SELECT pg_backend_pid()") == pid


@pytest.mark.parametrize("autocommit", [False, True])
async def test_transactions_commit_on_success_and_roll_back_on_error(
    postgres_dsn: str, *, autocommit: bool
) -> None:
    """pool.transaction(): committed when the block succeeds, rolled back when it raises."""
    async with postgres.Pool(postgres_dsn, autocommit=autocommit) as pool:
        await pool.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int)")
        async with pool.transaction() as conn:
            await conn.execute("INSERT INTO accounts VALUES (1, 100)")

        async def failing() -> None:
            async with pool.transaction() as conn:
                await conn.execute("UPDATE accounts SET balance = 0")
                await conn.execute("INSERT INTO accounts VALUES (2, 5)")
                raise LookupError

        with pytest.raises(LookupError):
            await failing()
        assert await pool.fetchall("SELECT id, balance FROM accounts") == [(1, 100)]


async def sleep_forever(conn: psycopg.AsyncConnection[Any]) -> None:
    await trio.sleep_forever()


async def sleep_on_the_server(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("SELECT pg_sleep(30)")


@pytest.mark.parametrize("wait", [sleep_forever, sleep_on_the_server])
async def test_a_cancelled_transaction_is_rolled_back(
    postgres_dsn: str, observer: postgres.Pool, wait: Callable[[Any], Awaitable[None]]
) -> None:
    """A Trio cancel inside pool.transaction(), between statements or in a query: undone.

    The query stops on the server, and the connection is rolled back and
    kept rather than thrown away.
    """
    async with postgres.Pool(postgres_dsn, min_size=1, max_size=1) as pool:
        await pool.execute("CREATE TABLE t (id int)")
        with trio.move_on_after(0.3) as scope:
            async with pool.transaction() as conn:
                await conn.execute("INSERT INTO t VALUES (1)")
                await wait(conn)
        assert scope.cancelled_caught
        assert await sleeping(observer) == []
        assert await pool.fetchone("SELECT count(*) FROM t") == (0,)
        assert pool.stats()["closed"] == 0


# -- cancellation on the server ---------------------------------------------------------


async def test_a_query_cancelled_by_trio_is_cancelled_on_the_server(
    postgres_dsn: str, observer: postgres.Pool
) -> None:
    """pg_sleep(30) under a cancel scope: gone from pg_stat_activity, connection reused, loop free.

    A heartbeat task measures the longest the Trio thread was held while
    the cancel went to the server.
    """
    async with postgres.Pool(postgres_dsn, min_size=1, max_size=1) as pool:
        (pid,) = await pool.fetchone("SELECT pg_backend_pid()")
        longest = 0.0

        async def heartbeat() -> None:
            nonlocal longest
            last = trio.current_time()
            while True:
                await trio.sleep(0.005)
                now = trio.current_time()
                longest = max(longest, now - last)
                last = now

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat)
            began = trio.current_time()
            with trio.move_on_after(0.5) as scope:
                await pool.execute("SELECT pg_sleep(30)")
            took = trio.current_time() - began
            nursery.cancel_scope.cancel()
        assert scope.cancelled_caught
        assert took < 0.5 + CANCEL_TIMEOUT
        assert longest < 0.25, f"the Trio thread was held {longest:.3f} s"

        async def idle_again() -> bool:
            return await backend_state(observer, pid) == "idle"

        await until(idle_again)
        assert await sleeping(observer) == []
        assert await pool.fetchone("SELECT pg_backend_pid()") == (pid,)
        assert pool.stats()["closed"] == 0


async def test_a_backend_that_ignores_the_cancel_costs_its_connection_within_a_bound(
    postgres_dsn: str, observer: postgres.Pool
) -> None:
    """A backend stopped (SIGSTOP) never answers the cancel: the connection is closed in time."""
    async with postgres.Pool(postgres_dsn, min_size=1, max_size=1) as pool:
        (pid,) = await pool.fetchone("SELECT pg_backend_pid()")

        async def stop_when_sleeping() -> None:
            await until_sleeping(observer)
            os.kill(pid, signal.SIGSTOP)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_when_sleeping)
                began = trio.current_time()
                with trio.move_on_after(1.0):
                    await pool.execute("SELECT pg_sleep(30)")
                took = trio.current_time() - began
        finally:
            os.kill(pid, signal.SIGCONT)
        assert took < 1.0 + CANCEL_TIMEOUT + 1.0
        assert pool.stats()["closed"] == 1
        assert await pool.fetchone("SELECT pg_backend_pid() <> %s", (pid,)) == (True,)


# -- exhaustion and waiters --------------------------------------------------------------


async def test_a_full_pool_times_out_with_a_clear_error(postgres_dsn: str) -> None:
    """All connections leased: the next lease waits up to timeout, then PoolTimeout says why."""
    async with postgres.Pool(postgres_dsn, min_size=0, max_size=1, timeout=0.3) as pool:
        async with pool.connection():
            began = trio.current_time()
            with pytest.raises(postgres.PoolTimeout) as caught:
                await pool.fetchone("SELECT 1")
            assert 0.3 <= trio.current_time() - began < 0.3 + 1.0
        assert "no connection free within 0.3 s (1 of 1 in use" in str(caught.value)
        assert await pool.fetchone("SELECT 1") == (1,)
        assert pool.stats()["timeouts"] == 1


async def test_waiters_are_bounded_and_served_in_order(postgres_dsn: str) -> None:
    """Beyond max_waiting a lease fails at once; those waiting get the connection first come."""
    async with postgres.Pool(postgres_dsn, min_size=1, max_size=1, max_waiting=2) as pool:
        served: list[int] = []

        async def waiter(number: int) -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
                served.append(number)

        async with trio.open_nursery() as nursery, pool.connection():
            for number in range(2):
                nursery.start_soon(waiter, number)
                await trio.testing.wait_all_tasks_blocked()
            assert pool.health()["waiters"] == 2
            with pytest.raises(postgres.PoolTimeout, match="2 tasks already wait"):
                await pool.fetchone("SELECT 1")
        assert served == [0, 1]
        assert pool.stats()["size"] == 1


async def test_connections_never_exceed_max_size(
    postgres_dsn: str, observer: postgres.Pool
) -> None:
    """Forty tasks at once on a pool of three: at most three backends, every query answered."""
    async with postgres.Pool(postgres_dsn, min_size=0, max_size=3) as pool:
        answers: list[Any] = []

        async def one(number: int) -> None:
            answers.append(await pool.fetchone("SELECT %s::int, pg_sleep(0.01)", (number,)))

        async with trio.open_nursery() as nursery:
            for number in range(40):
                nursery.start_soon(one, number)
        assert sorted(row[0] for row in answers) == list(range(40))
        assert pool.stats()["opened"] <= 3
        (count,) = await observer.fetchone(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        assert count <= 3


# -- broken connections and a server that goes away -----------------------------------


async def test_a_terminated_idle_connection_is_replaced(
    postgres_dsn: str, observer: postgres.Pool
) -> None:
    """pg_terminate_backend on an idle connection: the next lease gets a new one, no error."""
    async with postgres.Pool(postgres_dsn, min_size=1, max_size=1) as pool:
        (pid,) = await pool.fetchone("SELECT pg_backend_pid()")
        assert await observer.fetchone("SELECT pg_terminate_backend(%s)", (pid,)) == (True,)

        async def gone() -> bool:
            return await backend_state(observer, pid) is None

        await until(gone)
        (new_pid,) = await pool.fetchone("SELECT pg_backend_pid()")
        assert new_pid != pid
        assert pool.stats()["closed"] == 1


async def test_a_connection_terminated_mid_query_fails_that_query_only(
    postgres_dsn: str, observer: postgres.Pool
) -> None:
    """The query whose backend is killed fails (OperationalError); the pool replaces it."""
    async with postgres.Pool(postgres_dsn, min_size=1, max_size=1) as pool:
        async with trio.open_nursery() as nursery:
            pids: list[int] = []

            async def kill() -> None:
                pids.extend(await until_sleeping(observer))
                await observer.execute("SELECT pg_terminate_backend(%s)", (pids[0],))

            nursery.start_soon(kill)
            with pytest.raises(psycopg.OperationalError):
                await pool.execute("SELECT pg_sleep(30)")
        assert await pool.fetchone("SELECT pg_backend_pid() <> %s", (pids[0],)) == (True,)
        assert pool.health()["ok"]


async def test_a_connection_past_max_lifetime_is_replaced(postgres_dsn: str) -> None:
    """max_lifetime elapsed: the next lease gets a new backend."""
    async with postgres.Pool(postgres_dsn, min_size=1, max_size=1, max_lifetime=0.3) as pool:
        (pid,) = await pool.fetchone("SELECT pg_backend_pid()")
        await trio.sleep(0.4)
        assert await pool.fetchone("SELECT pg_backend_pid() <> %s", (pid,)) == (True,)


async def test_idle_connections_beyond_min_size_are_closed_after_max_idle(
    postgres_dsn: str,
) -> None:
    """Three opened by a burst, idle past max_idle: housekeeping closes down to min_size."""
    async with postgres.Pool(postgres_dsn, min_size=1, max_size=3, max_idle=0.2) as pool:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(pool.execute, "SELECT pg_sleep(0.1)")
        assert pool.stats()["size"] == 3
        await until(lambda: pool.stats()["size"] == 1)
        assert pool.stats()["closed"] == 2


async def test_an_idle_connection_to_a_frozen_backend_fails_its_ping_and_is_replaced(
    postgres_dsn: str,
) -> None:
    """Idle past check_interval, its backend stopped: the ping times out, a new one serves."""
    async with postgres.Pool(
        postgres_dsn, min_size=1, max_size=1, check_interval=0.1, connect_timeout=0.3
    ) as pool:
        (pid,) = await pool.fetchone("SELECT pg_backend_pid()")
        os.kill(pid, signal.SIGSTOP)
        try:
            await trio.sleep(0.2)
            began = trio.current_time()
            (new_pid,) = await pool.fetchone("SELECT pg_backend_pid()")
            took = trio.current_time() - began
        finally:
            os.kill(pid, signal.SIGCONT)
        assert new_pid != pid
        assert took < 0.3 + 1.0  # closed at the ping's timeout, no cancel waited for
        assert pool.stats()["closed"] == 1


@pytest.fixture(name="own_cluster")
def _own_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own, which it may stop and start."""
    with postgres_cluster() as cluster:
        yield cluster


async def test_the_pool_recovers_when_the_server_comes_back(own_cluster: Cluster) -> None:
    """Server stopped: health false, leases fail fast; restarted: health and leases come back."""
    dsn = own_cluster.dsn("postgres")
    async with postgres.Pool(dsn, min_size=2, max_size=2, timeout=0.5) as pool:
        assert pool.health()["ok"]
        await trio.to_thread.run_sync(own_cluster.stop)
        await until(lambda: not pool.health()["ok"])
        assert "connect" in pool.health()["error"]
        with pytest.raises(postgres.PoolTimeout, match="could not connect"):
            await pool.fetchone("SELECT 1")
        await trio.to_thread.run_sync(own_cluster.start)
        await until(lambda: bool(pool.health()["ok"]))
        assert await pool.fetchone("SELECT 1") == (1,)
        await until(lambda: pool.stats()["size"] == 2)  # housekeeping tops up to min_size


async def test_warmup_fails_loud_when_the_server_is_unreachable(postgres_server: Cluster) -> None:
    """Nothing listens on the port: warmup raises PoolTimeout within timeout, saying where."""
    with socket_closed_port() as port:
        dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
        pool = postgres.Pool(dsn, min_size=1, timeout=0.5, connect_timeout=0.2)
        began = trio.current_time()
        with pytest.raises(postgres.PoolTimeout) as caught:
            await pool.warmup()
        assert trio.current_time() - began < 0.5 + 1.0
        await pool.close()
    message = str(caught.value)
    assert f"could not connect to postgres@127.0.0.1:{port}/postgres" in message
    assert not pool.health()["ok"]
    for text in (message, repr(pool), str(pool.health())):
        assert leaked_forms(dsn, text) == []


def socket_closed_port() -> Any:
    """A context manager giving a 127.0.0.1 port nothing listens on (held bound, not listening)."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def held() -> Iterator[int]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            yield sock.getsockname()[1]

    return held()


# -- closing ---------------------------------------------------------------------------


async def test_close_waits_for_a_lease_that_ends_on_its_own(postgres_dsn: str) -> None:
    """close() with a short query in flight: the query completes, then everything is closed."""
    pool = postgres.Pool(postgres_dsn, min_size=1, max_size=2)
    await pool.warmup()
    results: list[Any] = []
    async with trio.open_nursery() as nursery:

        async def short() -> None:
            results.append(await pool.fetchone("SELECT 7, pg_sleep(0.3)"))

        nursery.start_soon(short)
        await trio.sleep(0.1)
        await pool.close()
        assert results == [(7, "")]
    assert pool.stats()["size"] == 0
    assert not pool.health()["ok"]
    with pytest.raises(postgres.PoolClosed):
        await pool.fetchone("SELECT 1")


async def test_close_cut_by_its_deadline_cancels_queries_and_closes_within_a_bound(
    postgres_dsn: str, observer: postgres.Pool
) -> None:
    """close() cancelled while a query runs: the query is cancelled on the server, all closed."""
    pool = postgres.Pool(postgres_dsn, min_size=1, max_size=2)
    await pool.warmup()
    failures: list[BaseException] = []

    async def long() -> None:
        try:
            await pool.execute("SELECT pg_sleep(30)")
        except psycopg.Error as error:
            failures.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long)
        await until_sleeping(observer)
        began = trio.current_time()
        with trio.move_on_after(0.3) as deadline:
            await pool.close()
        took = trio.current_time() - began
    assert deadline.cancelled_caught  # the cancellation propagated out of close()
    assert took < 0.3 + CANCEL_TIMEOUT
    assert [type(error) for error in failures] == [psycopg.errors.QueryCanceled]
    assert await sleeping(observer) == []
    assert pool.stats()["size"] == 0


async def test_the_resource_generator_closes_its_pool(postgres_dsn: str) -> None:
    """postgres.pool() yields a Pool and closes it when finalised (as providers.Resource does)."""
    resource = postgres.pool(postgres_dsn, min_size=1)
    pool = await resource.__anext__()
    assert isinstance(pool, postgres.Pool)
    await pool.warmup()
    assert pool.stats()["size"] == 1
    with pytest.raises(StopAsyncIteration):
        await resource.__anext__()
    assert pool.stats()["size"] == 0
    assert not pool.health()["ok"]


# -- settings and secrets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_size": 0}, "max_size"),
        ({"min_size": 5, "max_size": 2}, "min_size"),
        ({"min_size": -1}, "min_size"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"connect_timeout": -1.0}, "connect_timeout"),
        ({"max_idle": 0}, "max_idle"),
        ({"max_lifetime": "1h"}, "max_lifetime"),
        ({"check_interval": 0}, "check_interval"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"name": ""}, "name"),
        ({"max_size": True}, "max_size"),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(
    options: dict[str, Any], named: str, postgres_dsn: str
) -> None:
    """Each out-of-range or mistyped setting: ValueError naming it, before any connection."""
    with pytest.raises(ValueError, match=rf"^postgres pool: {named} must be"):
        postgres.Pool(postgres_dsn, **options)


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/db?bogus=1",
        f"host=127.0.0.1 password={PASSWORD} dbname",
        "",
    ],
)
def test_an_invalid_dsn_is_refused_without_showing_it(dsn: str) -> None:
    """A malformed DSN: ValueError that says so and never quotes the string (or its password)."""
    with pytest.raises(ValueError, match="postgres pool: dsn") as caught:
        postgres.Pool(dsn)
    if dsn:
        assert leaked_forms(dsn, str(caught.value)) == []
        assert PASSWORD not in str(caught.value)


async def test_the_password_is_never_shown(postgres_server: Cluster, postgres_dsn: str) -> None:
    """repr, stats, health and errors of a pool whose DSN has a password never show it."""
    dbname = postgres_dsn.rsplit("/", 1)[1]
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{postgres_server.port}/{dbname}"
    async with postgres.Pool(dsn, min_size=1, max_size=1, timeout=0.2) as pool:
        texts = [repr(pool), str(pool), str(pool.stats()), str(pool.health())]
        async with pool.connection():
            with pytest.raises(postgres.PoolTimeout) as caught:
                await pool.fetchone("SELECT 1")
        texts.append(str(caught.value))
        assert f"postgres@127.0.0.1:{postgres_server.port}/{dbname}" in repr(pool)
    for text in texts:
        assert leaked_forms(dsn, text) == [], text
