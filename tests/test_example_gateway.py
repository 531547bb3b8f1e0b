"""The gateway example: HTTP in, gRPC out to the greeter, both started in-process.

The greeter (``examples/grpc``) and the gateway (``examples/gateway``) each
start through the ``mikros_service`` fixture on ephemeral ports; the
gateway's ``[clients.greeter]`` is pointed at the greeter's bound port by a
copy of its service.toml (``start_greeter_and_gateway`` of helpers.py; the
``examples`` fixture of conftest.py imports both). httpx calls the gateway's
real listener. Every wait is bounded.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import trio

from helpers import PATIENCE, Examples, start_greeter_and_gateway
from mikros_trio.testing import RunningService, ServiceStarter


def _client(gateway: RunningService) -> httpx.AsyncClient:
    base = f"http://127.0.0.1:{gateway.ports['http']}"
    return httpx.AsyncClient(base_url=base, timeout=PATIENCE)


async def test_hello_is_the_greeters_reply(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> None:
    """GET /hello?name=Ada answers 200 with the greeter's message."""
    _, gateway = await start_greeter_and_gateway(mikros_service, examples, tmp_path)
    async with _client(gateway) as client:
        response = await client.get("/hello", params={"name": "Ada"})
    assert response.status_code == 200
    assert response.json() == {"message": "Hello, Ada!"}


async def test_greeter_validation_error_is_relayed_as_400(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> None:
    """An empty name: the greeter's ValidationError comes back as a 400 naming the destination."""
    _, gateway = await start_greeter_and_gateway(mikros_service, examples, tmp_path)
    async with _client(gateway) as client:
        response = await client.get("/hello", params={"name": ""})
    assert response.status_code == 400
    wire = response.json()
    assert wire["kind"] == "ValidationError"
    assert wire["destination"] == "greeter"
    assert wire["message"] == "name must not be empty"


async def test_greeter_down_is_a_prompt_500_rpc_error(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> None:
    """With the greeter stopped, the next call answers 500 RPCError naming the client, promptly."""
    greeter, gateway = await start_greeter_and_gateway(mikros_service, examples, tmp_path)
    async with _client(gateway) as client:
        assert (await client.get("/hello", params={"name": "Ada"})).status_code == 200
        with trio.fail_after(PATIENCE):
            assert await greeter.stop() == 0
        sent = time.perf_counter()
        response = await client.get("/hello", params={"name": "Ada"})
        elapsed = time.perf_counter() - sent
    assert response.status_code == 500
    wire = response.json()
    assert wire["kind"] == "RPCError"
    assert wire["destination"] == "greeter"
    assert "'greeter'" in wire["message"]
    # A refused connection fails at once: far below the channel's connect timeout (5 s).
    assert elapsed < 1.0, wire
    assert gateway.health.ready  # a peer going away is not the gateway's failure


async def test_channel_starts_before_http_and_stops_after_it(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> None:
    """The event log: greeter_channel is started before http starts, and stops after http."""
    _, gateway = await start_greeter_and_gateway(mikros_service, examples, tmp_path)
    async with _client(gateway) as client:
        assert (await client.get("/hello", params={"name": "Ada"})).status_code == 200
    with trio.fail_after(PATIENCE):
        assert await gateway.stop() == 0
    events = [(event.component, event.phase) for event in gateway.events]
    assert gateway.phases("greeter_channel") == ["starting", "started", "stopping", "stopped"]
    assert gateway.phases("http") == ["starting", "started", "stopping", "stopped"]
    assert events.index(("greeter_channel", "started")) < events.index(("http", "starting"))
    assert events.index(("http", "stopped")) < events.index(("greeter_channel", "stopping"))
