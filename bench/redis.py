"""Commands per second through mikros_trio.redis against coredis's own client, both under Trio.

Each variant runs ``GET`` from 32 concurrent tasks on a 4-connection pool
for a fixed time, in a fresh process per load, against one throwaway
``redis-server`` (127.0.0.1, no persistence):

- ``coredis``: coredis's ``Redis`` on its own ``ConnectionPool``, retries
  off (as ours), no telemetry: the baseline;
- ``coredis-b``: the same again, an A/A comparison: ``noise`` is the ratio
  of the two medians (smaller over larger), the resolution of this run;
- ``ours``: the client :func:`mikros_trio.redis.client` yields, with no
  service telemetry active (no calls);
- ``ours-calls``: the same with a telemetry hub active and one observer
  that does nothing: what making a call per command costs.

Rounds run every variant once, in an order shuffled per round (seeded).
``ratio`` is median(ours-calls) / median(coredis); ``ratio_no_calls`` the
same without calls. Figures from a shared machine move by tens of percent
between loads; read them against ``noise``.

Prints human lines, then, as the last line, one JSON object for tools.
Run: ``python bench/redis.py [-n ROUNDS] [--seconds 1]``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

VARIANTS = ("coredis", "coredis-b", "ours", "ours-calls")
TASKS = 32
CONNECTIONS = 4


async def _load(variant: str, url: str, seconds: float) -> float:
    """GETs per second from TASKS tasks for ``seconds``, through ``variant``'s client."""
    import coredis
    import trio
    from coredis.pool import ConnectionPool
    from coredis.retry import NoRetryPolicy

    from mikros_trio import redis
    from mikros_trio.ext import Observer, Telemetry

    count = 0

    async def run(client: coredis.Redis[bytes]) -> float:
        nonlocal count
        await client.set("key", b"v" * 32)
        stop = trio.current_time() + seconds

        async def task() -> None:
            nonlocal count
            while trio.current_time() < stop:
                await client.get("key")
                count += 1

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(TASKS):
                nursery.start_soon(task)
        return count / (trio.current_time() - start)

    if variant.startswith("coredis"):
        pool = ConnectionPool.from_url(url, max_connections=CONNECTIONS)
        async with coredis.Redis(connection_pool=pool, retry_policy=NoRetryPolicy()) as client:
            return await run(client)
    if variant == "ours-calls":
        telemetry = Telemetry("bench")
        telemetry.add_observer(Observer())
        telemetry.activate()
    async with aclosing(redis.client(url, max_connections=CONNECTIONS)) as resource:
        return await run(await anext(resource))


def _server(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    process = subprocess.Popen([*args, "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            time.sleep(0.02)
    process.kill()
    raise SystemExit(f"redis-server did not listen on port {port} within 10 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    options, _ = parser.parse_known_args()
    if options.variant:  # one load, in this fresh process
        import trio

        print(trio.run(_load, options.variant, options.url, options.seconds))
        return
    rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    shuffler = random.Random(12)
    with tempfile.TemporaryDirectory() as scratch:
        process, port = _server(Path(scratch))
        url = f"redis://127.0.0.1:{port}/0"
        try:
            for round_ in range(options.rounds):
                order = list(VARIANTS)
                shuffler.shuffle(order)
                for variant in order:
                    command = [sys.executable, __file__, "--variant", variant, "--url", url]
                    command += ["--seconds", str(options.seconds)]
                    done = subprocess.run(command, capture_output=True, text=True, check=True)
                    rates[variant].append(float(done.stdout.split()[-1]))
                print(
                    f"round {round_ + 1}: "
                    + ", ".join(f"{v} {rates[v][-1]:.0f}/s" for v in VARIANTS)
                )
        finally:
            process.terminate()
            process.wait(10)
    median = {variant: statistics.median(values) for variant, values in rates.items()}
    a, b = median["coredis"], median["coredis-b"]
    figures = {
        "benchmark": "redis",
        "unit": "GET/s",
        "tasks": TASKS,
        "connections": CONNECTIONS,
        "rounds": options.rounds,
        "seconds": options.seconds,
        "rates": rates,
        "median": median,
        "ratio": median["ours-calls"] / a,
        "ratio_no_calls": median["ours"] / a,
        "noise": min(a, b) / max(a, b),
    }
    print(f"ours (calls on) / coredis: {figures['ratio']:.2f}, noise {figures['noise']:.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
