"""Throughput the framework keeps of its stack: the HTTP example against a bare QuartTrio app.

Both serve ``GET /items`` (an empty store) with the same handler, each in its
own process:

- ``framework``: the example as users start it (``mikros-trio run``), with
  everything on: probes, Mikros error handlers, request-size limit, owned
  listener and drain, and every feature — JSON access and handler logs to
  a file, Prometheus metrics, OpenTelemetry spans (made, sampled and
  ended; exporter "none", so none is exported), and the
  collector tuned for serving (``[lifecycle]`` defaults: ``gc_freeze``,
  ``gc_threshold``);
- ``bare``: the example's own QuartTrio app on ``hypercorn.trio.serve``.

Each runs as two processes (replicas), and every replica is loaded once per
round, in a shuffled order, for several rounds in the same run (see
``_compare``), each load a fixed-length run of 32 keep-alive connections:
``wrk -t2 -c32 -d3s`` when wrk is installed, else a bounded single-process
Python client (the JSON says which). Only the server under load is busy;
the others sit idle. The ratio is median(framework) / median(bare), over
all replicas; the target is ≥ 0.90 with every feature on (it was ≥ 0.95
before features existed). ``noise`` in the JSON is the same comparison
between two replicas of one server: the resolution of this run.

For reference only (no target), uvicorn + Starlette with the same handler
body runs in the same rounds when both are installed (``nox -s bench``
installs them).

Prints human lines, then, as the last line, one JSON object for tools.
Run: ``python bench/http_overhead.py [-n ROUNDS] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _compare import compare, replicated, verdict

# Run as a script, bench/ is on sys.path: the shared module imports directly.
from _http_apps import (
    EXAMPLE,
    LoadResult,
    Server,
    all_features_config,
    bare,
    framework,
    free_port,
    python_load,
    uvicorn_description,
    uvicorn_starlette,
    wrk_load,
    wrk_path,
)

TARGET_RATIO = 0.90
CONNECTIONS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=6, help="shuffled rounds (default 6)")
    parser.add_argument("--seconds", type=float, default=3.0, help="load per measurement (3)")
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
    scratch = tempfile.TemporaryDirectory(prefix="bench-http-")

    def start(folder: Path) -> dict[str, Server]:
        config = all_features_config(EXAMPLE, folder)  # each replica logs to its own file
        return {
            "framework": Server(framework(free_port(), config=config)),
            "bare": Server(bare(free_port())),
        }

    servers = replicated(start, Path(scratch.name))
    if reference is not None:
        servers["uvicorn"] = [Server(uvicorn_starlette(free_port()))]
    else:
        print("uvicorn or starlette is not installed: no reference run")
    figures = compare(
        servers,
        rounds=args.rounds,
        load=load,
        seconds=args.seconds,
        unit="request",
        target=TARGET_RATIO,
    )
    medians = figures["medians"]
    summary: dict[str, Any] = {
        "benchmark": "http_overhead",
        "route": "GET /items (empty store)",
        "load_generator": generator,
        "rounds": args.rounds,
        **figures,
        # uvicorn re-raises the SIGTERM it handled once it has shut down:
        # -15 in exit_codes is its clean exit.
        "reference": None,
        "python": sys.version.split()[0],
    }
    print(
        f"framework / bare hypercorn+QuartTrio: {figures['ratio']:.3f} "
        f"(median {medians['framework']:.0f} / {medians['bare']:.0f} req/s); " + verdict(figures)
    )
    if "uvicorn" in medians:
        versus = medians["framework"] / medians["uvicorn"]
        summary["reference"] = {
            "server": reference,
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
