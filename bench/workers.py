"""What a second process buys: the HTTP example with ``workers = 2`` against ``workers = 1``.

Both run the HTTP example as users start it (``mikros-trio run --workers N``)
with every feature on, as ``http_overhead.py`` runs it (JSON logs to a
file, metrics, spans made and dropped); with two workers the metrics are
prometheus-client's multiprocess files, so their cost is in the figure.
Each setting runs as two replicas, loaded in shuffled rounds (``_compare``);
``ratio`` is median(workers=2) / median(workers=1), ``noise`` the A/A spread
between replicas of one setting.

The load generator on the side: ``wrk -t1 -c32`` (one thread, the least
CPU a saturating generator takes), not pinned, so with one worker it has
the other core to itself and with two it takes its share from the
workers. Its CPU per request is measured (its own user + system time over
the requests it made) and printed with the servers' (the parent and all
its workers): on 2 cores the best two workers can do is about
``2 * server / (server + wrk)`` of one, which the JSON gives as
``ceiling``. The target, ≥ 1.8, is the issue's.

A scrape's cost is measured after the rounds: ``GET /metrics`` on each
setting (with two workers it reads and adds up every worker's files),
median of 20; and an observation's (one counter increment and one
histogram observation, the per-request work of the metrics feature), in
memory and in multiprocess mode, in a separate interpreter each.

Prints human lines, then, as the last line, one JSON object for tools.
Run: ``python bench/workers.py [-n ROUNDS] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, bench/ is on sys.path: the shared modules import directly.
import _http_apps as apps
from _compare import compare, replicated, verdict

TARGET_RATIO = 1.8
CONNECTIONS = 32
#: CPU seconds wrk used, and requests it made, summed over the counted loads.
WRK_USAGE = {"cpu": 0.0, "requests": 0}


def workers_spec(count: int, folder: Path) -> apps.ServerSpec:
    """The HTTP example, every feature on (logs in ``folder``), run with ``--workers count``."""
    spec = apps.framework(apps.free_port(), config=apps.all_features_config(apps.EXAMPLE, folder))
    return dataclasses.replace(spec, args=(*spec.args, "--workers", str(count)))


def children(parent: int) -> list[int]:
    """Pids of the live processes whose parent is ``parent`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def tree_cpu(server: apps.Server) -> float | None:
    """CPU seconds of the server's process and its live children (the workers)."""
    pids = [server.proc.pid, *children(server.proc.pid)]
    return sum(apps.cpu_seconds(pid) or 0.0 for pid in pids)


def counted_load(counted_seconds: float) -> Callable[[int, float], apps.LoadResult]:
    """wrk on a port; loads of ``counted_seconds`` (not the warm-ups) add to WRK_USAGE."""

    def load(port: int, seconds: float) -> apps.LoadResult:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = apps.wrk_load(port, connections=CONNECTIONS, seconds=seconds, threads=1)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if seconds == counted_seconds:
            spent = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            WRK_USAGE["cpu"] += spent
            WRK_USAGE["requests"] += result.count
        return result

    return load


def scrape_ms(port: int, times: int = 20) -> float:
    """Median milliseconds of ``GET /metrics`` on a fresh connection."""
    spent = []
    for _ in range(times):
        began = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=apps.PATIENCE_S)
        try:
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"GET /metrics answered {response.status}")
        finally:
            connection.close()
        spent.append((time.perf_counter() - began) * 1000)
    return statistics.median(spent)


_OBSERVE = """
import time
from prometheus_client import CollectorRegistry, Counter, Histogram
r = CollectorRegistry()
c = Counter("c", "c", ["a"], registry=r).labels("x")
h = Histogram("h", "h", ["a"], registry=r).labels("x")
n = 100_000
began = time.perf_counter()
for _ in range(n):
    c.inc()
    h.observe(0.01)
print((time.perf_counter() - began) / n * 1e6)
"""


def observe_us(folder: Path | None) -> float:
    """Microseconds of one counter increment + one histogram observation."""
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if folder is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    done = subprocess.run(
        [sys.executable, "-c", _OBSERVE], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=4, help="shuffled rounds (default 4)")
    parser.add_argument("--seconds", type=float, default=3.0, help="load per measurement (3)")
    args = parser.parse_args()
    if apps.wrk_path() is None:
        # The Python fallback client needs a core of its own: it cannot load two workers.
        print("wrk is not installed: this benchmark needs it")
        print(json.dumps({"benchmark": "workers", "skipped": "wrk is not installed"}))
        return
    scratch = tempfile.TemporaryDirectory(prefix="bench-workers-")

    def start(folder: Path) -> dict[str, apps.Server]:
        return {
            "framework": apps.Server(workers_spec(2, folder)),
            "bare": apps.Server(workers_spec(1, folder)),
        }

    servers = replicated(start, Path(scratch.name))
    scrapes: dict[str, float] = {}

    figures = compare(
        servers,
        load=counted_load(args.seconds),
        cpu=tree_cpu,
        unit="request",
        target=TARGET_RATIO,
        rounds=args.rounds,
        seconds=args.seconds,
    )
    cpu = figures["cpu_us_per_request"]
    wrk_us = WRK_USAGE["cpu"] / max(WRK_USAGE["requests"], 1) * 1e6
    server_us = cpu["bare"]
    ceiling = 2 * server_us / (server_us + wrk_us) if server_us else None
    # Scrape cost, on fresh servers (compare closed its own), and how the
    # kernel spread a load over the two workers (each one's CPU share).
    split: list[float] = []
    for name, count in (("workers_2", 2), ("workers_1", 1)):
        server = apps.Server(workers_spec(count, Path(scratch.name)))
        try:
            server.wait_ready()
            workers = children(server.proc.pid) or [server.proc.pid]
            before = [apps.cpu_seconds(pid) or 0.0 for pid in workers]
            apps.wrk_load(server.port, connections=CONNECTIONS, seconds=args.seconds, threads=1)
            spent = [(apps.cpu_seconds(p) or 0.0) - b for p, b in zip(workers, before, strict=True)]
            if count == 2:
                split = [round(x / (sum(spent) or 1.0), 3) for x in spent]
            scrapes[name] = round(scrape_ms(server.port), 2)
        finally:
            server.close()
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as folder:
        observe = {
            "in_memory": round(observe_us(None), 2),
            "multiprocess": round(observe_us(Path(folder)), 2),
        }
    medians = figures["medians"]
    summary: dict[str, Any] = {
        "benchmark": "workers",
        "route": "GET /items (empty store), every feature on",
        "framework": "workers = 2",
        "bare": "workers = 1",
        "load_generator": f"wrk -t1 -c{CONNECTIONS} -d{args.seconds:g}s, not pinned",
        "method": "2 replicas of each setting, shuffled rounds, pooled medians (_compare); "
        "CPU of the parent and its workers per request; wrk's own CPU per request",
        "rounds": args.rounds,
        **figures,
        "wrk_cpu_us_per_request": round(wrk_us, 1),
        "ceiling": round(ceiling, 3) if ceiling else None,
        "scrape_ms": scrapes,
        "worker_cpu_split": split,
        "metrics_observe_us": observe,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    print(
        f"workers=2 / workers=1: {figures['ratio']:.3f} "
        f"(median {medians['framework']:.0f} / {medians['bare']:.0f} req/s); " + verdict(figures)
    )
    print(
        f"server CPU {cpu['framework']} / {cpu['bare']} µs per request, wrk {wrk_us:.0f} µs: "
        f"ceiling on {os.cpu_count()} cores ≈ {summary['ceiling']}"
    )
    print(f"GET /metrics: {scrapes} ms; one observation: {observe} µs")
    print(f"CPU split between the two workers under one load: {split}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
