"""Simple queries per second: our Trio-native pool against psycopg's asyncio pool.

Each side is a driver process (this file run with ``--drive SIDE``) holding
one pool of ``--pool`` connections to a throwaway PostgreSQL cluster this
script starts (``mikros_trio._pgcluster``, as the tests do), and running
``--concurrency`` tasks that each lease a connection, run one query and
fetch its row, as fast as they can:

- ``framework``: ``mikros_trio.postgres.Pool`` under ``trio.run``;
- ``bare``: ``psycopg_pool.AsyncConnectionPool`` under ``asyncio.run``, the
  same psycopg connection code, driven by asyncio;
- ``service`` (a reference): the same pool declared as a service does
  (``providers.Resource(postgres.pool, ...)``, a worker running the load)
  with the metrics and tracing features on, so each query is also counted,
  timed and given a span (made and dropped: exporter ``none``);
- ``threads`` (a reference): psycopg's sync ``ConnectionPool`` under Trio,
  each query through ``trio.to_thread`` with a ``CapacityLimiter`` sized to
  the pool: the fallback the issue names, and what services did before.

Same queries, pool size, concurrency and autocommit on every side (one
round trip per query: no BEGIN/COMMIT around it), in the same run. Two
workloads: ``SELECT 1``, and one row of a 10,000-row table by primary key
(a parameter, a prepared statement after psycopg's fifth use). Each side
runs as two replicas loaded in shuffled rounds (``_compare``): ``ratio`` is
median(framework) / median(bare), ``noise`` the A/A spread between
replicas of one side. Client CPU per query (the driver's user + system
time over the queries it ran) is printed too: on a shared machine it
moves much less than the rates. The server shares the machine's cores
with the drivers.

Prints human lines, then, as the last line, one JSON object for tools.
Run: ``python bench/postgres.py [-n ROUNDS] [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

SIDES = ("framework", "bare", "service", "threads")
TARGET_RATIO = 0.9
TABLE_ROWS = 10_000
WORKLOADS = {
    "select_1": ("SELECT 1", False),
    "by_key": ("SELECT id, name, amount FROM items WHERE id = %s", True),
}


# -- the drivers: one side each, in a process of its own ---------------------------------


def _report(count: int, errors: int, seconds: float) -> None:
    print(json.dumps({"count": count, "errors": errors, "seconds": seconds}), flush=True)


async def _worker(
    one: Callable[[int], Awaitable[None]],
    clock: Callable[[], float],
    deadline: float,
    counts: list[int],
    key: int,
) -> None:
    """One task of a load: queries one after the other until ``deadline``, keys spread."""
    while clock() < deadline:
        key = key * 7 % TABLE_ROWS + 1
        try:
            await one(key)
            counts[0] += 1
        except Exception:
            counts[1] += 1


async def _trio_commands(one: Callable[[int], Awaitable[None]], concurrency: int) -> None:
    """Say ready, then run a load per ``run SECONDS`` line on stdin until ``quit``."""
    import trio

    print("ready", flush=True)
    while (line := await trio.to_thread.run_sync(sys.stdin.readline)).strip() != "quit":
        seconds = float(line.split()[1])
        counts = [0, 0]
        deadline = trio.current_time() + seconds
        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for key in range(1, concurrency + 1):
                nursery.start_soon(_worker, one, trio.current_time, deadline, counts, key)
        _report(counts[0], counts[1], time.perf_counter() - began)


def _leased(pool: Any, query: str, keyed: bool) -> Callable[[int], Awaitable[None]]:
    """One query through an async pool's lease (ours or psycopg_pool's: the same calls)."""

    async def one(key: int) -> None:
        async with pool.connection() as conn:
            cursor = await conn.execute(query, (key,) if keyed else None)
            await cursor.fetchone()

    return one


def drive_trio(side: str, dsn: str, size: int, concurrency: int, workload: str) -> None:
    import trio

    query, keyed = WORKLOADS[workload]

    async def main() -> None:
        if side == "framework":
            from mikros_trio import postgres

            async with postgres.Pool(dsn, min_size=size, max_size=size, autocommit=True) as pool:
                await _trio_commands(_leased(pool, query, keyed), concurrency)
            return
        from psycopg_pool import ConnectionPool

        with ConnectionPool(
            dsn, min_size=size, max_size=size, kwargs={"autocommit": True}, open=False
        ) as sync_pool:
            sync_pool.wait()
            limiter = trio.CapacityLimiter(size)

            def blocking(key: int) -> None:
                with sync_pool.connection() as conn:
                    conn.execute(query, (key,) if keyed else None).fetchone()

            async def one(key: int) -> None:
                await trio.to_thread.run_sync(blocking, key, limiter=limiter)

            await _trio_commands(one, concurrency)

    trio.run(main)


SERVICE_TOML = """
name = "bench"
types = ["worker"]
version = "1.0.0"
envs = ["DATABASE_URL"]
[features.env]
secrets = ["DATABASE_URL"]
[features.metrics]
enabled = true
host = "127.0.0.1"
port = 0
[features.tracing]
enabled = true
exporter = "none"
"""


def drive_service(dsn: str, size: int, concurrency: int, workload: str) -> None:
    """Our pool as a service declares it: a Resource, metrics and tracing on, in a worker."""
    import os
    import tempfile

    import trio
    from dependency_injector import providers

    import mikros_trio
    from mikros_trio import ServiceContainer, postgres

    query, keyed = WORKLOADS[workload]

    class Load:
        def __init__(self, db: postgres.Pool) -> None:
            self.db = db

        async def run(self, lifetime: mikros_trio.Lifetime) -> None:
            await _trio_commands(_leased(self.db, query, keyed), concurrency)

    class Container(ServiceContainer):
        db = providers.Resource(
            postgres.pool,
            dsn=ServiceContainer.env.provided.secret.call("DATABASE_URL"),
            min_size=size,
            max_size=size,
            autocommit=True,
        )
        worker = providers.Factory(Load, db=db)

    os.environ["DATABASE_URL"] = dsn
    with tempfile.TemporaryDirectory(prefix="bench-pg-service-") as folder:
        config = Path(folder) / "service.toml"
        config.write_text(SERVICE_TOML)

        async def main() -> int:
            return await mikros_trio.run(Container, config)

        raise SystemExit(trio.run(main))


def drive_asyncio(dsn: str, size: int, concurrency: int, workload: str) -> None:
    import asyncio

    from psycopg_pool import AsyncConnectionPool

    query, keyed = WORKLOADS[workload]

    async def main() -> None:
        pool = AsyncConnectionPool(
            dsn, min_size=size, max_size=size, kwargs={"autocommit": True}, open=False
        )
        await pool.open(wait=True)
        loop = asyncio.get_running_loop()
        one = _leased(pool, query, keyed)
        print("ready", flush=True)
        while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip() != "quit":
            seconds = float(line.split()[1])
            counts = [0, 0]
            deadline = loop.time() + seconds
            began = time.perf_counter()
            await asyncio.gather(
                *(
                    _worker(one, loop.time, deadline, counts, key)
                    for key in range(1, concurrency + 1)
                )
            )
            _report(counts[0], counts[1], time.perf_counter() - began)
        await pool.close()

    asyncio.run(main())


# -- the parent: a cluster, the drivers, the rounds ---------------------------------------


class Driver:
    """One driver process, shaped as ``_compare`` wants a server (``port`` is its key)."""

    def __init__(self, key: int, side: str, args: list[str]) -> None:
        self.port = key
        self.side = side
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--drive", side, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _line(self, starts: str) -> str:
        """The next stdout line starting with ``starts`` (a service's log lines are skipped)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(starts):
                return line
        raise RuntimeError(f"{self.side} driver exited (code {self.proc.wait()})")

    def wait_ready(self) -> None:
        self._line("ready")

    def run(self, seconds: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"run {seconds}\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._line('{"count"'))
        return result

    def close(self) -> int:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def run_workload(
    workload: str, dsn: str, args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    from _compare import compare, replicated
    from _http_apps import LoadResult

    drivers: dict[int, Driver] = {}
    options = [dsn, str(args.pool), str(args.concurrency), workload]

    def start(folder: Path) -> dict[str, Driver]:
        made = {}
        for side in SIDES:
            driver = Driver(len(drivers), side, options)
            drivers[driver.port] = driver
            made[side] = driver
        return made

    servers = replicated(start, scratch)
    if args.no_threads:
        servers.pop("threads")
        for driver in [d for d in drivers.values() if d.side == "threads"]:
            driver.close()

    def load(key: int, seconds: float) -> LoadResult:
        result = drivers[key].run(seconds)
        return LoadResult(result["count"] / result["seconds"], result["count"], result["errors"])

    print(f"-- {workload}: {WORKLOADS[workload][0]}")
    return compare(
        servers,
        load=load,
        unit="call",
        target=TARGET_RATIO,
        rounds=args.rounds,
        seconds=args.seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=3, help="shuffled rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=2.0, help="load per measurement (2)")
    parser.add_argument("--pool", type=int, default=10, help="connections per pool (10)")
    parser.add_argument("--concurrency", type=int, default=32, help="tasks per driver (32)")
    parser.add_argument("--no-threads", action="store_true", help="skip the thread-pool side")
    parser.add_argument("--drive", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("drive_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        dsn, size, concurrency, workload = args.drive_args
        if args.drive == "bare":
            drive_asyncio(dsn, int(size), int(concurrency), workload)
        elif args.drive == "service":
            drive_service(dsn, int(size), int(concurrency), workload)
        else:
            drive_trio(args.drive, dsn, int(size), int(concurrency), workload)
        return

    import tempfile

    from _compare import verdict

    from mikros_trio._pgcluster import Cluster, binaries

    if binaries() is None:
        print("PostgreSQL is not installed: this benchmark needs its server binaries")
        print(json.dumps({"benchmark": "postgres", "skipped": "PostgreSQL is not installed"}))
        return
    results: dict[str, Any] = {}
    with Cluster() as cluster, tempfile.TemporaryDirectory(prefix="bench-pg-") as scratch:
        dsn = cluster.create_database("bench")
        cluster.psql(
            "CREATE TABLE items (id int PRIMARY KEY, name text, amount numeric);"
            "INSERT INTO items SELECT n, 'item ' || n, n * 1.5 "
            f"FROM generate_series(1, {TABLE_ROWS}) n;"
            "ANALYZE items",
            "bench",
        )
        for workload in WORKLOADS:
            folder = Path(scratch) / workload
            folder.mkdir()
            results[workload] = run_workload(workload, dsn, args, folder)
            print(f"{workload}: ratio {results[workload]['ratio']} ({verdict(results[workload])})")
    summary = {
        "benchmark": "postgres",
        "pool": args.pool,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "target_ratio": TARGET_RATIO,
        "meets_target": all(figures["meets_target"] for figures in results.values()),
        **results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
