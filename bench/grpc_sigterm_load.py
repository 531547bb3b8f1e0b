"""RPCs lost when the gRPC example gets SIGTERM under load (the issue-10 scenario).

For each run: start ``python examples/grpc/main.py`` as users do, run a
grpc.aio client process with 32 concurrent callers on one channel (half
``SayHello``, half ``SayHelloStream`` of 5 greetings 40 ms apart), each
call tagged with its own ``x-request-id``; after 1 s the client sends the
server SIGTERM and keeps calling for 1 s more. A call is lost when it
started before SIGTERM, or the server's access log shows it dispatched,
and it did not end OK with all its greetings. Calls started after SIGTERM
may fail, as UNAVAILABLE only (the server is gone). N runs (default 10).

Prints one line per run, then one JSON object. Run:
``python bench/grpc_sigterm_load.py [-n 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run as a script, bench/ is on sys.path: the shared modules import directly.
from _grpc_apps import GRPC_OPTIONS, _greeter_modules, framework, free_port

CALLERS = 32


def _client(port: int, pid: int) -> None:
    """The load and the SIGTERM, in a process of their own; prints the calls as JSON."""
    import asyncio
    import signal
    import time

    import grpc.aio

    pb2, pb2_grpc = _greeter_modules()

    async def main() -> dict[str, Any]:
        calls: list[dict[str, Any]] = []
        sigterm: float | None = None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
            stub = pb2_grpc.GreeterStub(ch)

            async def caller(number: int) -> None:
                for index in range(1_000_000):
                    started = time.perf_counter()
                    if sigterm is not None and started > sigterm + 1.0:
                        return
                    rid = f"load-{number}-{index}"
                    call: dict[str, Any] = {"id": rid, "start": started, "items": 0}
                    metadata = (("x-request-id", rid),)
                    try:
                        if number % 2:
                            await stub.SayHello(
                                pb2.HelloRequest(name=rid), timeout=8, metadata=metadata
                            )
                            call["items"] = 1
                        else:
                            request = pb2.HelloStreamRequest(name=rid, count=5, interval_ms=40)
                            async for _ in stub.SayHelloStream(
                                request, timeout=8, metadata=metadata
                            ):
                                call["items"] += 1
                        call["code"] = "OK"
                    except grpc.aio.AioRpcError as error:
                        call["code"] = error.code().name
                        await asyncio.sleep(0.01)
                    calls.append(call)

            async def terminate() -> None:
                nonlocal sigterm
                await asyncio.sleep(1.0)
                sigterm = time.perf_counter()
                os.kill(pid, signal.SIGTERM)

            await asyncio.gather(terminate(), *(caller(n) for n in range(CALLERS)))
        return {"sigterm": sigterm, "calls": calls}

    print(json.dumps(asyncio.run(main())))


def measure_once(log: Path) -> dict[str, Any]:
    port = free_port()
    spec = framework(port)
    # The example logs to stdout: a file, so a full pipe never slows it down
    # (its console span exporter writes to stderr: dropped).
    with log.open("w") as out:
        server = subprocess.Popen(
            spec.args,
            cwd=Path(__file__).parents[1],
            env={**os.environ, **spec.env},
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
    try:
        _wait_ready(port, server)
        done = subprocess.run(
            [sys.executable, __file__, "client", str(port), str(server.pid)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        code = server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    dispatched = set()
    for line in log.read_text().splitlines():
        if '"mikros_trio.access"' in line:
            dispatched.add(json.loads(line).get("request_id"))
    before = [c for c in result["calls"] if c["start"] < result["sigterm"]]
    lost = [
        c
        for c in result["calls"]
        if (c["start"] < result["sigterm"] or c["id"] in dispatched)
        and (c["code"] != "OK" or c["items"] not in (1, 5))  # SayHello: 1, the stream: 5
    ]
    other = {c["code"] for c in result["calls"] if c not in lost and c["code"] != "OK"}
    return {"exit_code": code, "before": len(before), "lost": len(lost), "other": sorted(other)}


def _wait_ready(port: int, server: subprocess.Popen[bytes]) -> None:
    """Return once ``SayHello`` answers; raise if the server exits or never does."""
    import time

    import grpc

    pb2, pb2_grpc = _greeter_modules()
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        stub = pb2_grpc.GreeterStub(channel)
        while server.poll() is None and time.monotonic() < deadline:
            try:
                stub.SayHello(pb2.HelloRequest(name="ready"), timeout=1.0)
                return
            except grpc.RpcError:
                time.sleep(0.02)
    raise RuntimeError(f"the example never answered (exit code {server.poll()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="runs (default 10)")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-grpc-sigterm-load-") as scratch:
        for number in range(1, args.n + 1):
            run = measure_once(Path(scratch) / f"run{number}.log")
            runs.append(run)
            print(
                f"run {number:2d}: {run['before']} calls started before SIGTERM, "
                f"{run['lost']} lost; exit code {run['exit_code']}; "
                f"other failures: {run['other'] or 'none'}"
            )
    summary = {
        "benchmark": "grpc_sigterm_load",
        "runs": len(runs),
        "callers": CALLERS,
        "calls_before_sigterm": sum(r["before"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "nonzero_exit_codes": [r["exit_code"] for r in runs if r["exit_code"] != 0],
        "python": sys.version.split()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        _client(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
