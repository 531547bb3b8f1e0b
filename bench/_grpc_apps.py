"""What the gRPC benchmarks share: the servers they compare, and the load generator.

Servers, each run as its own process and all answering the greeter's
``SayHello`` with the example's own servicer (``examples/grpc/main.py``'s
``Greeter``, the same handler body everywhere):

- ``framework``: ``python examples/grpc/main.py``, the way users start it
  (health, reflection, Mikros errors, owned listener and drain; port from
  ``MIKROS_GRPC_PORT``).
- ``bare``: the same servicer on purerpc's own ``Server.serve_async`` under
  Trio: ``python bench/_grpc_apps.py bare PORT``. purerpc has no stop API;
  SIGTERM's default action ends it.
- ``grpcio``: the same handler on a ``grpc.aio.server`` (C-core, asyncio),
  for reference only: ``python bench/_grpc_apps.py grpcio PORT``.

Load: :func:`grpc_load` runs ``python bench/_grpc_apps.py load PORT SECONDS
CONCURRENCY`` — a grpc.aio client in its own process keeping CONCURRENCY
unary calls in flight on one channel (one HTTP/2 connection) for a fixed
time — and reads the JSON line it prints.

Servers are polled until a real ``SayHello`` answers (grpcio, the only
dependency beyond the gRPC extra: ``nox -s bench`` installs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Run as a script, bench/ is on sys.path: the shared HTTP module imports directly.
from _http_apps import (
    PATIENCE_S,
    LoadResult,
    Server,
    ServerSpec,
    cpu_seconds,
    example_command,
    free_port,
    nearest_rank,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "grpc"

__all__ = [
    "EXAMPLE",
    "GrpcServer",
    "LoadResult",
    "ServerSpec",
    "bare",
    "cpu_seconds",
    "framework",
    "free_port",
    "grpc_load",
    "grpcio_aio",
    "idle_channels",
    "nearest_rank",
]

#: grpcio channel options: never route 127.0.0.1 through a proxy from the environment.
GRPC_OPTIONS = (("grpc.enable_http_proxy", 0),)


def _greeter_modules() -> tuple[Any, Any]:
    """The example's generated messages and grpcio stubs (imported from its folder)."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    import greeter_pb2
    import greeter_pb2_grpc

    return greeter_pb2, greeter_pb2_grpc


# -- servers -------------------------------------------------------------------


def framework(port: int, *, verbose: bool = False, config: Path | None = None) -> ServerSpec:
    env = {
        "MIKROS_GRPC_PORT": str(port),
        "MIKROS_METRICS_PORT": "0",  # the example's metrics listener: any free port
        "MIKROS_TRIO_VERBOSE": "1" if verbose else "0",
    }
    return ServerSpec("framework", port, example_command(EXAMPLE, config), env, "")


def bare(port: int) -> ServerSpec:
    return ServerSpec("bare", port, (sys.executable, __file__, "bare", str(port)), {}, "")


def grpcio_aio(port: int) -> ServerSpec:
    return ServerSpec("grpcio", port, (sys.executable, __file__, "grpcio", str(port)), {}, "")


class GrpcServer(Server):
    """A server process (see ``_http_apps.Server``), ready once ``SayHello`` answers."""

    def wait_ready(self) -> None:
        """Return once a ``SayHello`` call answers; raise if none does in time."""
        import grpc

        pb2, pb2_grpc = _greeter_modules()
        deadline = time.monotonic() + PATIENCE_S
        with grpc.insecure_channel(f"127.0.0.1:{self.port}", options=GRPC_OPTIONS) as channel:
            stub = pb2_grpc.GreeterStub(channel)
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    reply = stub.SayHello(pb2.HelloRequest(name="ready"), timeout=1.0)
                except grpc.RpcError:
                    time.sleep(0.01)
                    continue
                if reply.message != "Hello, ready!":
                    raise RuntimeError(f"{self.spec.name} answered {reply.message!r}")
                return
        code = self.close()
        tail = "".join(line for _, line in self.stderr[-20:])
        raise RuntimeError(f"{self.spec.name} never got ready (exit code {code}):\n{tail}")


def idle_channels(port: int, count: int) -> list[Any]:
    """``count`` grpcio channels, one connection each, that made one ``SayHello`` and sit idle.

    The caller closes them (``channel.close()``).
    """
    import grpc

    pb2, pb2_grpc = _greeter_modules()
    opened: list[Any] = []
    try:
        for _ in range(count):
            # A connection of its own each: grpcio shares one among channels by default.
            options = (*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1))
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
            opened.append(channel)
            pb2_grpc.GreeterStub(channel).SayHello(pb2.HelloRequest(name="idle"), timeout=5.0)
    except BaseException:
        for channel in opened:
            channel.close()
        raise
    return opened


# -- load ------------------------------------------------------------------------


def grpc_load(port: int, *, concurrency: int, seconds: float) -> LoadResult:
    """Run the grpc.aio load generator in its own process against ``port``."""
    done = subprocess.run(
        [sys.executable, __file__, "load", str(port), str(seconds), str(concurrency)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + PATIENCE_S,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"the load generator failed ({done.returncode}):\n{done.stderr}")
    result: Mapping[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return LoadResult(result["calls"] / result["seconds"], result["calls"], result["errors"])


def _load(port: int, seconds: float, concurrency: int) -> None:
    """``concurrency`` unary SayHello calls in flight on one grpc.aio channel for ``seconds``."""
    import asyncio

    import grpc.aio

    pb2, pb2_grpc = _greeter_modules()
    request = pb2.HelloRequest(name="bench")
    expected = "Hello, bench!"

    async def main() -> dict[str, Any]:
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
            stub = pb2_grpc.GreeterStub(channel)
            await stub.SayHello(request, timeout=PATIENCE_S)  # connected: not counted
            calls = errors = 0
            start = time.perf_counter()
            deadline = start + seconds

            async def caller() -> None:
                nonlocal calls, errors
                while time.perf_counter() < deadline:
                    try:
                        reply = await stub.SayHello(request, timeout=PATIENCE_S)
                    except grpc.aio.AioRpcError:
                        errors += 1
                        continue
                    if reply.message == expected:
                        calls += 1
                    else:
                        errors += 1

            await asyncio.gather(*(caller() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
        return {"calls": calls, "errors": errors, "seconds": elapsed}

    print(json.dumps(asyncio.run(main())))


# -- the comparison servers, run as processes ---------------------------------------


def _serve_bare(port: int) -> None:
    """The example's servicer on purerpc's own ``Server.serve_async``, under Trio."""
    import purerpc
    import trio

    _greeter_modules()
    from main import Greeter, Settings  # the example's servicer and its settings

    server = purerpc.Server(port)
    server.add_service(Greeter(Settings()).service)
    trio.run(server.serve_async)


def _serve_grpcio(port: int) -> None:
    """The same handler on a ``grpc.aio.server``; SIGTERM's default action ends it."""
    import asyncio

    import grpc.aio

    _, pb2_grpc = _greeter_modules()
    from main import Greeter, Settings

    greeter = Greeter(Settings())

    class Servicer(pb2_grpc.GreeterServicer):  # type: ignore[misc]  # generated, untyped
        async def SayHello(self, request: Any, context: Any) -> Any:
            # The example's own unary handler: it awaits nothing Trio-specific.
            return await greeter.SayHello(request)

    async def main() -> None:
        server = grpc.aio.server()
        pb2_grpc.add_GreeterServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "load":
        _load(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
    else:
        {"bare": _serve_bare, "grpcio": _serve_grpcio}[command](int(sys.argv[2]))
