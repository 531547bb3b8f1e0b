"""Throughput the framework keeps of its stack: the greeter example against bare purerpc.

Both serve the greeter's unary ``SayHello`` with the example's own servicer,
each in its own process:

- ``framework``: ``python examples/grpc/main.py`` as users start it, with
  everything on (health, reflection, Mikros error mapping, owned listener,
  per-connection tasks and drain);
- ``bare``: the same servicer on purerpc's own ``Server.serve_async`` under
  Trio.

The two alternate for several rounds in the same run (the order flips each
round, so drift on the machine hits both alike), each round a fixed-length
load from a grpc.aio client in its own process keeping 32 unary calls in
flight on one channel. Only the server under load is busy; the others sit
idle. The ratio is median(framework) / median(bare); the target is ≥ 0.95.

For reference only (no target), the same handler on a ``grpc.aio.server``
(C-core) runs in the same rounds.

Prints human lines, then, as the last line, one JSON object for tools.
Run: ``python bench/grpc_overhead.py [-n ROUNDS] [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

# Run as a script, bench/ is on sys.path: the shared modules import directly.
from _grpc_apps import (
    GrpcServer,
    LoadResult,
    bare,
    cpu_seconds,
    framework,
    free_port,
    grpc_load,
    grpcio_aio,
)

TARGET_RATIO = 0.95
CONCURRENCY = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n", "--rounds", type=int, default=5, help="alternating rounds (default 5)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="load per measurement (5)")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the grpc.aio reference server"
    )
    args = parser.parse_args()
    generator = (
        f"grpc.aio client process, {CONCURRENCY} concurrent unary calls on one channel, "
        f"{args.seconds:g} s"
    )

    specs = [framework(free_port()), bare(free_port())]
    if not args.no_reference:
        specs.append(grpcio_aio(free_port()))
    servers = {spec.name: GrpcServer(spec) for spec in specs}
    results: dict[str, list[LoadResult]] = {name: [] for name in servers}
    cpu_per_call: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.wait_ready()
            grpc_load(server.port, concurrency=CONCURRENCY, seconds=1.0)  # warm-up, not counted
        for number in range(1, args.rounds + 1):
            order = ["framework", "bare"] if number % 2 else ["bare", "framework"]
            order += [name for name in servers if name not in order]
            for name in order:
                pid = servers[name].proc.pid
                before = cpu_seconds(pid)
                result = grpc_load(
                    servers[name].port, concurrency=CONCURRENCY, seconds=args.seconds
                )
                after = cpu_seconds(pid)
                results[name].append(result)
                cpu = ""
                if before is not None and after is not None and result.calls:
                    cpu_per_call[name].append((after - before) / result.calls * 1e6)
                    cpu = f", server CPU {cpu_per_call[name][-1]:4.0f} µs/call"
                print(
                    f"round {number}: {name:9s} {result.calls_per_s:8.1f} calls/s "
                    f"({result.calls} calls, {result.errors} errors{cpu})"
                )
    finally:
        # purerpc and grpc.aio servers install no SIGTERM handler: -15 is their end.
        codes = {name: server.close() for name, server in servers.items()}

    medians = {
        name: statistics.median(r.calls_per_s for r in runs) for name, runs in results.items()
    }
    ratio = medians["framework"] / medians["bare"]
    per_round = [
        f.calls_per_s / b.calls_per_s
        for f, b in zip(results["framework"], results["bare"], strict=True)
    ]
    errors = {name: sum(r.errors for r in runs) for name, runs in results.items()}
    summary: dict[str, Any] = {
        "benchmark": "grpc_overhead",
        "rpc": "greeter.Greeter/SayHello (unary)",
        "load_generator": generator,
        "rounds": args.rounds,
        "framework_calls_per_s": [round(r.calls_per_s, 1) for r in results["framework"]],
        "bare_calls_per_s": [round(r.calls_per_s, 1) for r in results["bare"]],
        "framework_median": round(medians["framework"], 1),
        "bare_median": round(medians["bare"], 1),
        "ratio": round(ratio, 3),
        "per_round_ratios": [round(r, 3) for r in per_round],
        # Server CPU per call (median over rounds): steadier than calls/s
        # when other work shares the machine.
        "cpu_us_per_call": {
            name: round(statistics.median(values)) if values else None
            for name, values in cpu_per_call.items()
        },
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO and not any(errors.values()),
        "errors": errors,
        "exit_codes": codes,
        "reference": None,
        "python": sys.version.split()[0],
    }
    print(
        f"framework / bare purerpc: {ratio:.3f} "
        f"(median {medians['framework']:.0f} / {medians['bare']:.0f} calls/s); "
        f"target ≥ {TARGET_RATIO}: " + ("met" if summary["meets_target"] else "NOT met")
    )
    if "grpcio" in medians:
        versus = medians["framework"] / medians["grpcio"]
        summary["reference"] = {
            "server": "grpc.aio.server (grpcio " + _grpcio_version() + ")",
            "grpcio_calls_per_s": [round(r.calls_per_s, 1) for r in results["grpcio"]],
            "grpcio_median": round(medians["grpcio"], 1),
            "framework_vs_grpcio": round(versus, 3),
            "bare_vs_grpcio": round(medians["bare"] / medians["grpcio"], 3),
        }
        print(
            f"reference, framework / grpc.aio server: {versus:.3f}, bare / grpc.aio: "
            f"{medians['bare'] / medians['grpcio']:.3f} "
            f"(median {medians['grpcio']:.0f} calls/s; no target)"
        )
    print(json.dumps(summary))


def _grpcio_version() -> str:
    import grpc

    return str(grpc.__version__)


if __name__ == "__main__":
    main()
