"""The hostile suite's gRPC service, started as users start theirs.

    python tests/hostile/grpc_target.py path/to/service.toml

It serves the test Echo service (``tests/protos``): ``delay`` sleeps before
answering (before each item when streaming), ``count`` is how many items
ServerStream sends, ``fail`` names the exception the handler raises, and
ClientStream with ``fail = "hold"`` never reads its requests.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
from dependency_injector import providers

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the protos package

import mikros_trio
from protos import testsvc_grpc, testsvc_pb2

#: ``EchoRequest.fail`` → what the handler raises.
RAISES: dict[str, type[BaseException]] = {
    "exception": RuntimeError,
    "system-exit": SystemExit,
    "keyboard-interrupt": KeyboardInterrupt,
    "generator-exit": GeneratorExit,
    "base-exception": BaseException,
    "base-group": BaseExceptionGroup,
}


def _fail(request: Any) -> None:
    if request.fail == "base-group":
        raise BaseExceptionGroup("handler", [KeyboardInterrupt("inside a group")])
    if request.fail:
        raise RAISES[request.fail](f"raised {request.fail}")


class Echo(testsvc_grpc.EchoServicer):  # type: ignore[misc]  # generated, untyped
    async def Unary(self, request: Any) -> Any:
        _fail(request)
        if request.delay:
            await trio.sleep(request.delay)
        return testsvc_pb2.EchoReply(text=request.text, size=len(request.payload))

    async def ServerStream(self, request: Any) -> AsyncIterator[Any]:
        for index in range(request.count):
            if request.delay:
                await trio.sleep(request.delay)
            yield testsvc_pb2.EchoReply(text=request.text, index=index)
        _fail(request)

    async def ClientStream(self, requests: AsyncIterator[Any]) -> Any:
        count = 0
        async for request in requests:
            if request.fail == "hold":
                await trio.sleep_forever()  # never reads the rest
            count += 1
        return testsvc_pb2.EchoReply(index=count)


class Container(mikros_trio.ServiceContainer):
    echo = providers.Singleton(Echo)


async def main() -> None:
    await mikros_trio.run(Container, sys.argv[1])


if __name__ == "__main__":
    trio.run(main)
