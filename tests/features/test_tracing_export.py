"""Where spans go: OTLP/HTTP to a real receiver at the shutdown flush, console, and choices.

The OTLP tests run a tiny OTLP/HTTP receiver (the standard library's
threaded HTTP server on 127.0.0.1, port 0) that records every POST and
decodes it with the OTLP protobuf schema; the service exports to it
through the real ``opentelemetry-exporter-otlp-proto-http`` exporter.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from helpers import (
    BOUND,
    MEMORY,
    SECRET,
    TracedContainer,
    built,
    free_port,
    get,
    service_toml,
    tracing_of,
    write_service,
)
from mikros_trio import ConfigError
from mikros_trio.testing import ServiceStarter


class Receiver:
    """An OTLP/HTTP traces receiver: records (path, content type, decoded request) per POST."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str, ExportTraceServiceRequest]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver._lock:
                    receiver.posts.append((self.path, self.headers["content-type"], request))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]

    def span_names(self) -> list[str]:
        """Every span name received, in order."""
        with self._lock:
            return [
                span.name
                for _, _, request in self.posts
                for resource in request.resource_spans
                for scope in resource.scope_spans
                for span in scope.spans
            ]


@pytest.fixture(name="receiver")
def fixture_receiver() -> Iterator[Receiver]:
    """A running receiver, shut down and closed at teardown."""
    receiver = Receiver()
    thread = threading.Thread(
        target=receiver.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(BOUND)


@pytest.mark.parametrize("configured_by", ["environ", "settings"])
async def test_otlp_spans_reach_the_receiver_by_the_time_the_service_stopped(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    receiver: Receiver,
    configured_by: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """exporter = otlp: the batch is POSTed to /v1/traces as protobuf when the service stops."""
    # The batch processor would otherwise send on its own after 5 s: only the flush sends here.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    base = f"http://127.0.0.1:{receiver.port}"
    environ = {"API_TOKEN": SECRET, "MIKROS_SERVICE_DEPLOY": "production"}
    tracing: dict[str, Any] = {"exporter": "otlp"}
    if configured_by == "environ":
        environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = base
    else:
        tracing["endpoint"] = f"{base}/v1/traces"
    path = tmp_path / "traced.toml"
    path.write_text('product = "Shop"\n' + service_toml(tracing=tracing))
    with trio.fail_after(BOUND):
        running = await mikros_service.start(TracedContainer, path, environ=environ)
    for _ in range(3):
        assert (await get(running, "/ids")).status_code == 200
    await trio.sleep(0.05)  # a moment for anything that would be sent early
    assert receiver.posts == []
    with trio.fail_after(BOUND):
        assert await running.stop() == 0
    assert receiver.span_names() == ["GET /ids"] * 3
    route, content_type, request = receiver.posts[0]
    assert route == "/v1/traces"
    assert content_type == "application/x-protobuf"
    attributes = {
        item.key: item.value.string_value for item in request.resource_spans[0].resource.attributes
    }
    assert attributes["service.name"] == "traced"
    assert attributes["service.version"] == "v1.2.0"
    assert attributes["service.namespace"] == "Shop"
    assert attributes["deployment.environment.name"] == "production"


async def test_an_unreachable_collector_does_not_hold_the_exit(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Nobody listens at the endpoint: the service still stops with exit code 0, in bounded time."""
    endpoint = f"http://127.0.0.1:{free_port()}/v1/traces"
    path = write_service(
        tmp_path, tracing={"exporter": "otlp", "endpoint": endpoint, "flush_timeout": 0.5}
    )
    with trio.fail_after(BOUND):
        running = await mikros_service.start(TracedContainer, path, environ={"API_TOKEN": SECRET})
    assert (await get(running, "/ids")).status_code == 200
    with trio.fail_after(BOUND):
        assert await running.stop() == 0


async def test_console_writes_one_json_object_per_span_to_stderr(
    mikros_service: ServiceStarter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OTEL_TRACES_EXPORTER=console: each finished span is one JSON line on stderr."""
    path = write_service(tmp_path, tracing={"exporter": "memory"})
    environ = {**MEMORY, "OTEL_TRACES_EXPORTER": "console"}
    with trio.fail_after(BOUND):
        running = await mikros_service.start(TracedContainer, path, environ=environ)
    assert tracing_of(running).exporter_name == "console"
    assert (await get(running, "/items/7")).status_code == 404
    with trio.fail_after(BOUND):
        assert await running.stop() == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    (span,) = [json.loads(line) for line in lines]
    assert span["name"] == "GET /items/<item_id>"
    assert span["kind"] == "SpanKind.SERVER"
    assert span["attributes"]["mikros.error.kind"] == "NotFoundError"
    assert span["resource"]["attributes"]["service.name"] == "traced"


async def test_the_none_exporter_still_makes_ids(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """exporter = none: spans are made (ids for logs and propagation) and dropped."""
    path = write_service(tmp_path, tracing={"exporter": "none"})
    with trio.fail_after(BOUND):
        running = await mikros_service.start(TracedContainer, path, environ={"API_TOKEN": SECRET})
    response = await get(running, "/ids")
    assert len(response.json()["ids"]["trace_id"]) == 32
    assert tracing_of(running).exporter is None
    with pytest.raises(RuntimeError, match='exporter = "memory"'):
        tracing_of(running).spans()


def test_the_environment_variable_overrides_the_settings() -> None:
    """OTEL_TRACES_EXPORTER (from the service's environ) wins over [features.tracing] exporter."""
    _, tracing, _ = built(service_toml(), {"OTEL_TRACES_EXPORTER": "Memory "})
    assert tracing.exporter_name == "memory"
    _, tracing, _ = built(service_toml(tracing={"exporter": "memory"}), {})
    assert tracing.exporter_name == "memory"


def test_an_unknown_exporter_in_the_environment_is_a_config_error() -> None:
    """OTEL_TRACES_EXPORTER=zipkin: ConfigError at features.tracing.exporter naming the choices."""
    with pytest.raises(ConfigError) as caught:
        built(service_toml(), {"OTEL_TRACES_EXPORTER": "zipkin"})
    (issue,) = caught.value.issues
    assert issue.path == "features.tracing.exporter"
    assert "OTEL_TRACES_EXPORTER is 'zipkin'" in issue.message
    assert "otlp, console, memory, none" in issue.message


def test_an_unknown_exporter_in_settings_is_a_config_error() -> None:
    """exporter = "jaeger" in service.toml is rejected when the file is loaded."""
    with pytest.raises(ConfigError) as caught:
        built(service_toml(tracing={"exporter": "jaeger"}))
    assert caught.value.issues[0].path == "features.tracing.exporter"


def test_otlp_without_its_package_is_a_config_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The OTLP exporter package missing: a ConfigError telling to install mikros-trio[otlp]."""
    # A None entry makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError) as caught:
        built(service_toml(tracing={"exporter": "otlp"}))
    (issue,) = caught.value.issues
    assert issue.path == "features.tracing.exporter"
    assert "mikros-trio[otlp]" in issue.message


def test_building_starts_no_thread_and_uses_no_global_provider() -> None:
    """Build makes a provider of the service's own and starts nothing (the batch thread waits)."""
    from opentelemetry import trace

    before = {thread.name for thread in threading.enumerate()}
    _, first, components = built(service_toml(tracing={"exporter": "otlp"}))
    _, second, _ = built(service_toml(tracing={"exporter": "otlp"}))
    assert {thread.name for thread in threading.enumerate()} == before
    assert [component.name for component in components] == ["tracing"]
    assert first.provider is not second.provider
    assert trace.get_tracer_provider() not in (first.provider, second.provider)
