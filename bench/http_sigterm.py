"""How long the HTTP example takes to exit after SIGTERM with idle keep-alive connections open.

For each run: start the server as its own process, wait until it answers,
open 10 keep-alive connections that each make one ``GET /items`` and then
sit idle, send SIGTERM and time ``os.kill`` → ``wait()`` returning with
``time.perf_counter``: the whole graceful shutdown as an orchestrator sees
it. N runs (default 15) of each server:

- ``framework``: ``python examples/http/main.py`` as users start it (with
  ``MIKROS_TRIO_VERBOSE=1``, so each run also splits into "until the
  service stopped" and "from there to process exit"). Target: median
  ≤ 100 ms.
- ``bare``: the same QuartTrio app on ``hypercorn.trio.serve`` with a
  shutdown trigger on SIGTERM, for comparison. hypercorn waits its
  ``graceful_timeout`` (3 s) for connections like these: expect ≈ 3000 ms.

Prints one line per run for humans, then, as the last line, one JSON object
for tools. Run: ``python bench/http_sigterm.py [-n 15]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, bench/ is on sys.path: the shared module imports directly.
from _http_apps import (
    EXAMPLE,
    Server,
    ServerSpec,
    all_features_config,
    bare,
    framework,
    free_port,
    keep_alive_connections,
    nearest_rank,
)

TARGET_MEDIAN_MS = 100.0
IDLE_CONNECTIONS = 10


@dataclass(frozen=True)
class Run:
    total_ms: float  # SIGTERM sent → process exited
    stopped_ms: float  # SIGTERM sent → "service: stopped" read (framework only)
    code: int


def measure_once(spec: ServerSpec) -> Run:
    """Start, open idle keep-alive connections, SIGTERM; the time to exit."""
    server = Server(spec)
    try:
        server.wait_ready()
        sockets = keep_alive_connections(server.port, IDLE_CONNECTIONS)
        try:
            total_ms = server.terminate_and_time()
        finally:
            for sock in sockets:
                sock.close()
    finally:
        code = server.close()
    stopped_ms = math.nan
    stopped_at = next((at for at, line in server.stderr if "service: stopped" in line), None)
    if stopped_at is not None and server.signalled_at is not None:
        stopped_ms = (stopped_at - server.signalled_at) * 1000
    return Run(total_ms, stopped_ms, code)


def summarize(name: str, runs: list[Run], *, target: float | None) -> dict[str, Any]:
    totals = [run.total_ms for run in runs]
    median = statistics.median(totals)
    bad_codes = [run.code for run in runs if run.code != 0]
    summary: dict[str, Any] = {
        "runs": len(runs),
        "median_ms": round(median, 1),
        "p90_ms": round(nearest_rank(totals, 0.9), 1),
        "max_ms": round(max(totals), 1),
        "min_ms": round(min(totals), 1),
        "nonzero_exit_codes": bad_codes,
    }
    stopped = [run.stopped_ms for run in runs if not math.isnan(run.stopped_ms)]
    if stopped:
        summary["median_to_service_stopped_ms"] = round(statistics.median(stopped), 1)
    if target is not None:
        summary["target_median_ms"] = target
        summary["meets_target"] = median <= target and not bad_codes
    line = (
        f"{name}: median {summary['median_ms']} ms, p90 {summary['p90_ms']} ms, "
        f"max {summary['max_ms']} ms"
    )
    if target is not None:
        verdict = "met" if summary["meets_target"] else "NOT met"
        line += f"; target median ≤ {target:g} ms: {verdict}"
    print(line)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="runs of each server (default 15)")
    args = parser.parse_args()

    # The example with every feature on, logs to a file (as the overhead bench).
    scratch = tempfile.TemporaryDirectory(prefix="bench-http-sigterm-")
    config = all_features_config(EXAMPLE, Path(scratch.name))
    servers: dict[str, Callable[[], ServerSpec]] = {
        "framework": lambda: framework(free_port(), verbose=True, config=config),
        "bare": lambda: bare(free_port()),
    }
    results: dict[str, list[Run]] = {}
    for name, make in servers.items():
        runs = results[name] = []
        for number in range(1, args.n + 1):
            run = measure_once(make())
            runs.append(run)
            detail = ""
            if not math.isnan(run.stopped_ms):
                detail = f"; service stopped after {run.stopped_ms:5.1f} ms"
            print(
                f"{name} run {number:2d}: SIGTERM → exit {run.total_ms:7.1f} ms "
                f"(exit code {run.code}{detail})"
            )

    summary: dict[str, Any] = {
        "benchmark": "http_sigterm",
        "example": "examples/http/main.py",
        "idle_keep_alive_connections": IDLE_CONNECTIONS,
        "framework": summarize("framework", results["framework"], target=TARGET_MEDIAN_MS),
        "bare_hypercorn_quart_trio": summarize("bare hypercorn", results["bare"], target=None),
        "python": sys.version.split()[0],
    }
    summary["meets_target"] = summary["framework"]["meets_target"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
