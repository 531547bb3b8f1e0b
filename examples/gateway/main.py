"""An HTTP gateway in front of the greeter: HTTP in, gRPC out.

Start the greeter, then the gateway, from the repository root:

    python examples/grpc/main.py &
    python examples/gateway/main.py
    curl 'localhost:8080/hello?name=Ada'
    curl 'localhost:8080/hello?name='      # 400: the greeter's ValidationError

``[clients.greeter]`` in service.toml names the greeter's address; the
channel is a lifecycle component, so it opens before the HTTP server starts
and closes after it drains. A greeter error (say, an empty name) comes back
as the same Mikros error kind over HTTP.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trio
from dependency_injector import providers
from quart import request
from quart_trio import QuartTrio

import mikros_trio
import mikros_trio.grpc
from mikros_trio import ServiceContainer

# The greeter's generated client code lives with the greeter example.
sys.path.insert(0, str(Path(__file__).parents[1] / "grpc"))
from greeter_proto import greeter_grpc, greeter_pb2


def create_app(greeter: greeter_grpc.GreeterStub) -> QuartTrio:
    """The HTTP API; ``greeter`` is the gRPC stub the container injects."""
    app = QuartTrio("gateway")

    @app.get("/hello")
    async def hello() -> dict[str, Any]:
        name = request.args.get("name", "")
        reply = await mikros_trio.grpc.call(
            greeter.SayHello, greeter_pb2.HelloRequest(name=name), destination="greeter"
        )
        return {"message": reply.message}

    return app


class Container(ServiceContainer):
    greeter_channel = mikros_trio.grpc.client("greeter")
    greeter = providers.Singleton(greeter_grpc.GreeterStub, greeter_channel)
    app = providers.Singleton(create_app, greeter=greeter)


if __name__ == "__main__":
    trio.run(mikros_trio.run, Container)
