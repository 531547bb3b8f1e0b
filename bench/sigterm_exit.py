"""How long the worker example takes to exit after SIGTERM.

Starts ``examples/worker/main.py`` as users do (``python main.py`` from the
repository root) N times. For each run it waits for the ``ticker: running``
line, then times ``os.kill(SIGTERM)`` → ``wait()`` returning with
``time.perf_counter``: the whole graceful shutdown (drain, stop hooks,
interpreter exit), as an orchestrator sees it. The worker's job takes
50 ms and the one in flight is allowed to finish, so up to 50 ms of each
measurement is the example's own work, not the framework's. The worker
runs with ``MIKROS_TRIO_VERBOSE=1`` so each run also splits into "until
the service stopped" and "from there to process exit".

Target: median ≤ 100 ms. Prints one line per run for humans, then, as the
last line, one JSON object for tools. Run: ``python bench/sigterm_exit.py [-n 15]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "examples" / "worker" / "main.py"
READY = "ticker: running"
TARGET_MEDIAN_MS = 100.0
#: Bound on every wait, so a hung worker fails the benchmark instead of hanging it.
PATIENCE_S = 10.0


class Worker:
    """The worker example as a child process, its stderr timestamped line by line.

    It runs with ``MIKROS_TRIO_VERBOSE=1`` so the lifecycle log tells when
    the service itself had stopped; what follows that line is the
    interpreter exiting.
    """

    def __init__(self) -> None:
        env = {**os.environ, "MIKROS_TRIO_VERBOSE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append((time.perf_counter(), line))

    def wait_ready(self) -> None:
        """Return once the worker has printed its ready line."""
        assert self.proc.stdout is not None
        watchdog = threading.Timer(PATIENCE_S, self.proc.kill)
        watchdog.start()
        try:
            for line in self.proc.stdout:
                if line.startswith(READY):
                    return
        finally:
            watchdog.cancel()
        code = self.close()
        raise RuntimeError(f"the worker exited (code {code}) before printing {READY!r}")

    def stopped_at(self) -> float | None:
        """When the lifecycle log said the service had stopped."""
        return next((t for t, line in self.stderr if "service: stopped" in line), None)

    def close(self) -> int:
        """Wait for the worker (killing it if it overstays), read it out, close its pipes."""
        try:
            code = self.proc.wait(PATIENCE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(PATIENCE_S)
        self._reader.join(PATIENCE_S)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code


@dataclass(frozen=True)
class Run:
    total_ms: float  # SIGTERM sent → process exited
    stopped_ms: float  # SIGTERM sent → "service: stopped" read
    code: int


def measure_once() -> Run:
    """One start, SIGTERM once ready, and the times it took to stop and to exit."""
    worker = Worker()
    try:
        worker.wait_ready()
        # wait() without a timeout blocks in waitpid; with one, Python 3.11
        # polls with sleeps of up to 50 ms, which would be the resolution.
        watchdog = threading.Timer(PATIENCE_S, worker.proc.kill)
        watchdog.start()
        sent = time.perf_counter()
        os.kill(worker.proc.pid, signal.SIGTERM)
        worker.proc.wait()
        exited = time.perf_counter()
        watchdog.cancel()
    finally:
        code = worker.close()
    stopped = worker.stopped_at()
    stopped_ms = (stopped - sent) * 1000 if stopped is not None else math.nan
    return Run((exited - sent) * 1000, stopped_ms, code)


def nearest_rank(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="number of runs (default 15)")
    args = parser.parse_args()

    runs: list[Run] = []
    for number in range(1, args.n + 1):
        run = measure_once()
        runs.append(run)
        print(
            f"run {number:2d}: SIGTERM → exit {run.total_ms:6.1f} ms "
            f"(service stopped after {run.stopped_ms:5.1f} ms; exit code {run.code})"
        )

    ordered = sorted(run.total_ms for run in runs)
    median = statistics.median(ordered)
    bad_codes = [run.code for run in runs if run.code != 0]
    summary: dict[str, Any] = {
        "benchmark": "sigterm_exit",
        "example": "examples/worker/main.py",
        "runs": args.n,
        "median_ms": round(median, 1),
        "p90_ms": round(nearest_rank(ordered, 0.9), 1),
        "max_ms": round(ordered[-1], 1),
        "min_ms": round(ordered[0], 1),
        # The breakdown: SIGTERM → the service's own "stopped" (signal
        # handling, the job in flight, stop hooks), then → process exit
        # (trio.run returning, atexit, interpreter finalization).
        "median_to_service_stopped_ms": round(statistics.median(r.stopped_ms for r in runs), 1),
        "median_stopped_to_exit_ms": round(
            statistics.median(r.total_ms - r.stopped_ms for r in runs), 1
        ),
        "target_median_ms": TARGET_MEDIAN_MS,
        "meets_target": median <= TARGET_MEDIAN_MS and not bad_codes,
        "nonzero_exit_codes": bad_codes,
        "python": sys.version.split()[0],
    }
    print(
        f"median {summary['median_ms']} ms, p90 {summary['p90_ms']} ms, "
        f"max {summary['max_ms']} ms; target median ≤ {TARGET_MEDIAN_MS:g} ms: "
        + ("met" if summary["meets_target"] else "NOT met")
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
