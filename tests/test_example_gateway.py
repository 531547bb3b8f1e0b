"""The gateway example: HTTP in, gRPC out to the greeter, both started in-process.

The greeter (``examples/grpc``) and the gateway (``examples/gateway``) each
start through the ``mikros_service`` fixture on ephemeral ports; the
gateway's ``[clients.greeter]`` is pointed at the greeter's bound port by a
copy of its service.toml. httpx calls the gateway's real listener. Every
wait is bounded.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import trio

from helpers import PATIENCE, REPO, import_example
from mikros_trio.testing import RunningService, ServiceStarter

GRPC = REPO / "examples" / "grpc"
GATEWAY = REPO / "examples" / "gateway"


@dataclass(frozen=True)
class Examples:
    greeter: ModuleType
    gateway: ModuleType


@pytest.fixture(name="examples", scope="module")
def fixture_examples() -> Iterator[Examples]:
    """Both examples' main.py, imported under names no other example's ``main`` takes."""
    greeter = import_example(GRPC / "main.py", "grpc_example_main_for_gateway")
    try:
        gateway = import_example(GATEWAY / "main.py", "gateway_example_main")
        try:
            yield Examples(greeter, gateway)
        finally:
            del sys.modules[gateway.__name__]
    finally:
        del sys.modules[greeter.__name__]


def _gateway_config(tmp_path: Path, greeter_port: int) -> Path:
    """A copy of the gateway's service.toml whose ``[clients.greeter]`` is the running greeter."""
    text = (GATEWAY / "service.toml").read_text()
    text, count = re.subn(
        r"(?ms)^(\[clients\.greeter\]\n.*?^port\s*=\s*)\d+", rf"\g<1>{greeter_port}", text
    )
    assert count == 1, "no [clients.greeter] port in the gateway's service.toml"
    path = tmp_path / "service.toml"
    path.write_text(text)
    return path


async def _start_both(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> tuple[RunningService, RunningService]:
    """The greeter, then the gateway pointed at it; both ready."""
    with trio.fail_after(PATIENCE):
        greeter = await mikros_service.start(examples.greeter.Container, GRPC / "service.toml")
        config = _gateway_config(tmp_path, greeter.ports["grpc"])
        gateway = await mikros_service.start(examples.gateway.Container, config)
    return greeter, gateway


def _client(gateway: RunningService) -> httpx.AsyncClient:
    base = f"http://127.0.0.1:{gateway.ports['http']}"
    return httpx.AsyncClient(base_url=base, timeout=PATIENCE)


async def test_hello_is_the_greeters_reply(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> None:
    """GET /hello?name=Ada answers 200 with the greeter's message."""
    _, gateway = await _start_both(mikros_service, examples, tmp_path)
    async with _client(gateway) as client:
        response = await client.get("/hello", params={"name": "Ada"})
    assert response.status_code == 200
    assert response.json() == {"message": "Hello, Ada!"}


async def test_greeter_validation_error_is_relayed_as_400(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> None:
    """An empty name: the greeter's ValidationError comes back as a 400 naming the destination."""
    _, gateway = await _start_both(mikros_service, examples, tmp_path)
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
    greeter, gateway = await _start_both(mikros_service, examples, tmp_path)
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
    _, gateway = await _start_both(mikros_service, examples, tmp_path)
    async with _client(gateway) as client:
        assert (await client.get("/hello", params={"name": "Ada"})).status_code == 200
    with trio.fail_after(PATIENCE):
        assert await gateway.stop() == 0
    events = [(event.component, event.phase) for event in gateway.events]
    assert gateway.phases("greeter_channel") == ["starting", "started", "stopping", "stopped"]
    assert gateway.phases("http") == ["starting", "started", "stopping", "stopped"]
    assert events.index(("greeter_channel", "started")) < events.index(("http", "starting"))
    assert events.index(("http", "stopped")) < events.index(("greeter_channel", "stopping"))
