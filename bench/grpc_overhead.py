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

The same handler on a ``grpc.aio.server`` (C-core) runs in the same
rounds as the reference the issue's target names: the framework with
every feature on ≥ 0.85 of it. purerpc and h2 are pure Python; bare
purerpc itself stays well under that (``bare_vs_grpcio``), so this target
measures the stack as much as the framework.

``--features off`` measures the framework with what can be switched off
switched off (metrics, tracing, the access line; the logger, errors and
env features are always on): the cost of the framework alone.

Prints human lines, then, as the last line, one JSON object for tools.
Run: ``python bench/grpc_overhead.py [-n ROUNDS] [--seconds 3] [--features off]``.
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
#: The framework with every feature on, against the grpc.aio server.
GRPCIO_TARGET = 0.85
CONCURRENCY = 32


def features_off(config: Path) -> Path:
    """``config`` (every feature on) with metrics, tracing and the access line off."""
    text = config.read_text()
    for table in ("[features.metrics]", "[features.tracing]"):
        on = f"{table}\nenabled = true"
        if on not in text:
            raise SystemExit(f"{config} no longer has {on!r}: update the bench")
        text = text.replace(on, f"{table}\nenabled = false")
    text = text.replace("[features.logger]\n", "[features.logger]\naccess_log = false\n")
    config.write_text(text)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=6, help="shuffled rounds (default 6)")
    parser.add_argument("--seconds", type=float, default=3.0, help="load per measurement (3)")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the grpc.aio reference server"
    )
    parser.add_argument(
        "--features",
        choices=("on", "off"),
        default="on",
        help="every feature on (default), or metrics, tracing and the access line off",
    )
    args = parser.parse_args()
    generator = (
        f"grpc.aio client process, {CONCURRENCY} concurrent unary calls on one channel, "
        f"{args.seconds:g} s"
    )

    scratch = tempfile.TemporaryDirectory(prefix="bench-grpc-")

    def start(folder: Path) -> dict[str, GrpcServer]:
        config = all_features_config(EXAMPLE, folder)  # each replica logs to its own file
        if args.features == "off":
            config = features_off(config)
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
        "features": args.features,
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
            "target_ratio": GRPCIO_TARGET,
            "meets_target": args.features == "on" and versus >= GRPCIO_TARGET,
        }
        met = "met" if summary["reference"]["meets_target"] else "NOT met"
        print(
            f"framework / grpc.aio server: {versus:.3f}, bare / grpc.aio: "
            f"{medians['bare'] / medians['grpcio']:.3f} "
            f"(median {medians['grpcio']:.0f} calls/s); target ≥ {GRPCIO_TARGET} "
            f"with every feature on: {met}"
        )
    print(json.dumps(summary))


def _grpcio_version() -> str:
    import grpc

    return str(grpc.__version__)


if __name__ == "__main__":
    main()
