"""A gRPC service: the greeter, served by purerpc behind mikros_trio's server.

    python examples/grpc/main.py
    grpcurl -plaintext -d '{"name": "Ada"}' localhost:50051 greeter.Greeter/SayHello

The server also answers ``grpc.health.v1.Health`` and server reflection, so
grpcurl and grpc_health_probe work without extra setup. The code in
``greeter_proto/`` is generated from ``proto/greeter.proto`` by
``mikros-trio codegen proto --out greeter_proto`` (``nox -s codegen``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio
from dependency_injector import providers
from greeter_proto import greeter_grpc, greeter_pb2

import mikros_trio
from mikros_trio import ServiceContainer, ValidationError


@dataclass(frozen=True)
class Settings:
    """The ``[service]`` table."""

    greeting: str = "Hello"


class Greeter(greeter_grpc.GreeterServicer):
    """The servicer: purerpc calls these methods, one task per RPC."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _greet(self, name: str) -> greeter_pb2.HelloReply:
        if not name:
            raise ValidationError("name must not be empty")
        return greeter_pb2.HelloReply(message=f"{self.settings.greeting}, {name}!")

    async def SayHello(self, message: greeter_pb2.HelloRequest) -> greeter_pb2.HelloReply:
        return self._greet(message.name)

    async def SayHelloStream(
        self, message: greeter_pb2.HelloStreamRequest
    ) -> AsyncIterator[greeter_pb2.HelloReply]:
        reply = self._greet(message.name)
        for _ in range(message.count):
            yield reply
            await trio.sleep(message.interval_ms / 1000)


class Container(ServiceContainer):
    service_model = Settings

    greeter = providers.Singleton(Greeter, settings=ServiceContainer.settings)


if __name__ == "__main__":
    trio.run(mikros_trio.run, Container)
