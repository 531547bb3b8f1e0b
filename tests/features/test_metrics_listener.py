"""The metrics feature on services without an HTTP kind: their own listener.

Worker, gRPC and script services started with ``mikros_service``; the
listener is driven with httpx and curl for well-formed requests and with
raw Trio sockets for what a client should never send. gRPC calls come from
grpcio (server side) and from a service's own ``mikros_trio.grpc.client``
channel (client side), reusing the echo servicer of ``tests/helpers.py``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio
import trio.testing
from dependency_injector import providers
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    BOUND,
    UNARY,
    ClientContainer,
    EchoRequest,
    HttpContainer,
    Samples,
    curl,
    grpc_channel,
    in_thread,
    metrics_of,
    parse,
    rpc_error,
    scrape,
    scraped,
    series,
    settled,
    unary,
    value,
)
from helpers import Container as GrpcContainer
from helpers import write_metrics_service as write_service
from mikros_trio import ConfigError, Lifetime, ServiceContainer
from mikros_trio.features.metrics import MAX_CONNECTIONS, MAX_HEAD, PORT_ENV, TIMEOUT
from mikros_trio.testing import RunningService, ServiceStarter
from protos import testsvc_grpc, testsvc_pb2_grpc


class Idle:
    """A plain worker loop: runs until shutdown; ``release`` gates its drain when set."""

    def __init__(self) -> None:
        self.draining = trio.Event()
        self.release: trio.Event | None = None

    async def run(self, lifetime: Lifetime) -> None:
        await lifetime.wait_stopping()
        self.draining.set()
        if self.release is not None:
            await self.release.wait()


class IdleContainer(ServiceContainer):
    worker = providers.Singleton(Idle)


async def start_worker(
    mikros_service: ServiceStarter, tmp_path: Path, container: Any = IdleContainer, **options: Any
) -> RunningService:
    path = write_service(tmp_path, types="worker", **options)
    with trio.fail_after(BOUND):
        return await mikros_service.start(container, path)


async def raw(port: int, request: bytes, *, read: bool = True) -> bytes:
    """Send ``request`` bytes on a fresh connection and return all the server answered."""
    with trio.fail_after(BOUND):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            answer = b""
            while read:
                data = await stream.receive_some(65536)
                if not data:
                    break
                answer += data
            return answer


def status_of(answer: bytes) -> int:
    line = answer.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1.1 "), answer[:200]
    return int(line.split(b" ")[1])


# -- the listener -----------------------------------------------------------------


async def test_worker_service_serves_metrics_on_its_own_listener(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """GET /metrics on the listener: 200, the Prometheus text format, one request per connection."""
    running = await start_worker(mikros_service, tmp_path)
    port = running.ports["metrics"]
    response = await scrape(port)
    assert response.status_code == 200
    assert response.headers["connection"] == "close"
    assert int(response.headers["content-length"]) == len(response.content)
    samples = parse(response.text)
    assert value(samples, "service_info", service="svc", version="1.2.3") == 1
    assert value(samples, "process_cpu_seconds_total") is not None
    # A query string does not change the path.
    assert (await scrape(port, "/metrics?name[]=x")).status_code == 200


async def test_listener_answers_wrong_paths_methods_and_head(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """404 for other paths, 405 with Allow for other methods, HEAD gets headers and no body."""
    running = await start_worker(mikros_service, tmp_path)
    port = running.ports["metrics"]
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False
        ) as client:
            assert (await client.get("/")).status_code == 404
            assert (await client.get("/metricsx")).status_code == 404
            post = await client.post("/metrics", content=b"x" * 5000)
            assert post.status_code == 405
            assert post.headers["allow"] == "GET, HEAD"
            assert (await client.delete("/metrics")).status_code == 405
    answer = await raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status_of(answer) == 200
    head, _, body = answer.partition(b"\r\n\r\n")
    assert body == b""
    assert int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) > 0
    body, summary = await curl(f"http://127.0.0.1:{port}/metrics")
    assert summary == "1.1 200"
    assert list(text_string_to_metric_families(body))


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"G(T /metrics HTTP/1.1\r\n\r\n",
        b"GET  /metrics HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",  # a TLS ClientHello, roughly
    ],
)
async def test_listener_rejects_malformed_requests(
    mikros_service: ServiceStarter, tmp_path: Path, request_bytes: bytes
) -> None:
    """A request line that is not 'METHOD /path HTTP/1.x' gets 400, and the listener serves on."""
    running = await start_worker(mikros_service, tmp_path)
    port = running.ports["metrics"]
    assert status_of(await raw(port, request_bytes)) == 400
    assert (await scrape(port)).status_code == 200


async def test_listener_bounds_the_request_head(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A request head over MAX_HEAD bytes gets 431 without being read to its end."""
    running = await start_worker(mikros_service, tmp_path)
    port = running.ports["metrics"]
    huge = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n"
    assert status_of(await raw(port, huge)) == 431
    assert (await scrape(port)).status_code == 200


async def test_listener_times_out_a_silent_client(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A client that sends half a request head gets 408 after TIMEOUT and the connection closes."""
    running = await start_worker(mikros_service, tmp_path)
    port = running.ports["metrics"]
    started = trio.current_time()
    with trio.fail_after(2 * TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")
            answer = b""
            while data := await stream.receive_some(4096):
                answer += data
    assert status_of(answer) == 408
    assert trio.current_time() - started >= TIMEOUT * 0.9


async def test_listener_bounds_concurrent_connections(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Beyond MAX_CONNECTIONS at once, a new connection is closed unanswered; then it recovers."""
    running = await start_worker(mikros_service, tmp_path)
    port = running.ports["metrics"]
    with trio.fail_after(BOUND):
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(MAX_CONNECTIONS):
                idle = await trio.open_tcp_stream("127.0.0.1", port)
                await stack.enter_async_context(idle)
            await trio.testing.wait_all_tasks_blocked()
            # Sends nothing: bytes left unread would turn the close into a reset.
            assert await raw(port, b"") == b""
        await trio.testing.wait_all_tasks_blocked()
    assert (await scrape(port)).status_code == 200


async def test_a_client_reset_does_not_disturb_the_listener(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A client that resets its connection mid-request costs nothing: the listener serves on."""
    running = await start_worker(mikros_service, tmp_path)
    port = running.ports["metrics"]
    for _ in range(5):
        with trio.fail_after(BOUND), trio.socket.socket() as sock:
            await sock.connect(("127.0.0.1", port))
            await sock.send(b"GET /metrics HTTP/1.1\r\n\r\n")
            # Linger 0: close() sends a reset instead of a FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert (await scrape(port)).status_code == 200
    assert running.health.ready


class BrokenCollector:
    """A user collector that fails on every scrape."""

    def describe(self) -> list[Any]:
        return []  # registration must not call collect()

    def collect(self) -> Any:
        raise RuntimeError("the collector broke")


@pytest.mark.parametrize(("types", "listener"), [("worker", "metrics"), ("http", "http")])
async def test_a_broken_collector_is_a_500_and_scraping_recovers(
    mikros_service: ServiceStarter, tmp_path: Path, types: str, listener: str
) -> None:
    """A collector raising makes the scrape a 500 (listener or HTTP endpoint), not a crash."""
    container = IdleContainer if types == "worker" else HttpContainer
    path = write_service(tmp_path, types=types)
    with trio.fail_after(BOUND):
        running = await mikros_service.start(container, path)
    broken = BrokenCollector()
    registry = metrics_of(running).registry
    registry.register(broken)
    port = running.ports[listener]
    response = await scrape(port)
    assert response.status_code == 500
    assert response.text == "collecting metrics failed\n"
    registry.unregister(broken)
    assert (await scrape(port)).status_code == 200
    assert running.health.ready


async def test_stop_closes_the_listener_and_open_connections(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An idle connection does not hold shutdown: it is closed, and so is the listening socket."""
    running = await start_worker(mikros_service, tmp_path)
    port = running.ports["metrics"]
    with trio.fail_after(BOUND):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /met")  # half a request, then nothing
            assert await running.stop() == 0
            # Closed with unread bytes, a reset is a close too.
            with contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some(4096) == b""
    with trio.fail_after(BOUND), pytest.raises(OSError, match=r"failed|refused"):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_listener_still_answers_while_the_service_drains(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """The listener stops after the work-generating components: a scrape during drain works."""
    running = await start_worker(mikros_service, tmp_path)
    idle: Idle = running.container.worker()
    idle.release = trio.Event()
    running.service.stop("test")
    with trio.fail_after(BOUND):
        await idle.draining.wait()
    assert not running.health.ready
    samples = await scraped(running.ports["metrics"])
    started = series(samples, "component_start_duration_seconds")
    assert frozenset({("component", "worker")}) in started
    idle.release.set()
    with trio.fail_after(BOUND):
        assert await running.wait() == 0


async def test_lifecycle_metrics_after_start_and_after_stop(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Start durations are served once ready; shutdown and stop durations are set by the end."""
    running = await start_worker(
        mikros_service, tmp_path, tables={"lifecycle": {"readiness_delay": 1.5}}
    )
    samples = await scraped(running.ports["metrics"])
    assert value(samples, "service_start_duration_seconds") is not None
    assert set(series(samples, "component_start_duration_seconds")) >= {
        frozenset({("component", "metrics")}),
        frozenset({("component", "worker")}),
    }
    assert await running.stop() == 0
    final = parse(metrics_of(running).render().decode())
    shutdown = value(final, "service_shutdown_duration_seconds")
    assert shutdown is not None
    assert shutdown >= 1.5  # Trio's clock: the readiness delay is part of the shutdown
    assert set(series(final, "component_stop_duration_seconds")) >= {
        frozenset({("component", "metrics")}),
        frozenset({("component", "worker")}),
    }


async def test_port_environment_variable_overrides_the_file(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """MIKROS_METRICS_PORT wins over [features.metrics] port, as MIKROS_HTTP_PORT does for HTTP."""
    path = write_service(tmp_path, types="worker", metrics={"host": "127.0.0.1", "port": 1})
    environ = {**os.environ, PORT_ENV: "0"}
    with trio.fail_after(BOUND):
        running = await mikros_service.start(IdleContainer, path, environ=environ)
    assert running.ports["metrics"] not in (0, 1)
    assert (await scrape(running.ports["metrics"])).status_code == 200


# The last one is full-width digits: str.isdigit() accepts them, int() too, a port must not.
@pytest.mark.parametrize("text", ["x", "-1", "65536", "\uff18\uff10"])
async def test_bad_port_environment_variable_is_a_config_error(
    mikros_service: ServiceStarter, tmp_path: Path, text: str
) -> None:
    """A MIKROS_METRICS_PORT that is not a port is a ConfigError at features.metrics.port."""
    path = write_service(tmp_path, types="worker")
    # ephemeral_ports would replace the variable with 0: keep the bad value.
    environ = {**os.environ, PORT_ENV: text}
    with pytest.raises(ConfigError) as caught:
        await mikros_service.start(IdleContainer, path, environ=environ, ephemeral_ports=False)
    [issue] = caught.value.issues
    assert issue.path == "features.metrics.port"
    assert PORT_ENV in issue.message
    assert repr(text) in issue.message


# -- workers and scripts ----------------------------------------------------------------


class Flaky:
    """A periodic job: iterations 2 and 4 fail; from the 6th it parks until shutdown."""

    def __init__(self) -> None:
        self.calls = 0
        self.parked = trio.Event()

    async def run_once(self, lifetime: Lifetime) -> None:
        self.calls += 1
        if self.calls > 5:
            self.parked.set()
            await lifetime.wait_stopping()
        elif self.calls % 2 == 0:
            raise RuntimeError(f"iteration {self.calls} failed")


class FlakyContainer(ServiceContainer):
    worker = providers.Singleton(Flaky)


async def test_worker_iterations_and_failures_are_served(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """With [runtime.worker] interval, each iteration counts by outcome; failures apart."""
    running = await start_worker(
        mikros_service,
        tmp_path,
        container=FlakyContainer,
        tables={"runtime.worker": {"interval": 30.0}},
    )
    flaky: Flaky = running.container.worker()
    with trio.fail_after(10 * 30.0):
        await flaky.parked.wait()
    samples = await scraped(running.ports["metrics"])
    assert value(samples, "worker_iterations_total", worker="worker", status="ok") == 3
    assert value(samples, "worker_iterations_total", worker="worker", status="error") == 2
    assert value(samples, "worker_failures_total", worker="worker") == 2
    assert value(samples, "worker_iteration_duration_seconds_count", worker="worker") == 5


class Job:
    """A script: succeeds, or raises when ``fail`` is set."""

    fail = False

    async def run(self) -> int:
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise RuntimeError("the job broke")
        return 0


class Failing(Job):
    fail = True


class JobContainer(ServiceContainer):
    script = providers.Singleton(Job)


class FailingContainer(ServiceContainer):
    script = providers.Singleton(Failing)


@pytest.mark.parametrize(
    ("container", "code", "success"), [(JobContainer, 0, 1.0), (FailingContainer, 1, 0.0)]
)
async def test_script_duration_and_result(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    container: type[ServiceContainer],
    code: int,
    success: float,
) -> None:
    """A script run leaves script_duration_seconds and script_success in the service's registry."""
    path = write_service(tmp_path, types="script")
    with trio.fail_after(BOUND):
        running = await mikros_service.start(container, path)
        assert await running.wait() == code
    samples = parse(metrics_of(running).render().decode())
    duration = value(samples, "script_duration_seconds")
    assert duration is not None
    assert duration > 0
    assert value(samples, "script_success") == success


# -- gRPC ---------------------------------------------------------------------------------


async def start_grpc(
    mikros_service: ServiceStarter, tmp_path: Path, container: Any = GrpcContainer, **options: Any
) -> RunningService:
    path = write_service(tmp_path, types="grpc", **options)
    with trio.fail_after(BOUND):
        return await mikros_service.start(container, path)


def grpc_codes(samples: Samples, name: str) -> dict[tuple[str, ...], float]:
    """``name``'s samples keyed by their label values in label-name order."""
    found = series(samples, name)
    return {tuple(v for _, v in sorted(labels)): count for labels, count in found.items()}


async def test_grpc_only_service_serves_server_metrics(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A gRPC-only service has a metrics listener; OK and error codes are counted per method."""
    running = await start_grpc(mikros_service, tmp_path)
    port = running.ports["grpc"]
    for _ in range(2):
        assert (await in_thread(unary, port, EchoRequest(text="hi"))).text == "hi"
    for fail in ("not-found", "validation", "runtime"):
        await in_thread(rpc_error, lambda f=fail: unary(port, EchoRequest(fail=f)))

    def stream_twice() -> list[Any]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            return list(stub.ServerStream(EchoRequest(count=2), timeout=BOUND))

    assert len(await in_thread(stream_twice)) == 2
    error = await in_thread(rpc_error, lambda: _unknown_method(port))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    await settled(running, "grpc_server_in_flight")
    samples = await scraped(running.ports["metrics"])
    stream = "/mikros.testsvc.v1.Echo/ServerStream"
    expected = {
        ("OK", UNARY): 2.0,
        ("UNKNOWN", UNARY): 3.0,  # [features.errors] grpc_status default: every Mikros error
        ("OK", stream): 1.0,
        ("UNIMPLEMENTED", "(unknown)"): 1.0,
    }
    assert grpc_codes(samples, "grpc_server_handled_total") == expected
    assert grpc_codes(samples, "grpc_server_handling_seconds_count") == expected
    assert value(samples, "grpc_server_in_flight") == 0


def _unknown_method(port: int) -> Any:
    with grpc_channel(port) as channel:
        call = channel.unary_unary("/mikros.testsvc.v1.Echo/Nope")
        return call(b"", timeout=BOUND)


async def test_grpc_client_calls_are_counted_per_client_method_and_code(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Calls through a service's client channel count by (client, method, code) in its metrics."""
    server = await start_grpc(mikros_service, tmp_path / "server", name="server")
    caller = await start_grpc(
        mikros_service,
        tmp_path,
        container=ClientContainer,
        name="caller",
        tables={"clients.peer": {"host": "127.0.0.1", "port": server.ports["grpc"]}},
    )
    stub = testsvc_grpc.EchoStub(caller.container.peer())
    with trio.fail_after(BOUND):
        for _ in range(2):
            assert (await stub.Unary(EchoRequest(text="x"))).text == "x"
        with pytest.raises(Exception, match="raised not-found"):
            await stub.Unary(EchoRequest(fail="not-found"))
    registry = metrics_of(caller).registry
    with trio.fail_after(BOUND):
        # The client's call ends when its response stream does, just after the stub returns.
        labels = {"client": "peer", "method": UNARY, "code": "UNKNOWN"}  # a NotFoundError
        while registry.get_sample_value("grpc_client_handled_total", labels) != 1:  # noqa: ASYNC110
            await trio.sleep(0.001)
    samples = await scraped(caller.ports["metrics"])
    # Label values in label-name order: client, code, method.
    expected = {("peer", "OK", UNARY): 2.0, ("peer", "UNKNOWN", UNARY): 1.0}
    assert grpc_codes(samples, "grpc_client_handled_total") == expected
    assert grpc_codes(samples, "grpc_client_handling_seconds_count") == expected
    # The callee counted the same calls as a server, in its own registry.
    await settled(server, "grpc_server_in_flight")
    served = await scraped(server.ports["metrics"])
    assert grpc_codes(served, "grpc_server_handled_total") == {
        ("OK", UNARY): 2.0,
        ("UNKNOWN", UNARY): 1.0,
    }
    assert series(served, "grpc_client_handled_total") == {}


async def test_metrics_listener_is_absent_when_disabled(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Without the feature a gRPC service publishes no metrics listener."""
    running = await start_grpc(mikros_service, tmp_path, metrics=None)
    assert "metrics" not in running.ports
    assert set(running.ports) == {"grpc"}
    assert "metrics" not in running.health.components
