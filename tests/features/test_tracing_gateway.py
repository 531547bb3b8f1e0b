"""One trace across services: examples/gateway (HTTP → gRPC client) calling examples/grpc.

Both examples start in-process through ``mikros_service`` from copies of
their service.toml (tracing enabled if the file does not already enable
it; the gateway's ``[clients.greeter]`` pointed at the running greeter),
with the memory exporter chosen through each service's environ. httpx
calls the gateway's real listener; every wait is bounded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import trio
from opentelemetry.trace import SpanKind, StatusCode

from helpers import (
    BOUND,
    GATEWAY,
    GRPC,
    TRACE,
    TRACEPARENT,
    Examples,
    hex_ids,
    parent_ids,
    spans_of,
)
from mikros_trio.testing import RunningService, ServiceStarter


def traced_copy(source: Path, target: Path, greeter_port: int | None = None) -> Path:
    """``source`` (an example's service.toml) with tracing on, written to ``target``."""
    text = source.read_text()
    if greeter_port is not None:
        text, count = re.subn(
            r"(?ms)^(\[clients\.greeter\]\n.*?^port\s*=\s*)\d+", rf"\g<1>{greeter_port}", text
        )
        assert count == 1, "no [clients.greeter] port in the gateway's service.toml"
    if "[features.tracing]" not in text:
        text += "\n[features.tracing]\nenabled = true\n"
    target.write_text(text)
    return target


def memory_environ() -> dict[str, str]:
    """The process environment, with spans kept in memory (``OTEL_TRACES_EXPORTER``)."""
    return {**os.environ, "OTEL_TRACES_EXPORTER": "memory"}


async def start_both(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> tuple[RunningService, RunningService]:
    """The greeter, then the gateway pointed at it; both traced into memory and ready."""
    with trio.fail_after(BOUND):
        greeter = await mikros_service.start(
            examples.greeter.Container,
            traced_copy(GRPC / "service.toml", tmp_path / "greeter.toml"),
            environ=memory_environ(),
        )
        config = traced_copy(
            GATEWAY / "service.toml", tmp_path / "gateway.toml", greeter.ports["grpc"]
        )
        gateway = await mikros_service.start(
            examples.gateway.Container, config, environ=memory_environ()
        )
    return greeter, gateway


async def hello(gateway: RunningService, name: str, **headers: str) -> httpx.Response:
    base = f"http://127.0.0.1:{gateway.ports['http']}"
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
            return await client.get("/hello", params={"name": name}, headers=headers)


async def test_one_request_through_the_gateway_is_one_trace(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> None:
    """HTTP SERVER (gateway) → CLIENT (gateway) → gRPC SERVER (greeter): one trace, chained."""
    greeter, gateway = await start_both(mikros_service, examples, tmp_path)
    response = await hello(gateway, "Ada")
    assert response.json() == {"message": "Hello, Ada!"}
    gateway_spans = {span.kind: span for span in await spans_of(gateway, 2)}
    (served,) = await spans_of(greeter, 1)
    http, client = gateway_spans[SpanKind.SERVER], gateway_spans[SpanKind.CLIENT]

    assert http.parent is None
    assert parent_ids(client) == hex_ids(http)
    assert parent_ids(served) == hex_ids(client)
    assert served.parent is not None
    assert served.parent.is_remote  # it came over the wire, as metadata
    assert len({hex_ids(span)[0] for span in (http, client, served)}) == 1

    assert http.name == "GET /hello"
    assert client.name == served.name == "greeter.Greeter/SayHello"
    assert served.kind is SpanKind.SERVER
    assert (client.attributes or {})["peer.service"] == "greeter"
    assert (client.attributes or {})["rpc.grpc.status_code"] == 0
    assert (served.attributes or {})["rpc.grpc.status_code"] == 0
    assert http.resource.attributes["service.name"] == "gateway"
    assert served.resource.attributes["service.name"] == "greeter"


async def test_the_callers_traceparent_reaches_the_greeter(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> None:
    """A traceparent sent to the gateway: all three spans are in the caller's trace."""
    greeter, gateway = await start_both(mikros_service, examples, tmp_path)
    assert (await hello(gateway, "Ada", traceparent=TRACEPARENT)).status_code == 200
    spans = [*await spans_of(gateway, 2), *await spans_of(greeter, 1)]
    assert {hex_ids(span)[0] for span in spans} == {TRACE}


async def test_a_relayed_validation_error_leaves_every_span_unset(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> None:
    """An empty name: the greeter's ValidationError, relayed as a 400, leaves every span UNSET."""
    greeter, gateway = await start_both(mikros_service, examples, tmp_path)
    assert (await hello(gateway, "")).status_code == 400
    spans = [*await spans_of(gateway, 2), *await spans_of(greeter, 1)]
    assert [span.status.status_code for span in spans] == [StatusCode.UNSET] * 3
    served = spans[-1]
    assert (served.attributes or {})["mikros.error.kind"] == "ValidationError"
    assert (served.attributes or {})["rpc.grpc.status_code"] == 2  # UNKNOWN, the default
    http = next(span for span in spans if span.name == "GET /hello")
    assert (http.attributes or {})["http.response.status_code"] == 400
    assert (http.attributes or {})["mikros.error.kind"] == "ValidationError"
