"""The telemetry seam: what every kind reports to features, and the hub's own rules.

A recording feature (registered through a registry of its own, with none
of the built-in features) sees exactly what the kinds hand to observers:
HTTP requests, gRPC calls served and made, worker iterations, script runs
and lifecycle events. The HTTP and gRPC services are the real ones the kind
tests use, called by httpx, grpcio and our own client channel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from dependency_injector import providers

from helpers import (
    BOUND,
    UNARY,
    ClientContainer,
    EchoRequest,
    Store,
    create_app,
    grpcio_server,
    in_thread,
    rpc_error,
    unary,
    write_http_toml,
)
from helpers import (
    Container as GrpcContainer,
)
from helpers import write_toml as grpc_toml
from mikros_trio import ServiceContainer
from mikros_trio._registry import FeatureSpec, Registry, default_registry
from mikros_trio._telemetry import _HEADER_FORMS, redact_current
from mikros_trio.ext import Call, Observer, Telemetry, current_call
from mikros_trio.testing import RunningService, ServiceStarter
from protos import testsvc_grpc


class Recorder(Observer):
    """Records every call and event; marks outgoing headers so tests can see them travel."""

    def __init__(self) -> None:
        self.started_calls: list[Call] = []
        self.calls: list[Call] = []
        self.phases: list[tuple[str, str]] = []

    def started(self, call: Call) -> None:
        self.started_calls.append(call)
        call.outgoing["x-recorded"] = f"{call.kind}-{call.side}"

    def finished(self, call: Call) -> None:
        self.calls.append(call)

    def event(self, event: Any) -> None:
        self.phases.append((event.component, event.phase))

    def of(self, kind: str, side: str = "server") -> list[Call]:
        return [call for call in self.calls if call.kind == kind and call.side == side]


@dataclass(frozen=True, slots=True)
class RecorderSettings:
    """No settings: the recorder only listens."""


def build_recorder(context: Any) -> list[Any]:
    """Feature factory: one Recorder per service, published on the hub."""
    recorder = Recorder()
    context.telemetry.add_observer(recorder)
    context.telemetry.publish(recorder)
    context.telemetry.add_endpoint("/recorded", lambda: (200, "text/plain", b"seen\n"))
    return []


#: The built-in kinds and only the recorder as a feature.
REGISTRY = Registry(
    kinds=default_registry().kinds,
    features={
        "recorder": FeatureSpec(
            "recorder", RecorderSettings, "test_telemetry:build_recorder", always_on=True
        )
    },
)


def recorder(running: RunningService) -> Recorder:
    return running.service.telemetry.get(Recorder)


# -- the hub ----------------------------------------------------------------


class Ordered(Observer):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def started(self, call: Call) -> None:
        self.log.append(f"start {self.name}")

    def finished(self, call: Call) -> None:
        self.log.append(f"end {self.name}")


class Broken(Observer):
    def started(self, call: Call) -> None:
        raise RuntimeError("observer bug")


def test_observers_wrap_in_registration_order() -> None:
    """started() runs in registration order, finished() in reverse; status and duration are set."""
    hub = Telemetry("svc", "1.0")
    log: list[str] = []
    hub.add_observer(Ordered("a", log))
    hub.add_observer(Ordered("b", log))
    call = hub.begin("http", "server", "/x", method="GET")
    hub.end(call, "200")
    assert log == ["start a", "start b", "end b", "end a"]
    assert call.status == "200"
    assert call.duration >= 0
    assert not call.failed


def test_a_failing_observer_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An observer that raises is logged; the call and the other observers go on."""
    hub = Telemetry()
    log: list[str] = []
    hub.add_observer(Broken())
    hub.add_observer(Ordered("after", log))
    with caplog.at_level(logging.ERROR, logger="mikros_trio"):
        call = hub.begin("grpc", "server", "/a/B")
    hub.end(call, "OK")
    assert log == ["start after", "end after"]
    assert "failed on a call's start" in caplog.text


def test_redact_masks_every_secret_longest_first() -> None:
    """Secrets are masked wherever they appear; a secret containing another is masked whole."""
    hub = Telemetry()
    assert not hub.has_secrets
    hub.add_secrets(["abc", "abcdef", ""])
    assert hub.has_secrets
    assert hub.redact("x abcdef y abc z") == "x *** y *** z"


def test_redact_current_masks_with_the_running_service_s_secrets() -> None:
    """Inside a service's context its secrets are masked; outside every service, nothing is."""
    hub = Telemetry()
    hub.add_secrets(["s3cr3t-value"])
    assert redact_current("stop: s3cr3t-value") == "stop: s3cr3t-value"
    token = hub.activate()
    try:
        assert redact_current("stop: 's3cr3t-value'") == "stop: '***'"
    finally:
        hub.deactivate(token)


async def test_closers_run_last_registered_first_and_survive_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """close() runs sync and async closers in reverse order; one failing does not stop the rest."""
    hub = Telemetry()
    ran: list[str] = []

    async def flush() -> None:
        ran.append("async")

    def broken() -> None:
        raise OSError("disk gone")

    hub.add_closer(lambda: ran.append("first"))
    hub.add_closer(broken)
    hub.add_closer(flush)
    await hub.close()
    assert ran == ["async", "first"]
    assert "disk gone" in caplog.text
    await hub.close()
    assert ran == ["async", "first"], "closers run once"


def test_get_names_the_missing_feature_object() -> None:
    """get() of an unpublished type raises LookupError naming it."""
    with pytest.raises(LookupError, match="no Recorder in this service"):
        Telemetry().get(Recorder)


def test_call_header_reads_bytes_and_text_pairs() -> None:
    """Call.header finds a lower-case header in ASGI bytes pairs and gRPC str pairs, by any case."""
    http_call = Call("http", "server", "", headers=[(b"traceparent", b"00-1")])
    grpc_call = Call("grpc", "server", "", headers=[("traceparent", "00-2"), ("k-bin", b"\x01")])
    assert http_call.header("traceparent") == "00-1"
    assert grpc_call.header("TRACEPARENT") == "00-2"
    assert grpc_call.header("k-bin") == "\x01"
    assert grpc_call.header("missing") is None


def test_call_header_name_forms_stay_bounded() -> None:
    """Looking up ever new header names keeps a bounded table of their forms, and finds each."""
    for index in range(1000):
        call = Call("grpc", "server", "", headers=[(f"x-name-{index}", "v")])
        assert call.header(f"X-Name-{index}") == "v"
    assert len(_HEADER_FORMS) <= 64


# -- HTTP ---------------------------------------------------------------------


class SeenCall:
    """The current call as the handler saw it."""

    call: Call | None = None


def http_app(store: Store) -> Any:
    app = create_app(store)

    @app.get("/records/<key>")
    async def record(key: str) -> str:
        SeenCall.call = current_call()
        return store.get(key)

    return app


class HttpContainer(ServiceContainer):
    store = providers.Singleton(Store)
    app = providers.Singleton(http_app, store)


async def start_http(
    mikros_service: ServiceStarter, tmp_path: Path, **http: Any
) -> tuple[RunningService, httpx.AsyncClient]:
    path = write_http_toml(tmp_path, http=http)
    with trio.fail_after(BOUND):
        running = await mikros_service.start(HttpContainer, path, registry=REGISTRY)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.ports['http']}")
    return running, client


async def test_http_requests_are_calls_named_by_route(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Each request is one call: route rule, method, path, status, error kind, response header."""
    running, client = await start_http(mikros_service, tmp_path)
    async with client:
        ok = await client.get("/records/greeting", headers={"traceparent": "00-abc"})
        missing = await client.get("/records/nothing")
        broken = await client.get("/boom")
        unknown = await client.get("/no/such/route")
        await client.get("/readyz")
        recorded = await client.get("/recorded")
    assert (ok.status_code, missing.status_code, broken.status_code) == (200, 404, 500)
    assert unknown.status_code == 404
    assert ok.headers["x-recorded"] == "http-server"
    assert recorded.text == "seen\n"
    calls = recorder(running).of("http")
    assert [(c.name, c.method, c.target, c.status) for c in calls] == [
        ("/records/<key>", "GET", "/records/greeting", "200"),
        ("/records/<key>", "GET", "/records/nothing", "404"),
        ("/boom", "GET", "/boom", "500"),
        ("(unmatched)", "GET", "/no/such/route", "404"),
    ], "probes and feature endpoints are not calls"
    assert calls[0].header("traceparent") == "00-abc"
    assert SeenCall.call is calls[1], "the handler sees its own call as current"
    assert calls[1].error_kind is not None
    assert calls[1].error_kind.value == "NotFoundError"
    assert not calls[1].failed
    assert calls[2].failed
    assert isinstance(calls[2].error, RuntimeError)


async def test_feature_endpoints_move_to_the_admin_port(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """With admin_port, a feature's endpoint is served there and is a 404 on the main port."""
    running, client = await start_http(mikros_service, tmp_path, admin_port=0)
    admin = running.ports["http-admin"]
    async with client, httpx.AsyncClient() as other:
        assert (await client.get("/recorded")).status_code == 404
        assert (await other.get(f"http://127.0.0.1:{admin}/recorded")).text == "seen\n"


async def test_lifecycle_events_reach_observers(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Observers see the supervisor's events, from the first start to the service's stop."""
    running, client = await start_http(mikros_service, tmp_path)
    await client.aclose()
    with trio.fail_after(BOUND):
        assert await running.stop() == 0
    phases = recorder(running).phases
    assert ("http", "started") in phases
    assert ("service", "ready") in phases
    assert phases[-1] == ("service", "stopped")


# -- gRPC -----------------------------------------------------------------------


async def test_grpc_calls_served_and_made_are_reported(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Server calls carry method and code; a client call sends what observers add as metadata."""
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    server_dir.mkdir()
    client_dir.mkdir()
    path = grpc_toml(server_dir)
    with trio.fail_after(BOUND):
        server = await mikros_service.start(GrpcContainer, path, registry=REGISTRY)
    grpc_port = server.ports["grpc"]
    await in_thread(unary, grpc_port, EchoRequest(text="direct"))
    error = await in_thread(rpc_error, lambda: unary(grpc_port, EchoRequest(fail="not-found")))
    assert error.code().name == "UNKNOWN"  # a NotFoundError, as every Mikros error travels
    with trio.fail_after(BOUND):
        caller = await mikros_service.start(
            ClientContainer,
            grpc_toml(client_dir, clients={"peer": grpc_port}),
            registry=REGISTRY,
        )
        stub = testsvc_grpc.EchoStub(caller.container.peer())
        assert (await stub.Unary(EchoRequest(text="relayed"))).text == "relayed"
    served = recorder(server).of("grpc")
    assert [(c.name, c.status) for c in served] == [
        (UNARY, "OK"),
        (UNARY, "UNKNOWN"),
        (UNARY, "OK"),
    ]
    assert served[1].error_kind is not None
    assert not served[1].failed
    assert served[2].header("x-recorded") == "grpc-client", "client metadata reached the server"
    made = recorder(caller).of("grpc", "client")
    assert [(c.name, c.target, c.status) for c in made] == [(UNARY, "peer", "OK")]


async def test_grpc_client_call_to_a_down_peer_ends_unavailable(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A client call that cannot connect is reported as a failed UNAVAILABLE call."""
    async with grpcio_server() as peer_port:
        pass  # a port that was just free and is closed again
    path = grpc_toml(tmp_path, clients={"peer": peer_port})
    with trio.fail_after(BOUND):
        running = await mikros_service.start(ClientContainer, path, registry=REGISTRY)
    channel = running.container.peer()
    channel.connect_timeout = 0.5
    with trio.fail_after(BOUND), pytest.raises(Exception, match="unavailable"):
        await testsvc_grpc.EchoStub(channel).Unary(EchoRequest())
    [call] = recorder(running).of("grpc", "client")
    assert (call.status, call.failed) == ("UNAVAILABLE", True)


# -- worker iterations and script runs ------------------------------------------

WORKER_TOML = """
name = "w"
types = ["{kind}"]
version = "v1.0.0"
[runtime.worker]
interval = 1.0
[lifecycle]
drain_timeout = 2.0
shutdown_timeout = 5.0
"""


class Flaky:
    """A periodic job whose second iteration fails; records the call it runs under."""

    def __init__(self) -> None:
        self.runs = 0
        self.calls: list[Call | None] = []

    async def run_once(self) -> None:
        self.runs += 1
        self.calls.append(current_call())
        if self.runs == 2:
            raise ValueError("bad poll")
        await trio.sleep(0.1)


class FlakyContainer(ServiceContainer):
    worker = providers.Singleton(Flaky)


async def test_periodic_worker_iterations_are_calls_and_survive_failures(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """run_once runs every interval; a failing iteration is a failed call and the next one runs."""
    path = tmp_path / "service.toml"
    path.write_text(WORKER_TOML.format(kind="worker"))
    running = await mikros_service.start(FlakyContainer, path, registry=REGISTRY)
    await trio.sleep(3.5)
    assert await running.stop() == 0
    calls = recorder(running).of("worker", "internal")
    assert [c.status for c in calls] == ["ok", "error", "ok", "ok"]
    assert isinstance(calls[1].error, ValueError)
    assert calls[1].failed
    assert {c.name for c in calls} == {"worker"}
    worker = running.container.worker()
    assert worker.calls == calls, "each iteration runs with its own call current"


SCRIPT_TOML = """
name = "s"
types = ["script"]
version = "v1.0.0"
"""


class Exits:
    def __init__(self, code: int) -> None:
        self.code = code

    async def run(self) -> int:
        return self.code


@pytest.mark.parametrize(("code", "status"), [(0, "ok"), (3, "error")])
async def test_a_script_run_is_one_call(
    mikros_service: ServiceStarter, tmp_path: Path, code: int, status: str
) -> None:
    """The script's run is one internal call, ok for exit 0 and a failed 'error' otherwise."""

    class Container(ServiceContainer):
        script = providers.Object(Exits(code))

    path = tmp_path / "service.toml"
    path.write_text(SCRIPT_TOML)
    running = await mikros_service.start(Container, path, registry=REGISTRY)
    with trio.fail_after(BOUND):
        assert await running.wait() == code
    [call] = recorder(running).of("script", "internal")
    assert (call.name, call.status, call.failed) == ("script", status, code != 0)
