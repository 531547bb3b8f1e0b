"""Our HTTP kind against its peers: QuartTrio, Starlette and FastAPI apps, each like for like.

One API (``bench/_http_apps.py``'s peer apps: ``GET /items``, ``POST
/items`` with a JSON body) written for three frameworks, served by:

- ``ours-quart``, ``ours-starlette``, ``ours-fastapi``: our HTTP kind, the
  service started as users start one (``mikros_trio.run``);
- ``uvicorn-starlette``, ``uvicorn-fastapi``: uvicorn, h11 parser, one
  process, the same apps;
- ``bare-quart``: hypercorn-trio + the same QuartTrio app, the stand-in for
  today's figure (our kind served QuartTrio at 0.9-1.0 of it before the
  lean path).

Two settings, each like for like, each with its own server processes:

- ``off``: features off on both sides (our logger, always on, writes to a
  file and no access line; uvicorn's access log off);
- ``on``: every feature on: our access log to a file, metrics and tracing
  with the no-op exporter, against uvicorn's access log to a file,
  starlette-exporter's Prometheus middleware and
  opentelemetry-instrumentation-asgi with a tracer provider that exports
  nothing (hypercorn's access log to a file for ``bare-quart``).

Load: ``wrk -t2 -cN -dS --latency``, GET and POST, N = 32 and 256. Method
as ``_compare``: each server runs as replicas, every (server, replica,
method, connections) cell is loaded once per round in an order shuffled
per round (seeded), rates pooled over replicas and rounds into medians.
Reported per setting and cell: the ratios ours-starlette /
uvicorn-starlette and ours-fastapi / uvicorn-fastapi (target ≥ 0.9),
ours-quart / bare-quart (target ≥ 1.5), p99 at 256 connections against
uvicorn's (target at most 3 times), server CPU per request, and ``noise``: per
server, its slowest replica's median over its fastest's (the run's
resolution; 1 replica in quick mode says nothing of noise).

Prints human lines, then one JSON object as the last line.
Run: ``python bench/http_peers.py [-n ROUNDS] [--seconds S] [--quick]``
(``MIKROS_BENCH_QUICK=1`` = ``--quick``: one replica, one round, 1 s loads).
Needs wrk, uvicorn, starlette, fastapi, starlette-exporter and
opentelemetry-instrumentation-asgi (``nox -s bench`` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from _compare import replicated

# Run as a script, bench/ is on sys.path: the shared module imports directly.
from _http_apps import (
    PEER_POST_BODY,
    LoadResult,
    Server,
    cpu_seconds,
    free_port,
    peer_bare,
    peer_config,
    peer_ours,
    peer_uvicorn,
    wrk_load,
    wrk_path,
)

#: (ours, peer, target ratio) for each framework.
PAIRS = {
    "starlette": ("ours-starlette", "uvicorn-starlette", 0.9),
    "fastapi": ("ours-fastapi", "uvicorn-fastapi", 0.9),
    "quart": ("ours-quart", "bare-quart", 1.5),
}
#: Our p99 at the most connections may be at most this many times uvicorn's.
P99_TARGET = 3.0
METHODS = ("GET", "POST")
CONNECTIONS = (32, 256)


def servers_for(setting: str) -> Callable[[Path], dict[str, Server]]:
    """What one replica of a setting runs: every server, its logs under the replica's folder."""
    features = setting == "on"

    def start(folder: Path) -> dict[str, Server]:
        config = peer_config(folder, features)
        started = {
            f"ours-{name}": Server(peer_ours(name, free_port(), config))
            for name in ("quart", "starlette", "fastapi")
        }
        for name in ("starlette", "fastapi"):
            log = folder / f"uvicorn-{name}.log" if features else None
            started[f"uvicorn-{name}"] = Server(peer_uvicorn(name, free_port(), log))
        started["bare-quart"] = Server(
            peer_bare(free_port(), folder / "bare.log" if features else None)
        )
        return started

    return start


def measure(
    servers: Mapping[str, list[Server]], *, rounds: int, seconds: float, post: Path
) -> dict[tuple[str, str, int], list[tuple[int, LoadResult, float | None]]]:
    """Every (server, method, connections) cell: its loads as (replica, result, CPU µs/request)."""
    cells = [
        (name, index, method, connections)
        for name, group in servers.items()
        for index in range(len(group))
        for method in METHODS
        for connections in CONNECTIONS
    ]
    runs: dict[tuple[str, str, int], list[tuple[int, LoadResult, float | None]]] = {}
    for group in servers.values():
        for server in group:
            server.wait_ready()
            wrk_load(server.port, connections=32, seconds=1.0)  # warm-up, not counted
    for number in range(1, rounds + 1):
        order = list(cells)
        random.Random(number).shuffle(order)
        for name, index, method, connections in order:
            server = servers[name][index]
            script = post if method == "POST" else None
            before = cpu_seconds(server.proc.pid)
            result = wrk_load(server.port, connections=connections, seconds=seconds, script=script)
            after = cpu_seconds(server.proc.pid)
            cpu = None
            if before is not None and after is not None and result.count:
                cpu = (after - before) / result.count * 1e6
            runs.setdefault((name, method, connections), []).append((index, result, cpu))
            print(
                f"round {number}: {name:17s}#{index} {method:4s} c{connections:<3d} "
                f"{result.rate:8.0f} req/s  p99 {result.p99_ms or 0:7.1f} ms  "
                f"{cpu or 0:4.0f} µs/req  {result.errors} errors"
            )
    return runs


def summarise(
    runs: Mapping[tuple[str, str, int], list[tuple[int, LoadResult, float | None]]],
) -> dict[str, Any]:
    """Medians, ratios, p99s, CPU and noise of one setting, by cell ``METHOD cN``."""
    cells: dict[str, Any] = {}
    worst_noise = 1.0
    for method in METHODS:
        for connections in CONNECTIONS:
            key = f"{method} c{connections}"
            medians: dict[str, float] = {}
            p99: dict[str, float | None] = {}
            cpu: dict[str, float | None] = {}
            noise: dict[str, float] = {}
            errors: dict[str, int] = {}
            for (name, m, c), loads in runs.items():
                if (m, c) != (method, connections):
                    continue
                medians[name] = statistics.median(result.rate for _, result, _ in loads)
                latencies = [r.p99_ms for _, r, _ in loads if r.p99_ms is not None]
                p99[name] = round(statistics.median(latencies), 1) if latencies else None
                cpus = [value for _, _, value in loads if value is not None]
                cpu[name] = round(statistics.median(cpus)) if cpus else None
                errors[name] = sum(result.errors for _, result, _ in loads)
                replicas = sorted({index for index, _, _ in loads})
                if len(replicas) > 1:
                    per = [
                        statistics.median(r.rate for i, r, _ in loads if i == index)
                        for index in replicas
                    ]
                    noise[name] = round(min(per) / max(per), 3)
                    worst_noise = min(worst_noise, noise[name])
            ratios = {
                framework: round(medians[ours] / medians[peer], 3)
                for framework, (ours, peer, _) in PAIRS.items()
            }
            cell: dict[str, Any] = {
                "medians": {name: round(value) for name, value in sorted(medians.items())},
                "ratios": ratios,
                "p99_ms": dict(sorted(p99.items())),
                "cpu_us_per_request": dict(sorted(cpu.items())),
                "noise": noise,
                "errors": errors,
            }
            if connections == max(CONNECTIONS):
                cell["p99_vs_uvicorn"] = {
                    framework: _p99_ratio(p99[ours], p99[peer])
                    for framework, (ours, peer, _) in PAIRS.items()
                    if peer.startswith("uvicorn")
                }
            cells[key] = cell
    return {"cells": cells, "worst_noise": round(worst_noise, 3)}


def _p99_ratio(ours: float | None, peer: float | None) -> float | None:
    return round(ours / peer, 2) if ours is not None and peer else None


def verdicts(settings: Mapping[str, Any]) -> dict[str, bool]:
    """Each target, met or not, over every cell of both settings (errors fail a cell)."""
    met: dict[str, bool] = {}
    for framework, (_, _, target) in PAIRS.items():
        met[f"{framework}_ratio_at_least_{target}"] = all(
            cell["ratios"][framework] >= target and not any(cell["errors"].values())
            for setting in settings.values()
            for cell in setting["cells"].values()
        )
    met[f"p99_at_most_{P99_TARGET:g}x_uvicorn"] = all(
        value is not None and value <= P99_TARGET
        for setting in settings.values()
        for cell in setting["cells"].values()
        for value in cell.get("p99_vs_uvicorn", {}).values()
    )
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=3, help="shuffled rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="load per measurement (3)")
    parser.add_argument("--quick", action="store_true", help="1 replica, 1 round, 1 s loads")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("MIKROS_BENCH_QUICK") == "1"
    rounds, seconds = (1, 1.0) if quick else (args.rounds, args.seconds)
    if wrk_path() is None:
        raise SystemExit("http_peers needs wrk (nox -s bench installs it)")

    scratch = tempfile.TemporaryDirectory(prefix="bench-peers-")
    root = Path(scratch.name)
    post = root / "post.lua"
    post.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(PEER_POST_BODY)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    settings: dict[str, Any] = {}
    exit_codes: dict[str, dict[str, int]] = {}
    for setting in ("off", "on"):
        start = servers_for(setting)
        folder = root / setting
        folder.mkdir()
        if quick:
            (folder / "0").mkdir()
            servers = {name: [server] for name, server in start(folder / "0").items()}
        else:
            servers = replicated(start, folder)
        try:
            runs = measure(servers, rounds=rounds, seconds=seconds, post=post)
        finally:
            exit_codes[setting] = {
                f"{name}#{index}": server.close()
                for name, group in servers.items()
                for index, server in enumerate(group)
            }
        settings[setting] = summarise(runs)
        for key, cell in settings[setting]["cells"].items():
            ratios = ", ".join(f"{name} {value:.2f}" for name, value in cell["ratios"].items())
            p99 = cell.get("p99_vs_uvicorn")
            print(
                f"features {setting}, {key}: {ratios}" + (f"; p99 vs uvicorn {p99}" if p99 else "")
            )
    import uvicorn

    summary = {
        "benchmark": "http_peers",
        "quick": quick,
        "rounds": rounds,
        "seconds": seconds,
        "replicas": 1 if quick else 2,
        "load_generator": "wrk -t2 --latency, GET and POST /items",
        "peer": f"uvicorn {uvicorn.__version__} (h11, asyncio, 1 process)",
        "settings": settings,
        "targets": verdicts(settings),
        # uvicorn re-raises the SIGTERM it handled: -15 is its clean exit.
        "exit_codes": exit_codes,
        "python": sys.version.split()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
