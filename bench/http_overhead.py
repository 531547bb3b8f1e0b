"""Throughput the framework keeps of its stack: the HTTP example against a bare QuartTrio app.

Both serve ``GET /items`` (an empty store) with the same handler, each in its
own process:

- ``framework``: ``python examples/http/main.py`` as users start it, with
  everything on (probes, Mikros error handlers, request-size limit, owned
  listener and drain);
- ``bare``: the example's own QuartTrio app on ``hypercorn.trio.serve``.

The two alternate for several rounds in the same run (the order flips each
round, so drift on the machine hits both alike), each round a fixed-length
load of 32 keep-alive connections: ``wrk -t2 -c32 -d5s`` when wrk is
installed, else a bounded single-process Python client (the JSON says
which). Only the server under load is busy; the others sit idle. The ratio
is median(framework) / median(bare); the target is ≥ 0.95.

For reference only (no target), uvicorn + Starlette with the same handler
body runs in the same rounds when both are installed (``nox -s bench``
installs them).

Prints human lines, then, as the last line, one JSON object for tools.
Run: ``python bench/http_overhead.py [-n ROUNDS] [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

# Run as a script, bench/ is on sys.path: the shared module imports directly.
from _http_apps import (
    LoadResult,
    Server,
    ServerSpec,
    bare,
    cpu_seconds,
    framework,
    free_port,
    python_load,
    uvicorn_description,
    uvicorn_starlette,
    wrk_load,
    wrk_path,
)

TARGET_RATIO = 0.95
CONNECTIONS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n", "--rounds", type=int, default=5, help="alternating rounds (default 5)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="load per measurement (5)")
    args = parser.parse_args()

    if wrk_path() is not None:
        generator = f"wrk -t2 -c{CONNECTIONS} -d{args.seconds:g}s"

        def load(port: int, seconds: float) -> LoadResult:
            return wrk_load(port, connections=CONNECTIONS, seconds=seconds)
    else:
        generator = (
            f"python selector client, {CONNECTIONS} keep-alive connections, {args.seconds:g} s"
        )
        print("wrk is not installed: falling back to the bounded Python load client")

        def load(port: int, seconds: float) -> LoadResult:
            return python_load(port, connections=CONNECTIONS, seconds=seconds)

    reference = uvicorn_description()
    specs: list[ServerSpec] = [framework(free_port()), bare(free_port())]
    if reference is not None:
        specs.append(uvicorn_starlette(free_port()))
    else:
        print("uvicorn or starlette is not installed: no reference run")
    servers = {spec.name: Server(spec) for spec in specs}
    results: dict[str, list[LoadResult]] = {name: [] for name in servers}
    cpu_per_request: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.wait_ready()
            load(server.port, 1.0)  # warm-up, not counted
        for number in range(1, args.rounds + 1):
            order = ["framework", "bare"] if number % 2 else ["bare", "framework"]
            order += [name for name in servers if name not in order]
            for name in order:
                pid = servers[name].proc.pid
                before = cpu_seconds(pid)
                result = load(servers[name].port, args.seconds)
                after = cpu_seconds(pid)
                results[name].append(result)
                cpu = ""
                if before is not None and after is not None and result.requests:
                    cpu_per_request[name].append((after - before) / result.requests * 1e6)
                    cpu = f", server CPU {cpu_per_request[name][-1]:4.0f} µs/request"
                print(
                    f"round {number}: {name:9s} {result.requests_per_s:9.1f} req/s "
                    f"({result.requests} requests, {result.errors} errors{cpu})"
                )
    finally:
        codes = {name: server.close() for name, server in servers.items()}

    medians = {
        name: statistics.median(r.requests_per_s for r in runs) for name, runs in results.items()
    }
    ratio = medians["framework"] / medians["bare"]
    per_round = [
        f.requests_per_s / b.requests_per_s
        for f, b in zip(results["framework"], results["bare"], strict=True)
    ]
    errors = {name: sum(r.errors for r in runs) for name, runs in results.items()}
    summary: dict[str, Any] = {
        "benchmark": "http_overhead",
        "route": "GET /items (empty store)",
        "load_generator": generator,
        "rounds": args.rounds,
        "framework_rps": [round(r.requests_per_s, 1) for r in results["framework"]],
        "bare_rps": [round(r.requests_per_s, 1) for r in results["bare"]],
        "framework_rps_median": round(medians["framework"], 1),
        "bare_rps_median": round(medians["bare"], 1),
        "ratio": round(ratio, 3),
        "per_round_ratios": [round(r, 3) for r in per_round],
        # Server CPU per request (median over rounds): steadier than req/s
        # when other work shares the machine.
        "cpu_us_per_request": {
            name: round(statistics.median(values)) if values else None
            for name, values in cpu_per_request.items()
        },
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO and not any(errors.values()),
        "errors": errors,
        # uvicorn re-raises the SIGTERM it handled once it has shut down:
        # -15 is its clean exit.
        "exit_codes": codes,
        "reference": None,
        "python": sys.version.split()[0],
    }
    print(
        f"framework / bare hypercorn+QuartTrio: {ratio:.3f} "
        f"(median {medians['framework']:.0f} / {medians['bare']:.0f} req/s); "
        f"target ≥ {TARGET_RATIO}: " + ("met" if summary["meets_target"] else "NOT met")
    )
    if "uvicorn" in medians:
        versus = medians["framework"] / medians["uvicorn"]
        summary["reference"] = {
            "server": reference,
            "uvicorn_rps": [round(r.requests_per_s, 1) for r in results["uvicorn"]],
            "uvicorn_rps_median": round(medians["uvicorn"], 1),
            "framework_vs_uvicorn": round(versus, 3),
            "bare_vs_uvicorn": round(medians["bare"] / medians["uvicorn"], 3),
        }
        print(
            f"reference, framework / {reference}: {versus:.3f} "
            f"(median {medians['uvicorn']:.0f} req/s; no target)"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
