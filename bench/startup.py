"""Start-up and memory: the HTTP example against uvicorn and bare hypercorn-trio; the worker.

HTTP (the issue's target: an app on our kind starts at most twice as slowly as
the same app on uvicorn: ``ours_starlette`` against ``uvicorn``). Servers, each
started as its users start it, each answering the same routes and the same
``GET /readyz`` (see ``_startup_apps.py``):

- ``ours``: ``python -m mikros_trio.cli run examples/http/main.py --config X``
  with metrics and tracing off and no access log (the like-for-like peer of
  a bare Starlette app; the logger feature is always on);
- ``ours_all``: the same with every feature the example enables (access log
  to a file, metrics, tracing with the no-op exporter);
- ``ours_starlette``: ``examples/starlette`` (a Starlette app on our kind)
  the same way, features off as for ``ours``: the like-for-like peer of
  uvicorn + Starlette, since a QuartTrio app alone imports more than all of
  uvicorn + Starlette;
- ``uvicorn``: ``python -m uvicorn --factory _startup_apps:starlette_app``
  (h11 and asyncio unless httptools and uvloop are installed: stated in the
  output);
- ``hypercorn``: the same routes on QuartTrio under ``hypercorn.trio.serve``.

Each round starts every server once, in an order shuffled per round
(seeded), and for each measures:

- start → ready: ``Popen`` → the first ``GET /readyz`` answered 200, polled
  every 2 ms on a new connection (the same raw-socket probe for all); and,
  at that moment, the ms its threads ran on a CPU and waited for one
  (``/proc/PID/task/*/schedstat``): the CPU time is the figure the other
  load on a shared machine moves least, the wait says how much it moved
  the wall time;
- idle RSS: ``VmRSS`` from ``/proc/PID/status`` 0.3 s after ready;
- per idle keep-alive connection: open ``CONNECTIONS`` connections that each
  make one ``GET /readyz`` and stay open, wait 0.3 s, RSS delta / count
  (every connection is checked to be still open after the reading).

Then each server is started once more under ``-X importtime``: the ms its
imports took, by package (each module's own time, counted to its package).

Reported: per server the median of each figure, ours/uvicorn ratios from
the pooled medians and per round, and the noise: each server's start → ready
interquartile range over its median (the spread of one server against
itself in this run; a ratio closer to the target than that is within noise).

Worker: the worker example's start → ``ticker: running`` against
``python -c "import trio"`` (the floor any Trio service pays), and which
heavy stacks the worker imported (it must import no HTTP or gRPC stack).

Prints human lines, then, as the last line, one JSON object for tools.
Run: ``python bench/startup.py [-n 5] [--connections 200]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from _http_apps import all_features_config, free_port, keep_alive_connections

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
EXAMPLE = ROOT / "examples" / "http"
STARLETTE = ROOT / "examples" / "starlette"
WORKER = ROOT / "examples" / "worker" / "main.py"
READY = "ticker: running"
PATIENCE_S = 15.0
POLL_S = 0.002
SETTLE_S = 0.3
TARGET = 2.0
#: Packages listed in each server's import profile, by time spent.
IMPORTS_SHOWN = 12
IMPORT_RUNS = 3

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
    "fastapi",
    "starlette",
    "pydantic",
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

_STARLETTE_OFF = """\
# The Starlette example with metrics off and no access log.
name = "notes"
types = ["http:8080"]
version = "v0.1.0"

[features.logger]
output = "stdout"
access_log = false
"""

_FEATURES_OFF = """\
# The HTTP example with metrics and tracing off and no access log.
name = "items"
types = ["http:8080"]
version = "v0.1.0"
product = "EXAMPLES"

[features.logger]
output = "stdout"
access_log = false
"""


def _environ(extra: Mapping[str, str] = {}) -> dict[str, str]:
    # An installed service runs from cached bytecode; without it every start
    # would compile the framework's modules (and the peers' apps) again and
    # this would measure the compiler. The warm-up round writes the caches.
    skip = {"MIKROS_TRIO_VERBOSE", "PYTHONDONTWRITEBYTECODE"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    return {**env, **extra}


# -- HTTP ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """How to start one server on a port."""

    name: str
    command: Callable[[int], Sequence[str]]
    env: Callable[[int], Mapping[str, str]] = lambda port: {}


def peers(scratch: Path) -> list[Peer]:
    off = scratch / "features_off.toml"
    off.write_text(_FEATURES_OFF)
    every = all_features_config(EXAMPLE, scratch)
    main = str(EXAMPLE / "main.py")

    starlette_off = scratch / "starlette_off.toml"
    starlette_off.write_text(_STARLETTE_OFF)

    def ours(config: Path, target: str = main) -> Callable[[int], Sequence[str]]:
        return lambda port: (
            sys.executable,
            "-m",
            "mikros_trio.cli",
            "run",
            target,
            "--config",
            str(config),
        )

    def port_env(port: int) -> Mapping[str, str]:
        return {"MIKROS_HTTP_PORT": str(port)}

    return [
        Peer("ours", ours(off), port_env),
        Peer("ours_all", ours(every), port_env),
        Peer("ours_starlette", ours(starlette_off, str(STARLETTE / "main.py")), port_env),
        Peer(
            "uvicorn",
            lambda port: (
                *(sys.executable, "-m", "uvicorn", "--factory", "_startup_apps:starlette_app"),
                *("--app-dir", str(BENCH), "--host", "127.0.0.1", "--port", str(port)),
                *("--log-level", "warning", "--no-access-log"),
            ),
        ),
        Peer(
            "hypercorn",
            lambda port: (sys.executable, str(BENCH / "_startup_apps.py"), str(port)),
        ),
    ]


_PROBE = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def _ready(port: int) -> bool:
    """One probe: a new connection, ``GET /readyz``, True on a 200 status line."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(_PROBE)
            head = b""
            while len(head) < 12 and (chunk := sock.recv(64)):
                head += chunk
            return head.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        found = re.search(r"^VmRSS:\s+(\d+) kB", status.read(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return int(found.group(1))


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def on_cpu_ms(pid: int) -> tuple[float, float]:
    """ms the process's threads ran, and ms they waited runnable for a CPU (``schedstat``).

    Run time is what a start costs the machine, whatever else runs on it;
    the wait is how much of the wall time the other load on the machine took.
    """
    ran = waited = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            fields = (task / "schedstat").read_text().split()
            ran += int(fields[0])
            waited += int(fields[1])
    return ran / 1e6, waited / 1e6


@dataclass(frozen=True)
class Ready:
    """A started server, ready: its process and port, and what getting ready took."""

    proc: subprocess.Popen[bytes]
    port: int
    wall_ms: float
    cpu_ms: float
    wait_ms: float


@dataclass(frozen=True)
class Sample:
    ready_ms: float
    cpu_ms: float
    wait_ms: float
    rss_mb: float
    per_connection_kb: float


@contextlib.contextmanager
def started(peer: Peer, log: IO[str], *flags: str) -> Iterator[Ready]:
    """Start ``peer`` (``flags`` go to its interpreter), yield it once ready; SIGTERM it after."""
    port = free_port()
    executable, *rest = peer.command(port)
    began = time.perf_counter()
    proc = subprocess.Popen(
        [executable, *flags, *rest],
        cwd=ROOT,
        env=_environ(peer.env(port)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = began + PATIENCE_S
        while not _ready(port):
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"{peer.name} never got ready (exit code {proc.poll()})")
            time.sleep(POLL_S)
        wall_ms = (time.perf_counter() - began) * 1000
        yield Ready(proc, port, wall_ms, *on_cpu_ms(proc.pid))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(PATIENCE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(peer: Peer, connections: int, log: IO[str]) -> Sample:
    """Start ``peer``, time it to ready, read its memory idle and with idle connections; stop it."""
    with started(peer, log) as ready:
        time.sleep(SETTLE_S)
        idle = rss_kb(ready.proc.pid)
        # /readyz: the one route every peer answers alike (the Starlette
        # example has no /items).
        opened = keep_alive_connections(ready.port, connections, "/readyz")
        try:
            time.sleep(SETTLE_S)
            loaded = rss_kb(ready.proc.pid)
            closed = sum(not _still_open(sock) for sock in opened)
            if closed:
                raise RuntimeError(f"{peer.name} closed {closed} idle connections early")
        finally:
            for sock in opened:
                sock.close()
    per_connection = (loaded - idle) / connections
    return Sample(ready.wall_ms, ready.cpu_ms, ready.wait_ms, idle / 1024, per_connection)


def import_profile(peer: Peer, scratch: Path) -> dict[str, float]:
    """ms of import a start to ready spends in each top-level package (``-X importtime``).

    Each module's own time is counted to its own package, whoever imported
    it: what the process paid for each package; ``total`` is the sum of all.
    Medians of ``IMPORT_RUNS`` starts, one alone being at the mercy of the
    machine's other load.
    """
    runs: list[dict[str, float]] = []
    for _ in range(IMPORT_RUNS):
        trace = scratch / f"{peer.name}.importtime"
        with open(trace, "w") as log, started(peer, log, "-X", "importtime"):
            pass
        spent: dict[str, float] = {}
        text = trace.read_text()
        for match in re.finditer(r"^import time:\s+(\d+) \|\s+\d+ \| +(\S+)$", text, re.M):
            package = match.group(2).split(".")[0]
            spent[package] = spent.get(package, 0.0) + int(match.group(1)) / 1000
        spent["total"] = sum(spent.values())
        runs.append(spent)
    median = {
        name: statistics.median(run.get(name, 0.0) for run in runs) for name in set().union(*runs)
    }
    top = sorted(median.items(), key=lambda item: -item[1])[: IMPORTS_SHOWN + 1]
    return {name: round(ms, 1) for name, ms in top}


def _iqr_over_median(values: Sequence[float]) -> float:
    if len(values) < 4:
        return (max(values) - min(values)) / statistics.median(values)
    quartiles = statistics.quantiles(values, n=4)
    return (quartiles[2] - quartiles[0]) / statistics.median(values)


def http_startup(rounds: int, connections: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch, open(Path(scratch) / "stderr.log", "w") as log:
        servers = peers(Path(scratch))
        samples: dict[str, list[Sample]] = {peer.name: [] for peer in servers}
        round_ratios: list[float] = []
        for peer in servers:  # warm-up: the page cache and .pyc files, not counted
            measure(peer, 1, log)
        for number in range(1, rounds + 1):
            order = list(servers)
            random.Random(number).shuffle(order)
            for peer in order:
                sample = measure(peer, connections, log)
                samples[peer.name].append(sample)
                print(
                    f"round {number}: {peer.name:9s} ready {sample.ready_ms:6.1f} ms "
                    f"(on CPU {sample.cpu_ms:5.1f}, waiting for one {sample.wait_ms:5.1f}), "
                    f"idle RSS {sample.rss_mb:5.1f} MB, "
                    f"{sample.per_connection_kb:5.1f} KB per idle connection"
                )
            like = samples["ours_starlette"][-1].ready_ms
            round_ratios.append(like / samples["uvicorn"][-1].ready_ms)
        imports = {peer.name: import_profile(peer, Path(scratch)) for peer in servers}

    def medians(field: str) -> dict[str, float]:
        return {
            name: round(statistics.median(getattr(s, field) for s in runs), 1)
            for name, runs in samples.items()
        }

    ready = medians("ready_ms")
    cpu = medians("cpu_ms")
    rss = medians("rss_mb")
    per_connection = medians("per_connection_kb")
    # The target compares like with like: a Starlette app on our kind
    # against the same app on uvicorn. A QuartTrio app alone imports more
    # than uvicorn + Starlette do (see imports_ms), so ``ours`` is reported
    # beside it, not held to it.
    ratio = ready["ours_starlette"] / ready["uvicorn"]
    return {
        "rounds": rounds,
        "connections": connections,
        "ready_ms": ready,
        "ready_ms_runs": {n: [round(s.ready_ms, 1) for s in r] for n, r in samples.items()},
        "ready_cpu_ms": cpu,
        "ready_cpu_wait_ms": medians("wait_ms"),
        "idle_rss_mb": rss,
        "per_connection_kb": per_connection,
        "ratio_ready_ours_over_uvicorn": round(ready["ours"] / ready["uvicorn"], 2),
        "ratio_ready_ours_all_over_uvicorn": round(ready["ours_all"] / ready["uvicorn"], 2),
        "ratio_ready_ours_starlette_over_uvicorn": round(ratio, 2),
        "ratio_ready_ours_over_hypercorn": round(ready["ours"] / ready["hypercorn"], 2),
        "ratio_ready_cpu_ours_over_uvicorn": round(cpu["ours"] / cpu["uvicorn"], 2),
        "ratio_rss_ours_over_uvicorn": round(rss["ours"] / rss["uvicorn"], 2),
        "ratio_per_connection_ours_over_uvicorn": round(
            per_connection["ours"] / per_connection["uvicorn"], 2
        ),
        "per_round_ratios": [round(r, 2) for r in round_ratios],
        "imports_ms": imports,
        "noise": {
            name: round(_iqr_over_median([s.ready_ms for s in runs]), 3)
            for name, runs in samples.items()
        },
        "target_ratio": TARGET,
        "meets_target": ratio <= TARGET,
        "uvicorn": _uvicorn_flavour(),
    }


def _uvicorn_flavour() -> str:
    """uvicorn's version and the HTTP parser and loop it picks (httptools/uvloop when installed)."""
    import importlib.util

    import uvicorn

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn {uvicorn.__version__} ({http}, {loop})"


# -- worker -------------------------------------------------------------------------


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


def worker_startup(rounds: int) -> dict[str, Any]:
    workers: list[float] = []
    trios: list[float] = []
    worker_ready_s()  # warm-up: the page cache and .pyc files, not counted
    for number in range(1, rounds + 1):
        trios.append(import_trio_s())
        workers.append(worker_ready_s())
        print(
            f"round {number}: import trio {trios[-1] * 1000:6.1f} ms, "
            f"worker ready {workers[-1] * 1000:6.1f} ms"
        )
    worker_ms = statistics.median(workers) * 1000
    trio_ms = statistics.median(trios) * 1000
    heavy, slowest = heavy_imports()
    print("slowest top-level imports of the worker (cumulative):")
    for name, ms in slowest:
        print(f"  {ms:7.1f} ms  {name}")
    print(f"heavy stacks imported by the worker: {', '.join(heavy) or 'none'}")
    return {
        "example": "examples/worker/main.py",
        "median_import_trio_ms": round(trio_ms, 1),
        "median_worker_ready_ms": round(worker_ms, 1),
        "ratio": round(worker_ms / trio_ms, 2),
        "noise": round(_iqr_over_median(workers), 3),
        "slowest_imports_ms": {name: round(ms, 1) for name, ms in slowest},
        "heavy_imports": heavy,
        "forbidden_imported": sorted(set(heavy) & set(FORBIDDEN)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="rounds (default 5)")
    parser.add_argument(
        "--connections", type=int, default=200, help="idle keep-alive connections (default 200)"
    )
    args = parser.parse_args()

    http = http_startup(args.n, args.connections)
    ready, rss, per = http["ready_ms"], http["idle_rss_mb"], http["per_connection_kb"]
    cpu = http["ready_cpu_ms"]
    for name in ready:
        print(
            f"median {name:9s}: ready {ready[name]:6.1f} ms (noise {http['noise'][name]:.2f}, "
            f"on CPU {cpu[name]:5.1f} ms), "
            f"idle RSS {rss[name]:5.1f} MB, {per[name]:5.1f} KB per idle connection"
        )
    met = "met" if http["meets_target"] else "NOT met"
    like = http["ratio_ready_ours_starlette_over_uvicorn"]
    print(
        f"ours_starlette/uvicorn start → ready {like:.2f} "
        f"(target ≤ {TARGET}: {met}; per round {http['per_round_ratios']}); "
        f"ours (QuartTrio)/uvicorn {http['ratio_ready_ours_over_uvicorn']:.2f}, "
        f"on CPU {http['ratio_ready_cpu_ours_over_uvicorn']:.2f}x, "
        f"idle RSS {http['ratio_rss_ours_over_uvicorn']:.2f}x, "
        f"per connection {http['ratio_per_connection_ours_over_uvicorn']:.2f}x; {http['uvicorn']}"
    )
    for name, spent in http["imports_ms"].items():
        packages = ", ".join(f"{package} {ms:.0f}" for package, ms in spent.items())
        print(f"import ms of {name}: {packages}")
    worker = worker_startup(args.n)
    summary: dict[str, Any] = {
        "benchmark": "startup",
        "http": http,
        "worker": worker,
        "meets_target": http["meets_target"] and not worker["forbidden_imported"],
        "python": sys.version.split()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
