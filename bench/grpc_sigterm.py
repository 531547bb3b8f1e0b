"""How long the gRPC example takes to exit after SIGTERM with idle client channels connected.

For each run: start ``python examples/grpc/main.py`` as users do (with
``MIKROS_TRIO_VERBOSE=1``, so each run also splits into "until the service
stopped" and "from there to process exit"), wait until ``SayHello``
answers, connect 10 grpcio channels (a connection each) that make one
``SayHello`` and then sit idle (their HTTP/2 connections stay open), send SIGTERM and time
``os.kill`` → ``wait()`` returning with ``time.perf_counter``: the whole
graceful shutdown as an orchestrator sees it. N runs (default 15).
Target: median ≤ 100 ms.

No bare purerpc comparison: purerpc's server has no stop at all
(cancelling ``serve_async`` leaves its sockets open; SIGTERM's default
action is its only end).

Prints one line per run for humans, then, as the last line, one JSON object
for tools. Run: ``python bench/grpc_sigterm.py [-n 15]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, bench/ is on sys.path: the shared modules import directly.
from _grpc_apps import EXAMPLE, GrpcServer, framework, free_port, idle_channels, nearest_rank
from _http_apps import all_features_config

TARGET_MEDIAN_MS = 100.0
IDLE_CHANNELS = 10


@dataclass(frozen=True)
class Run:
    total_ms: float  # SIGTERM sent → process exited
    stopped_ms: float  # SIGTERM sent → "service: stopped" read
    code: int


def measure_once(config: Path) -> Run:
    """Start, connect idle channels, SIGTERM; the time to exit."""
    server = GrpcServer(framework(free_port(), verbose=True, config=config))
    try:
        server.wait_ready()
        channels = idle_channels(server.port, IDLE_CHANNELS)
        try:
            total_ms = server.terminate_and_time()
        finally:
            for channel in channels:
                channel.close()
    finally:
        code = server.close()
    stopped_ms = math.nan
    stopped_at = next((at for at, line in server.stderr if "service: stopped" in line), None)
    if stopped_at is not None and server.signalled_at is not None:
        stopped_ms = (stopped_at - server.signalled_at) * 1000
    return Run(total_ms, stopped_ms, code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="runs (default 15)")
    args = parser.parse_args()

    # The example with every feature on, logs to a file (as the overhead bench).
    scratch = tempfile.TemporaryDirectory(prefix="bench-grpc-sigterm-")
    config = all_features_config(EXAMPLE, Path(scratch.name))
    runs: list[Run] = []
    for number in range(1, args.n + 1):
        run = measure_once(config)
        runs.append(run)
        detail = ""
        if not math.isnan(run.stopped_ms):
            detail = f"; service stopped after {run.stopped_ms:5.1f} ms"
        print(
            f"run {number:2d}: SIGTERM → exit {run.total_ms:7.1f} ms (exit code {run.code}{detail})"
        )

    totals = [run.total_ms for run in runs]
    median = statistics.median(totals)
    bad_codes = [run.code for run in runs if run.code != 0]
    stopped = [run.stopped_ms for run in runs if not math.isnan(run.stopped_ms)]
    summary: dict[str, Any] = {
        "benchmark": "grpc_sigterm",
        "example": "examples/grpc/main.py",
        "idle_client_channels": IDLE_CHANNELS,
        "runs": len(runs),
        "median_ms": round(median, 1),
        "p90_ms": round(nearest_rank(totals, 0.9), 1),
        "max_ms": round(max(totals), 1),
        "min_ms": round(min(totals), 1),
        "median_to_service_stopped_ms": (round(statistics.median(stopped), 1) if stopped else None),
        "nonzero_exit_codes": bad_codes,
        "target_median_ms": TARGET_MEDIAN_MS,
        "meets_target": median <= TARGET_MEDIAN_MS and not bad_codes,
        "python": sys.version.split()[0],
    }
    verdict = "met" if summary["meets_target"] else "NOT met"
    print(
        f"framework: median {summary['median_ms']} ms, p90 {summary['p90_ms']} ms, "
        f"max {summary['max_ms']} ms; target median ≤ {TARGET_MEDIAN_MS:g} ms: {verdict}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
