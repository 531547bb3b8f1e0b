"""How long the worker example takes from process start to ready, against bare Trio.

Alternates two measurements, N times each, timed with ``time.perf_counter``:

- ``worker``: ``Popen(python examples/worker/main.py)`` → its ``ticker: running``
  line read (the service is ready: every component started). The worker is
  then stopped with SIGTERM, untimed.
- ``import trio``: ``Popen(python -c "import trio")`` → the process exited,
  the floor any Trio service pays.

Reports both medians and their ratio. Then runs the worker once more under
``-X importtime`` with a wrapper that lists, at exit, which optional heavy
stacks ended up in ``sys.modules``: a worker service must not import the
HTTP or gRPC stacks (quart, hypercorn, purerpc). The slowest top-level
imports are reported too.

Prints human lines, then, as the last line, one JSON object for tools.
Run: ``python bench/startup.py [-n 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "examples" / "worker" / "main.py"
READY = "ticker: running"
PATIENCE_S = 10.0

#: Optional stacks a worker service has no use for, by top-level module.
HEAVY = (
    "quart",
    "quart_trio",
    "hypercorn",
    "purerpc",
    "h2",
    "h11",
    "wsproto",
    "werkzeug",
    "grpc",
    "opentelemetry",
    "httpx",
)
#: Of those, the ones the design forbids a worker to import at all.
FORBIDDEN = ("quart", "hypercorn", "purerpc")

# Runs the worker as `python main.py` would, then reports sys.modules at
# exit (after shutdown too, so a lazy import on the way out still counts).
_WRAPPER = """
import atexit, json, runpy, sys
heavy = {heavy!r}
def report():
    found = sorted({{m.split(".")[0] for m in sys.modules}} & set(heavy))
    print("HEAVY " + json.dumps(found), file=sys.stderr, flush=True)
atexit.register(report)
sys.argv = [{worker!r}]
runpy.run_path({worker!r}, run_name="__main__")
"""


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MIKROS_TRIO_VERBOSE"}


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM ``proc`` if it runs; its exit code and stderr, pipes closed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=PATIENCE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err or ""


def _start_worker(*python_args: str) -> tuple[subprocess.Popen[str], float]:
    """Start the worker; return it once ready, with seconds from Popen to ready."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *python_args],
        cwd=ROOT,
        env=_environ(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    watchdog = threading.Timer(PATIENCE_S, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith(READY):
                return proc, time.perf_counter() - started
    finally:
        watchdog.cancel()
    code, err = _stop(proc)
    raise RuntimeError(f"the worker exited (code {code}) before it was ready:\n{err}")


def worker_ready_s() -> float:
    proc, elapsed = _start_worker(str(WORKER))
    _stop(proc)
    return elapsed


def import_trio_s() -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import trio"], env=_environ(), stdin=subprocess.DEVNULL
    )
    # wait() without a timeout blocks in waitpid; with one, Python 3.11
    # polls with sleeps of up to 50 ms, which would be the resolution.
    watchdog = threading.Timer(PATIENCE_S, proc.kill)
    watchdog.start()
    try:
        code = proc.wait()
    finally:
        watchdog.cancel()
    elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"python -c 'import trio' exited {code}")
    return elapsed


def heavy_imports() -> tuple[list[str], list[tuple[str, float]]]:
    """The heavy stacks the worker imported, and its five slowest top-level imports (ms)."""
    wrapper = _WRAPPER.format(heavy=HEAVY, worker=str(WORKER))
    proc, _ = _start_worker("-X", "importtime", "-c", wrapper)
    code, err = _stop(proc)
    found = re.search(r"^HEAVY (.*)$", err, re.MULTILINE)
    if code != 0 or found is None:
        raise RuntimeError(f"the import probe failed (exit code {code}):\n{err[-2000:]}")
    # -X importtime lines: "import time: self [us] | cumulative | name";
    # top-level imports have no indentation before the name.
    top: dict[str, float] = {}
    for match in re.finditer(r"^import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", err, re.MULTILINE):
        name = match.group(2).strip()
        top[name] = max(top.get(name, 0.0), int(match.group(1)) / 1000)
    slowest = sorted(top.items(), key=lambda item: -item[1])[:5]
    return json.loads(found.group(1)), slowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="runs of each (default 10)")
    args = parser.parse_args()

    workers: list[float] = []
    trios: list[float] = []
    for run in range(1, args.n + 1):
        trios.append(import_trio_s())
        workers.append(worker_ready_s())
        print(
            f"run {run:2d}: import trio {trios[-1] * 1000:6.1f} ms, "
            f"worker ready {workers[-1] * 1000:6.1f} ms"
        )
    worker_ms = statistics.median(workers) * 1000
    trio_ms = statistics.median(trios) * 1000
    ratio = worker_ms / trio_ms

    heavy, slowest = heavy_imports()
    forbidden = sorted(set(heavy) & set(FORBIDDEN))
    print(
        f"median: import trio {trio_ms:.1f} ms, worker ready {worker_ms:.1f} ms, ratio {ratio:.2f}"
    )
    print("slowest top-level imports of the worker (cumulative):")
    for name, ms in slowest:
        print(f"  {ms:7.1f} ms  {name}")
    print(f"heavy stacks imported by the worker: {', '.join(heavy) or 'none'}")
    summary: dict[str, Any] = {
        "benchmark": "startup",
        "example": "examples/worker/main.py",
        "runs": args.n,
        "median_import_trio_ms": round(trio_ms, 1),
        "median_worker_ready_ms": round(worker_ms, 1),
        "ratio": round(ratio, 2),
        "slowest_imports_ms": {name: round(ms, 1) for name, ms in slowest},
        "heavy_imports": heavy,
        "forbidden_imported": forbidden,
        "meets_target": not forbidden,
        "python": sys.version.split()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
