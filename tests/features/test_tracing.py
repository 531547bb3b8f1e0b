"""The tracing feature: spans for real HTTP and gRPC services, and the observer's rules.

Service tests start real services with ``mikros_service`` (real sockets on
127.0.0.1, the memory exporter chosen through ``OTEL_TRACES_EXPORTER`` in
the service's environ or in service.toml) and drive them with httpx and
grpcio, reading the finished spans back from :class:`Tracing`. The
observer tests drive a real :class:`~mikros_trio._telemetry.Telemetry` the
way the kinds do. The helpers it shares with ``test_tracing_*`` are in ``helpers.py``.
"""

from __future__ import annotations

import base64
import logging
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from dependency_injector import providers
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from helpers import (
    BOUND,
    MEMORY,
    PARENT,
    SECRET,
    TRACE,
    TRACEPARENT,
    EchoRequest,
    TracedContainer,
    built,
    get,
    hex_ids,
    in_thread,
    leaked_forms,
    parent_ids,
    service_toml,
    spans_of,
    tracing_of,
    write_service,
)
from helpers import Container as EchoContainer
from helpers import grpc_channel as echo_channel
from mikros_trio import Lifetime, ServiceContainer
from mikros_trio._telemetry import current_telemetry
from mikros_trio.errors import ErrorKind
from mikros_trio.features.tracing import Tracing
from mikros_trio.testing import RunningService, ServiceStarter
from protos import testsvc_pb2_grpc

W3C = TraceContextTextMapPropagator()


# -- helpers -----------------------------------------------------------------------


async def start_http(
    mikros_service: ServiceStarter, tmp_path: Path, **options: Any
) -> RunningService:
    """Start the traced app with the memory exporter chosen through the environ."""
    environ = {**MEMORY, **options.pop("environ", {})}
    path = write_service(tmp_path, **options)
    with trio.fail_after(BOUND):
        return await mikros_service.start(TracedContainer, path, environ=environ)


# -- HTTP services ----------------------------------------------------------------


async def test_http_request_with_traceparent_is_a_server_span_in_that_trace(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An incoming traceparent makes the request's SERVER span a child of that remote parent."""
    running = await start_http(mikros_service, tmp_path)
    response = await get(running, "/ids?x=1", traceparent=TRACEPARENT)
    assert response.status_code == 200
    (span,) = await spans_of(running, 1)
    assert span.kind is SpanKind.SERVER
    assert span.name == "GET /ids"
    assert parent_ids(span) == (TRACE, PARENT)
    assert span.parent is not None
    assert span.parent.is_remote
    assert hex_ids(span)[0] == TRACE
    assert dict(span.attributes or {}) == {
        "http.request.method": "GET",
        "url.path": "/ids",
        "http.route": "/ids",
        "http.response.status_code": 200,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "traced"
    assert span.resource.attributes["service.version"] == "v1.2.0"


async def test_without_traceparent_each_request_starts_a_new_trace(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """No incoming traceparent: each request is the root of a trace of its own."""
    running = await start_http(mikros_service, tmp_path)
    for _ in range(2):
        assert (await get(running, "/ids")).status_code == 200
    first, second = await spans_of(running, 2)
    assert first.parent is None
    assert second.parent is None
    assert hex_ids(first)[0] != hex_ids(second)[0]


async def test_trace_ids_land_in_call_ids_and_the_span_is_current_in_the_handler(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """call.ids holds the span's trace_id/span_id (hex); the handler sees that span current."""
    running = await start_http(mikros_service, tmp_path)
    response = await get(running, "/ids", traceparent=TRACEPARENT)
    (span,) = await spans_of(running, 1)
    trace_id, span_id = hex_ids(span)
    body = response.json()
    assert body["ids"]["trace_id"] == trace_id == TRACE
    assert body["ids"]["span_id"] == span_id
    assert body["current"] == [trace_id, span_id]
    assert "traceparent" not in response.headers  # never echoed back to the caller


async def test_spans_started_in_a_handler_are_children_of_the_request_span(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Tracing.tracer in a handler makes children of the request's span, in its trace."""
    running = await start_http(mikros_service, tmp_path)
    assert (await get(running, "/work")).status_code == 200
    spans = {span.name: span for span in await spans_of(running, 2)}
    request, child = spans["GET /work"], spans["load-profile"]
    assert child.kind is SpanKind.INTERNAL
    assert parent_ids(child) == hex_ids(request)


async def test_a_handler_enriches_the_request_span(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Attributes and events a handler puts on the current span are exported; bad values are not."""
    running = await start_http(mikros_service, tmp_path)
    assert (await get(running, "/enrich")).status_code == 200
    [span] = await spans_of(running, 1)
    assert span.name == "GET /enrich"
    assert span.attributes["app.user"] == "ada"
    assert "app.bad" not in span.attributes
    assert span.attributes["http.route"] == "/enrich"
    assert [(event.name, dict(event.attributes or {})) for event in span.events] == [
        ("cache.miss", {"key": "ada"})
    ]


def assert_masked(span: ReadableSpan) -> None:
    """No form of the test secret is in ``span`` as an exporter writes it, and the mask is."""
    text = span.to_json()
    assert leaked_forms(SECRET, text) == [], text
    assert "***" in text, text


async def test_what_a_handler_puts_on_the_request_span_is_masked(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Attributes, keys, events, links, status and name set in a handler leave masked."""
    running = await start_http(mikros_service, tmp_path)
    assert (await get(running, "/leak")).status_code == 200
    [span] = await spans_of(running, 1)
    assert_masked(span)
    assert span.attributes is not None
    assert span.attributes["app.token"] == "'***'"
    assert span.attributes["app.list"] == ("***", "x")
    assert span.attributes["app.***"] == 1
    assert [event.name for event in span.events] == ["used ***"]
    assert span.status.description == 'refused "***"'


async def test_a_secret_in_the_path_is_masked_in_the_span(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A secret a client puts in the path is masked in url.path and the status description."""
    running = await start_http(mikros_service, tmp_path)
    path = "/items/" + urllib.parse.quote(SECRET, safe="")
    assert (await get(running, path + "?x=1")).status_code == 404
    [span] = await spans_of(running, 1)
    assert span.attributes is not None
    assert span.attributes["url.path"] == "/items/***"
    assert_masked(span)


async def test_spans_user_code_starts_are_masked_for_every_processor() -> None:
    """Spans of Tracing.tracer (children, statuses, links, recorded exceptions) leave masked.

    Both the feature's exporter and a processor the user adds to the provider get them masked.
    """
    telemetry, tracing, _ = built(service_toml(types="worker", tracing={"exporter": "memory"}))
    telemetry.add_secrets([SECRET])
    mine = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(mine))
    tracer = tracing.tracer
    with tracer.start_as_current_span(
        f"load {urllib.parse.quote(SECRET)}", attributes={"token": SECRET}
    ) as parent:
        parent.add_event("login", {"basic": base64.b64encode(f"u:{SECRET}".encode()).decode()})
        link = trace.Link(parent.get_span_context(), {"token": SECRET})
        with tracer.start_as_current_span("child", links=[link]) as child:
            child.set_status(trace.Status(StatusCode.ERROR, f"bad {SECRET!r}"))
        with pytest.raises(ValueError, match="refused"), tracer.start_as_current_span("grandchild"):
            raise ValueError(f"refused {SECRET}")
    for exported in (tracing.spans(), tuple(mine.get_finished_spans())):
        assert [span.name for span in exported] == ["child", "grandchild", "load ***"]
        for span in exported:
            assert_masked(span)
        child_span, grandchild, _ = exported
        assert child_span.status.description == "bad '***'"
        (event,) = grandchild.events
        assert event.attributes is not None
        assert event.attributes["exception.message"] == "refused ***"


async def test_spans_without_a_secret_are_handed_on_as_they_are() -> None:
    """With secrets registered, a span that shows none is not copied."""
    telemetry, tracing, _ = built(service_toml(types="worker", tracing={"exporter": "memory"}))
    telemetry.add_secrets([SECRET])
    seen: list[ReadableSpan] = []
    tracing.provider.add_span_processor(SimpleSpanProcessor(Recorder(seen)))
    call = telemetry.begin("worker", "internal", "worker")
    telemetry.end(call, "ok")
    assert tracing.spans() == tuple(seen)
    assert tracing.spans()[0] is seen[0]


class Recorder(SpanExporter):
    """A span exporter that keeps the very objects it was handed."""

    def __init__(self, seen: list[ReadableSpan]) -> None:
        self.seen = seen

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.seen.extend(spans)
        return SpanExportResult.SUCCESS


async def test_a_handler_sets_the_status_and_records_an_exception(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A handler's set_status(ERROR) and record_exception reach the exported span."""
    running = await start_http(mikros_service, tmp_path)
    assert (await get(running, "/degrade")).status_code == 200
    [span] = await spans_of(running, 1)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "served stale data"
    [event] = span.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "cache down"


async def test_not_found_leaves_the_status_unset_and_records_the_kind(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """NotFoundError is the caller's mistake: status UNSET, mikros.error.kind set, no event."""
    running = await start_http(mikros_service, tmp_path)
    assert (await get(running, "/items/42")).status_code == 404
    (span,) = await spans_of(running, 1)
    assert span.name == "GET /items/<item_id>"
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes is not None
    assert span.attributes["mikros.error.kind"] == "NotFoundError"
    assert span.attributes["http.response.status_code"] == 404
    assert span.attributes["url.path"] == "/items/42"
    assert span.events == ()


async def test_an_unexpected_exception_is_an_error_with_a_masked_exception_event(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """RuntimeError: status ERROR, an exception event with type and stack; the secret is masked."""
    running = await start_http(mikros_service, tmp_path)
    assert (await get(running, "/boom")).status_code == 500
    (span,) = await spans_of(running, 1)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "RuntimeError: the handler broke holding ***"
    assert span.attributes is not None
    assert span.attributes["mikros.error.kind"] == "InternalError"
    assert span.attributes["error.type"] == "builtins.RuntimeError"
    assert span.attributes["http.response.status_code"] == 500
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "builtins.RuntimeError"
    assert event.attributes["exception.message"] == "the handler broke holding ***"
    assert "in boom" in str(event.attributes["exception.stacktrace"])
    assert SECRET not in span.to_json()


async def test_an_unmatched_path_keeps_the_method_as_its_name(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """No route matched: the span is named by the method alone and has no http.route."""
    running = await start_http(mikros_service, tmp_path)
    assert (await get(running, "/no/such/thing")).status_code == 404
    (span,) = await spans_of(running, 1)
    assert span.name == "GET"
    assert span.attributes is not None
    assert "http.route" not in span.attributes
    assert span.attributes["url.path"] == "/no/such/thing"


async def test_probes_make_no_spans(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """Health probes are not calls: they leave no span."""
    running = await start_http(mikros_service, tmp_path)
    for probe in ("/livez", "/readyz", "/healthz"):
        assert (await get(running, probe)).status_code == 200
    assert (await get(running, "/ids")).status_code == 200
    assert [span.name for span in await spans_of(running, 1)] == ["GET /ids"]


async def test_exporter_from_service_toml(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """exporter = "memory" in [features.tracing] works without any environment variable."""
    path = write_service(tmp_path, tracing={"exporter": "memory"})
    with trio.fail_after(BOUND):
        running = await mikros_service.start(TracedContainer, path, environ={"API_TOKEN": SECRET})
    assert tracing_of(running).exporter_name == "memory"
    assert (await get(running, "/ids")).status_code == 200
    assert len(await spans_of(running, 1)) == 1


async def test_spans_are_kept_after_the_service_stopped(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """After stop (flush and shutdown), the memory exporter still holds every span."""
    running = await start_http(mikros_service, tmp_path)
    assert (await get(running, "/ids")).status_code == 200
    await spans_of(running, 1)
    with trio.fail_after(BOUND):
        assert await running.stop() == 0
    assert [span.name for span in tracing_of(running).spans()] == ["GET /ids"]


# -- gRPC services ----------------------------------------------------------------


async def start_echo(mikros_service: ServiceStarter, tmp_path: Path) -> RunningService:
    """The echo service of helpers.py, traced into memory."""
    path = write_service(tmp_path, types="grpc", name="echo")
    with trio.fail_after(BOUND):
        return await mikros_service.start(EchoContainer, path, environ=MEMORY)


def echo_unary(port: int, request: Any, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    """One grpcio Unary call with ``metadata`` (blocking; run it in a thread)."""
    with echo_channel(port) as channel:
        return testsvc_pb2_grpc.EchoStub(channel).Unary(request, timeout=BOUND, metadata=metadata)


def echo_error(port: int, request: Any) -> grpc.StatusCode:
    """The status code a failing Unary call gets (blocking)."""
    try:
        echo_unary(port, request)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    raise AssertionError("the call succeeded")


async def test_grpc_call_with_traceparent_metadata_is_a_server_span_in_that_trace(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """grpcio call with traceparent metadata: SERVER span named pkg.Service/Method in that trace."""
    running = await start_echo(mikros_service, tmp_path)
    metadata = (("traceparent", TRACEPARENT), ("tracestate", "vendor=abc"))
    reply = await in_thread(echo_unary, running.ports["grpc"], EchoRequest(text="hi"), metadata)
    assert reply.text == "hi"
    (span,) = await spans_of(running, 1)
    assert span.kind is SpanKind.SERVER
    assert span.name == "mikros.testsvc.v1.Echo/Unary"
    assert parent_ids(span) == (TRACE, PARENT)
    assert span.get_span_context().trace_state.get("vendor") == "abc"  # type: ignore[union-attr]
    assert dict(span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "mikros.testsvc.v1.Echo",
        "rpc.method": "Unary",
        "rpc.grpc.status_code": 0,
    }
    assert span.status.status_code is StatusCode.UNSET


async def test_grpc_without_metadata_is_a_root_span(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A gRPC call without traceparent starts a trace of its own."""
    running = await start_echo(mikros_service, tmp_path)
    await in_thread(echo_unary, running.ports["grpc"], EchoRequest(text="hi"))
    (span,) = await spans_of(running, 1)
    assert span.parent is None


async def test_grpc_not_found_is_unset_and_a_runtime_error_is_an_error(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A NotFoundError: UNSET with the kind recorded; an unexpected error: ERROR, an event.

    Both travel as UNKNOWN ([features.errors] grpc_status default): the kind decides.
    """
    running = await start_echo(mikros_service, tmp_path)
    port = running.ports["grpc"]
    assert await in_thread(echo_error, port, EchoRequest(fail="not-found")) is (
        grpc.StatusCode.UNKNOWN
    )
    assert await in_thread(echo_error, port, EchoRequest(fail="runtime")) is (
        grpc.StatusCode.UNKNOWN
    )
    not_found, broken = await spans_of(running, 2)
    assert not_found.status.status_code is StatusCode.UNSET
    assert not_found.attributes is not None
    assert not_found.attributes["mikros.error.kind"] == "NotFoundError"
    assert not_found.attributes["rpc.grpc.status_code"] == 2
    assert not_found.events == ()
    assert broken.status.status_code is StatusCode.ERROR
    assert broken.attributes is not None
    assert broken.attributes["rpc.grpc.status_code"] == 2
    assert broken.attributes["error.type"] == "builtins.RuntimeError"
    assert [event.name for event in broken.events] == ["exception"]


async def test_an_internal_service_error_is_an_error_without_an_exception_event(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """InternalError raised on purpose: status ERROR described by its kind, no stack recorded."""
    running = await start_echo(mikros_service, tmp_path)
    code = await in_thread(echo_error, running.ports["grpc"], EchoRequest(fail="internal"))
    assert code is grpc.StatusCode.UNKNOWN
    (span,) = await spans_of(running, 1)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "InternalError: raised internal"
    assert span.events == ()


# -- the observer, through a real hub ------------------------------------------------


MEMORY_TOML = service_toml(types="worker", tracing={"exporter": "memory"})


async def test_a_non_standard_method_keeps_span_names_bounded() -> None:
    """A BREW request: span named HTTP /pot, method _OTHER, the original kept aside."""
    telemetry, tracing, _ = built(MEMORY_TOML)
    call = telemetry.begin("http", "server", "", method="BREW", target="/pot")
    call.name = "/pot"
    telemetry.end(call, "405")
    (span,) = tracing.spans()
    assert span.name == "HTTP /pot"
    assert span.attributes is not None
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "BREW"


async def test_client_call_is_a_child_of_the_current_span_and_injects_traceparent() -> None:
    """A client call: CLIENT child of the current span, traceparent/ids written, never attached."""
    telemetry, tracing, _ = built(MEMORY_TOML)
    server = telemetry.begin("grpc", "server", "/pkg.Api/Get", headers=[("x", "y")])
    client = telemetry.begin("grpc", "client", "/pkg.Greeter/Hi", target="greeter")
    still_current = trace.get_current_span().get_span_context()
    telemetry.end(client, "OK")
    telemetry.end(server, "OK")
    client_span, server_span = tracing.spans()
    trace_id, span_id = hex_ids(client_span)
    assert client_span.kind is SpanKind.CLIENT
    assert client_span.name == "pkg.Greeter/Hi"
    assert parent_ids(client_span) == hex_ids(server_span)
    # Exactly what the SDK's W3C propagator writes for that span (flags: sampled).
    written: dict[str, str] = {}
    context = client_span.get_span_context()
    assert context is not None
    W3C.inject(written, trace.set_span_in_context(trace.NonRecordingSpan(context)))
    assert client.outgoing == written
    assert written["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
    assert int(written["traceparent"][-2:], 16) & 1  # sampled
    assert client.ids == {"trace_id": trace_id, "span_id": span_id}
    assert format(still_current.span_id, "016x") == hex_ids(server_span)[1]
    assert dict(client_span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "pkg.Greeter",
        "rpc.method": "Hi",
        "peer.service": "greeter",
        "rpc.grpc.status_code": 0,
    }
    assert not trace.get_current_span().get_span_context().is_valid  # all detached


async def test_client_call_carries_the_incoming_tracestate_on() -> None:
    """The tracestate of the incoming call goes out again with the client call."""
    telemetry, _, _ = built(MEMORY_TOML)
    headers = [("traceparent", TRACEPARENT), ("tracestate", "vendor=abc")]
    server = telemetry.begin("grpc", "server", "/pkg.Api/Get", headers=headers)
    client = telemetry.begin("grpc", "client", "/pkg.Greeter/Hi", target="greeter")
    assert client.outgoing["tracestate"] == "vendor=abc"
    assert client.outgoing["traceparent"].startswith(f"00-{TRACE}-")
    telemetry.end(client, "OK")
    telemetry.end(server, "OK")


async def test_client_error_kinds_are_unset_and_server_faults_are_errors() -> None:
    """A client call ending NOT_FOUND stays UNSET; one ending UNAVAILABLE (failed) is ERROR."""
    telemetry, tracing, _ = built(MEMORY_TOML)
    missing = telemetry.begin("grpc", "client", "/pkg.Greeter/Hi", target="greeter")
    missing.error_kind = ErrorKind.NOT_FOUND
    telemetry.end(missing, "NOT_FOUND")
    down = telemetry.begin("grpc", "client", "/pkg.Greeter/Hi", target="greeter")
    telemetry.end(down, "UNAVAILABLE", failed=True, error=ConnectionRefusedError("refused"))
    first, second = tracing.spans()
    assert first.status.status_code is StatusCode.UNSET
    assert (first.attributes or {})["mikros.error.kind"] == "NotFoundError"
    assert second.status.status_code is StatusCode.ERROR
    assert second.status.description == "ConnectionRefusedError: refused"
    assert (second.attributes or {})["rpc.grpc.status_code"] == 14


async def test_a_server_call_ended_from_another_task_does_not_detach_there(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """finished() in a task other than started()'s ends the span and logs no detach failure."""
    telemetry, tracing, _ = built(MEMORY_TOML)
    call = telemetry.begin("http", "server", "", method="GET", target="/x")
    assert trace.get_current_span().get_span_context().is_valid
    caplog.set_level(logging.DEBUG)

    async def end_elsewhere() -> None:
        telemetry.end(call, "200")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(end_elsewhere)
    assert len(tracing.spans()) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_worker_iterations_are_internal_spans_current_during_the_iteration() -> None:
    """Each iteration: an INTERNAL root span, current while it runs; an error marks it ERROR."""
    telemetry, tracing, _ = built(MEMORY_TOML)
    call = telemetry.begin("worker", "internal", "worker")
    inside = trace.get_current_span().get_span_context()
    telemetry.end(call, "ok")
    failing = telemetry.begin("worker", "internal", "worker")
    telemetry.end(failing, "error", failed=True, error=ValueError("bad row"))
    ok, bad = tracing.spans()
    assert (ok.name, ok.kind, ok.parent) == ("worker", SpanKind.INTERNAL, None)
    assert format(inside.span_id, "016x") == hex_ids(ok)[1]
    assert call.ids["trace_id"] == hex_ids(ok)[0]
    assert ok.status.status_code is StatusCode.UNSET
    assert bad.status.status_code is StatusCode.ERROR
    assert [event.name for event in bad.events] == ["exception"]
    assert hex_ids(ok)[0] != hex_ids(bad)[0]


async def test_with_no_exporter_a_processor_added_later_still_gets_every_span() -> None:
    """exporter = "none" builds no exportable span, until a processor is added to the provider."""
    telemetry, tracing, _ = built(service_toml(types="worker", tracing={"exporter": "none"}))
    unseen = telemetry.begin("worker", "internal", "worker")
    telemetry.end(unseen, "ok")
    memory = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(memory))
    seen = telemetry.begin("worker", "internal", "worker")
    telemetry.end(seen, "ok")
    (span,) = memory.get_finished_spans()
    assert hex_ids(span)[0] == seen.ids["trace_id"]


async def test_sample_ratio_zero_drops_new_traces_but_keeps_sampled_parents() -> None:
    """sample_ratio = 0: no span for new traces (ids still set); incoming sampled ones are kept."""
    toml = service_toml(types="worker", tracing={"exporter": "memory", "sample_ratio": 0})
    telemetry, tracing, _ = built(toml)
    dropped = telemetry.begin("http", "server", "", method="GET", target="/a")
    telemetry.end(dropped, "200")
    assert tracing.spans() == ()
    assert len(dropped.ids["trace_id"]) == 32
    kept = telemetry.begin(
        "http", "server", "", method="GET", target="/b", headers=[("traceparent", TRACEPARENT)]
    )
    client = telemetry.begin("grpc", "client", "/pkg.S/M", target="peer")
    telemetry.end(client, "OK")
    telemetry.end(kept, "200")
    assert [span.kind for span in tracing.spans()] == [SpanKind.CLIENT, SpanKind.SERVER]


async def test_unsampled_client_calls_still_propagate_their_trace() -> None:
    """A call in a trace not sampled still sends a traceparent, with the sampled flag off."""
    toml = service_toml(types="worker", tracing={"exporter": "memory", "sample_ratio": 0})
    telemetry, _, _ = built(toml)
    client = telemetry.begin("grpc", "client", "/pkg.S/M", target="peer")
    telemetry.end(client, "OK")
    trace_id, span_id = client.ids["trace_id"], client.ids["span_id"]
    traceparent = client.outgoing["traceparent"]
    assert traceparent.startswith(f"00-{trace_id}-{span_id}-")
    assert not int(traceparent[-2:], 16) & 1  # not sampled


# -- worker and script services ----------------------------------------------------


class Batches:
    """A periodic worker: the second batch fails, the third stops the service."""

    def __init__(self) -> None:
        self.count = 0

    async def run_once(self, lifetime: Lifetime) -> None:
        self.count += 1
        if self.count == 2:
            raise ValueError("bad batch")
        if self.count == 3:
            lifetime.stop("enough batches")


class WorkerContainer(ServiceContainer):
    worker = providers.Singleton(Batches)


async def test_worker_iterations_of_a_running_service_are_spans(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """[runtime.worker] interval: one INTERNAL root span per iteration; the failed one is ERROR."""
    path = tmp_path / "worker.toml"
    path.write_text(service_toml(types="worker") + "\n[runtime.worker]\ninterval = 0.5\n")
    running = await mikros_service.start(WorkerContainer, path, environ=MEMORY)
    assert await running.wait() == 0
    spans = tracing_of(running).spans()
    assert [(span.name, span.kind, span.parent) for span in spans] == [
        ("worker", SpanKind.INTERNAL, None)
    ] * 3
    assert [span.status.status_code for span in spans] == [
        StatusCode.UNSET,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert len({hex_ids(span)[0] for span in spans}) == 3


def script_container(script: Any) -> type[ServiceContainer]:
    class ScriptContainer(ServiceContainer):
        pass

    ScriptContainer.script = providers.Object(script)  # type: ignore[attr-defined]
    return ScriptContainer


async def test_a_script_run_is_one_span_holding_the_spans_it_makes(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """The script run is an INTERNAL span; spans the script starts are its children."""

    async def script() -> int:
        telemetry = current_telemetry()
        assert telemetry is not None
        with telemetry.get(Tracing).tracer.start_as_current_span("migrate"):
            await trio.lowlevel.checkpoint()
        return 0

    path = write_service(tmp_path, types="script")
    running = await mikros_service.start(script_container(script), path, environ=MEMORY)
    assert await running.wait() == 0
    migrate, run = tracing_of(running).spans()
    assert (run.name, run.kind, run.parent) == ("script", SpanKind.INTERNAL, None)
    assert parent_ids(migrate) == hex_ids(run)
    assert run.status.status_code is StatusCode.UNSET


async def test_a_failing_script_is_an_error_span(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A script raising: exit 1 and its span is ERROR with the exception event."""

    async def script() -> None:
        raise LookupError("no such tenant")

    path = write_service(tmp_path, types="script")
    running = await mikros_service.start(script_container(script), path, environ=MEMORY)
    assert await running.wait() == 1
    (run,) = tracing_of(running).spans()
    assert run.status.status_code is StatusCode.ERROR
    assert [event.name for event in run.events] == ["exception"]


# -- the resource: Mikros' product and deploy environment ----------------------------------

_DEPLOY = ("deployment.environment.name", "deployment.environment")


@pytest.mark.parametrize(
    ("deploy", "otel", "expected"),
    [
        ("prod", "", dict.fromkeys(_DEPLOY, "prod")),
        ("", "", dict.fromkeys(_DEPLOY, "local")),
        ("", "deployment.environment.name=staging", {_DEPLOY[0]: "staging"}),
        ("", "deployment.environment=staging", {_DEPLOY[1]: "staging"}),
        ("prod", "deployment.environment.name=staging", dict.fromkeys(_DEPLOY, "prod")),
    ],
    ids=["deploy", "unset-is-local", "otel-names-it", "otel-old-key", "deploy-wins"],
)
def test_resource_carries_the_product_and_deploy_env(
    monkeypatch: pytest.MonkeyPatch, deploy: str, otel: str, expected: dict[str, str]
) -> None:
    """MIKROS_SERVICE_DEPLOY is deployment.environment.name (local unset), product the namespace.

    Unset, "local" gives way to an environment OTEL_RESOURCE_ATTRIBUTES names.
    """
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", otel)
    environ = {"MIKROS_SERVICE_DEPLOY": deploy} if deploy else {}
    toml = 'product = "Shop"\n' + service_toml(types="worker", tracing={"exporter": "memory"})
    _, tracing, _ = built(toml, environ)
    attributes = dict(tracing.provider.resource.attributes)
    assert {key: attributes[key] for key in _DEPLOY if key in attributes} == expected
    assert attributes["service.namespace"] == "Shop"
    assert (attributes["service.name"], attributes["service.version"]) == ("traced", "v1.2.0")


def test_no_product_no_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a product the resource has no service.namespace (an empty one groups nothing)."""
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    _, tracing, _ = built(service_toml(types="worker", tracing={"exporter": "memory"}))
    assert "service.namespace" not in tracing.provider.resource.attributes
