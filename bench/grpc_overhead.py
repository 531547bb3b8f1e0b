"""Throughput the framework keeps of its stack: the greeter example against bare purerpc.

Both serve the greeter's unary ``SayHello`` with the example's own servicer,
each in its own process:

- ``framework``: the example as users start it (``mikros-trio run``), with
  everything on: health, reflection, Mikros error mapping, owned listener,
  per-connection tasks and drain, and every feature — JSON access and
  handler logs to a file, Prometheus metrics, OpenTelemetry spans (made,
  sampled and ended; exporter "none", so none is exported), and the
  collector tuned for serving (``[lifecycle]`` defaults: ``gc_freeze``,
  ``gc_threshold``);
- ``bare``: the same servicer on purerpc's own ``Server.serve_async`` under
  Trio.

Each runs as two processes (replicas), and every replica is loaded once per
round, in a shuffled order, for several rounds in the same run (see
``_compare``), each load a fixed-length run from a grpc.aio client in its
own process keeping 32 unary calls in flight on one channel. Only the
server under load is busy; the others sit idle. The ratio is
median(framework) / median(bare), over all replicas; the target is ≥ 0.90
(with every feature on; it was ≥ 0.95 before features existed). ``noise``
in the JSON is the same comparison between two replicas of one server: the
resolution of this run.

For reference only (no target), the same handler on a ``grpc.aio.server``
(C-core) runs in the same rounds.

Prints human lines, then, as the last line, one JSON object for tools.
Run: ``python bench/grpc_overhead.py [-n ROUNDS] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _compare import compare, replicated, verdict

# Run as a script, bench/ is on sys.path: the shared modules import directly.
from _grpc_apps import (
    EXAMPLE,
    GrpcServer,
    LoadResult,
    bare,
    framework,
    free_port,
    grpc_load,
    grpcio_aio,
)
from _http_apps import all_features_config

TARGET_RATIO = 0.90
CONCURRENCY = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=6, help="shuffled rounds (default 6)")
    parser.add_argument("--seconds", type=float, default=3.0, help="load per measurement (3)")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the grpc.aio reference server"
    )
    args = parser.parse_args()
    generator = (
        f"grpc.aio client process, {CONCURRENCY} concurrent unary calls on one channel, "
        f"{args.seconds:g} s"
    )

    scratch = tempfile.TemporaryDirectory(prefix="bench-grpc-")

    def start(folder: Path) -> dict[str, GrpcServer]:
        config = all_features_config(EXAMPLE, folder)  # each replica logs to its own file
        return {
            "framework": GrpcServer(framework(free_port(), config=config)),
            "bare": GrpcServer(bare(free_port())),
        }

    servers = replicated(start, Path(scratch.name))
    if not args.no_reference:
        servers["grpcio"] = [GrpcServer(grpcio_aio(free_port()))]

    def load(port: int, seconds: float) -> LoadResult:
        return grpc_load(port, concurrency=CONCURRENCY, seconds=seconds)

    figures = compare(
        servers,
        rounds=args.rounds,
        load=load,
        seconds=args.seconds,
        unit="call",
        target=TARGET_RATIO,
    )
    medians = figures["medians"]
    summary: dict[str, Any] = {
        "benchmark": "grpc_overhead",
        "rpc": "greeter.Greeter/SayHello (unary)",
        "load_generator": generator,
        "rounds": args.rounds,
        # purerpc and grpc.aio servers install no SIGTERM handler: -15 in
        # exit_codes is their end.
        **figures,
        "reference": None,
        "python": sys.version.split()[0],
    }
    print(
        f"framework / bare purerpc: {figures['ratio']:.3f} "
        f"(median {medians['framework']:.0f} / {medians['bare']:.0f} calls/s); " + verdict(figures)
    )
    if "grpcio" in medians:
        versus = medians["framework"] / medians["grpcio"]
        summary["reference"] = {
            "server": "grpc.aio.server (grpcio " + _grpcio_version() + ")",
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
