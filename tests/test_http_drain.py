"""The HTTP kind's graceful drain, in-process over real sockets.

In-flight requests finish, new connections are refused once draining
begins, idle keep-alive connections do not hold the stop up, and a request
longer than drain_timeout is cut at the deadline.
"""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import ssl
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio

from helpers import (
    BOUND,
    client_for,
    curl,
    get,
    phase_time,
    tls_files,
    url,
    wait_until,
)
from helpers import http_port as port
from helpers import start_http as start
from mikros_trio.ext import Call, Observer
from mikros_trio.testing import RunningService, ServiceStarter


async def test_in_flight_request_finishes_and_new_connections_are_refused(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A request in flight when stop begins gets its 200; a new connection is refused."""
    running = await start(mikros_service, tmp_path)
    app = running.container.app()
    slow: list[httpx.Response] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            slow.append(await get(running, "/slow?seconds=0.5"))

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await app.entered.wait()
        running.service.stop("test")
        await wait_until(running, lambda: running.health.components["http"].value == "draining")
        await trio.sleep(0.05)  # the drain task runs right after the state change
        with pytest.raises(httpx.ConnectError):
            await get(running, "/hello")
        assert not slow, "the in-flight request is still running"
    assert slow[0].status_code == 200
    assert slow[0].json()["slept"] == 0.5
    assert slow[0].headers["connection"] == "close"
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    assert running.phases("http") == ["starting", "started", "stopping", "stopped"]
    assert app.finished == 1


async def test_idle_keep_alive_connections_do_not_delay_stop(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Ten idle keep-alive connections are closed at once: stop takes far less than the timeouts."""
    running = await start(
        mikros_service,
        tmp_path,
        http={"keep_alive_timeout": 5.0},
        lifecycle={"drain_timeout": 5.0},
    )
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)
    async with client_for(running, limits=limits) as client:
        ports: list[int] = []

        async def call() -> None:
            response = await client.get("/slow?seconds=0.3")
            ports.append(response.json()["client_port"])

        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(call)
        assert len(set(ports)) == 10, "ten distinct connections, now idle in the pool"
        running.service.stop("test")
        with trio.fail_after(BOUND):
            assert await running.wait() == 0
        took = phase_time(running, "service", "stopped") - phase_time(
            running, "service", "shutdown"
        )
        assert took < 1.0, f"stop took {took:.3f} s with idle connections open"
        assert "cut" not in running.phases("http")
        # The pooled connections were closed by the server: nothing answers any more.
        with trio.fail_after(BOUND), pytest.raises(httpx.TransportError):
            await client.get("/hello")


async def test_handler_longer_than_drain_timeout_is_cut(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A handler outliving drain_timeout is cancelled at the deadline; its client gets 503 JSON."""
    running = await start(mikros_service, tmp_path, lifecycle={"drain_timeout": 0.5})
    app = running.container.app()
    answers: list[httpx.Response] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            answers.append(await get(running, "/slow?seconds=30"))

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await app.entered.wait()
        running.service.stop("test")
        with trio.fail_after(BOUND):
            code = await running.wait()
    assert code == 0
    cut = [str(e) for e in running.events if e.component == "http" and e.phase == "cut"]
    assert len(cut) == 1
    assert cut[0].endswith("http: cut (drain timeout 0.5 s)")
    stopping = phase_time(running, "http", "stopping")
    assert phase_time(running, "http", "cut") == pytest.approx(stopping + 0.5, abs=0.2)
    [answer] = answers
    assert (answer.status_code, answer.headers["connection"]) == (503, "close")
    assert answer.json()["kind"] == "InternalError"
    assert app.finished == 0


async def read_response(stream: trio.SocketStream) -> bytes:
    """Read one Content-Length framed HTTP/1.1 response from ``stream``, bounded."""
    received = b""
    with trio.fail_after(BOUND):
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


async def eof_within(stream: trio.SocketStream, seconds: float) -> bool:
    """True if the server closes ``stream`` (end-of-file) within ``seconds``."""
    with trio.move_on_after(seconds):
        while await stream.receive_some(65536):
            pass
        return True
    return False


async def test_connection_closes_after_its_in_flight_response(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A keep-alive client that never closes gets its response, then EOF: no deadline wait."""
    running = await start(mikros_service, tmp_path, lifecycle={"drain_timeout": 3.0})
    app = running.container.app()
    async with await trio.open_tcp_stream("127.0.0.1", port(running)) as stream:
        await stream.send_all(b"GET /slow?seconds=0.3 HTTP/1.1\r\nHost: t\r\n\r\n")
        with trio.fail_after(BOUND):
            await app.entered.wait()
        running.service.stop("test")
        raw = await read_response(stream)
        assert raw.startswith(b"HTTP/1.1 200")
        assert b"connection: close" in raw.lower()
        assert await eof_within(stream, 0.5), "the server kept the connection open"
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    assert "cut" not in running.phases("http")
    took = phase_time(running, "service", "stopped") - phase_time(running, "service", "shutdown")
    assert took < 1.0


@pytest.mark.parametrize(
    "first", ["/slow?seconds=0.3", "/chunks?count=3&delay=0.1"], ids=["plain", "streamed"]
)
async def test_pipelined_request_behind_a_draining_response_does_not_hold_stop(
    mikros_service: ServiceStarter, tmp_path: Path, first: str
) -> None:
    """A request pipelined behind one in flight at stop: first answered, then EOF, prompt stop."""
    running = await start(mikros_service, tmp_path, lifecycle={"drain_timeout": 3.0})
    app = running.container.app()
    async with await trio.open_tcp_stream("127.0.0.1", port(running)) as stream:
        request = f"GET {first} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        await stream.send_all(request + b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        with trio.fail_after(BOUND):
            await app.entered.wait()
        running.service.stop("test")
        received = b""
        with trio.fail_after(BOUND):
            while chunk := await stream.receive_some(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        assert b"hello" not in received, "the pipelined request is not served during the drain"
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    assert "cut" not in running.phases("http")
    took = phase_time(running, "service", "stopped") - phase_time(running, "service", "shutdown")
    assert took < 1.0


async def test_idle_raw_connections_are_closed_on_stop(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Connections idle at stop (fresh, or after a response) get EOF at once and none is leaked."""
    running = await start(mikros_service, tmp_path, http={"keep_alive_timeout": 5.0})
    fresh = await trio.open_tcp_stream("127.0.0.1", port(running))
    used = await trio.open_tcp_stream("127.0.0.1", port(running))
    async with fresh, used:
        await used.send_all(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await read_response(used)).startswith(b"HTTP/1.1 200")
        running.service.stop("test")
        assert await eof_within(fresh, 0.5)
        assert await eof_within(used, 0.5)
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_client_not_reading_cannot_hold_shutdown(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A client that stops reading an endless response is cut at the drain deadline."""
    running = await start(
        mikros_service, tmp_path, lifecycle={"drain_timeout": 0.5, "shutdown_timeout": 2.0}
    )
    async with await trio.open_tcp_stream("127.0.0.1", port(running)) as stream:
        await stream.send_all(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        with trio.fail_after(BOUND):
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
        await trio.sleep(0.2)  # the server's sends now block on full buffers
        running.service.stop("test")
        with trio.fail_after(BOUND):
            assert await running.wait() == 0
    stopping = phase_time(running, "http", "stopping")
    assert phase_time(running, "http", "cut") == pytest.approx(stopping + 0.5, abs=0.2)
    assert phase_time(running, "service", "stopped") < stopping + 1.0


async def test_http2_in_flight_stream_finishes_and_the_connection_ends(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Over HTTP/2 (curl) an in-flight stream finishes 200, then the connection ends at once."""
    running = await start(mikros_service, tmp_path)
    app = running.container.app()
    done: list[tuple[str, str]] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            done.append(await curl("--http2-prior-knowledge", url(running, "/slow?seconds=0.3")))

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await app.entered.wait()
        running.service.stop("test")
        with trio.fail_after(BOUND):
            assert await running.wait() == 0
    body, summary = done[0]
    assert (json.loads(body)["slept"], summary) == (0.3, "2 200")
    assert "cut" not in running.phases("http")
    took = phase_time(running, "service", "stopped") - phase_time(running, "service", "shutdown")
    assert took < 1.0


async def h2_request_across_stop(running: RunningService) -> list[Any]:
    """One HTTP/2 request in flight when stop begins, from a client that never closes first.

    Returns every h2 event the client saw until the server closed the
    connection (end-of-file), bounded.
    """
    app = running.container.app()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    headers = [(":method", "GET"), (":path", "/slow?seconds=0.3")]
    client.send_headers(1, [*headers, (":scheme", "http"), (":authority", "t")], end_stream=True)
    seen: list[Any] = []
    async with await trio.open_tcp_stream("127.0.0.1", port(running)) as stream:
        await stream.send_all(client.data_to_send())
        with trio.fail_after(BOUND):
            await app.entered.wait()
        running.service.stop("test")
        with trio.fail_after(BOUND):
            while data := await stream.receive_some(65536):
                seen.extend(client.receive_data(data))
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    return seen


async def test_http2_connection_is_closed_by_the_server_after_its_last_stream(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An HTTP/2 client keeping its connection gets its response, GOAWAY, then EOF: prompt stop."""
    running = await start(mikros_service, tmp_path, lifecycle={"drain_timeout": 3.0})
    seen = await h2_request_across_stop(running)
    [response] = [e for e in seen if isinstance(e, h2.events.ResponseReceived)]
    assert (b":status", b"200") in response.headers
    body = b"".join(e.data for e in seen if isinstance(e, h2.events.DataReceived))
    assert json.loads(body)["slept"] == 0.3
    [goaway] = [e for e in seen if isinstance(e, h2.events.ConnectionTerminated)]
    assert (goaway.error_code, goaway.last_stream_id) == (0, 1)
    assert "cut" not in running.phases("http")
    took = phase_time(running, "service", "stopped") - phase_time(running, "service", "shutdown")
    assert took < 1.0


async def test_http2_in_flight_stream_gets_its_end_of_stream(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An HTTP/2 stream in flight at stop is ended (END_STREAM) before the server's GOAWAY."""
    running = await start(mikros_service, tmp_path, lifecycle={"drain_timeout": 3.0})
    seen = await h2_request_across_stop(running)
    kinds = [type(event) for event in seen]
    assert h2.events.StreamEnded in kinds
    assert kinds.index(h2.events.StreamEnded) < kinds.index(h2.events.ConnectionTerminated)


async def test_idle_tls_connections_close_at_once(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Idle TLS keep-alive connections (HTTP/1.1 and HTTP/2) do not delay stop and leak nothing."""
    ca, cert, key = tls_files(tmp_path)
    running = await start(
        mikros_service,
        tmp_path,
        http={"certfile": cert, "keyfile": key, "keep_alive_timeout": 5.0},
        lifecycle={"drain_timeout": 5.0},
    )
    verify = ssl.create_default_context(cafile=str(ca))
    base = url(running, "", scheme="https")
    async with (
        httpx.AsyncClient(base_url=base, verify=verify, trust_env=False) as h1,
        httpx.AsyncClient(base_url=base, verify=verify, http2=True, trust_env=False) as h2,
    ):
        with trio.fail_after(BOUND):
            assert (await h1.get("/hello")).http_version == "HTTP/1.1"
            assert (await h2.get("/hello")).http_version == "HTTP/2"
        running.service.stop("test")
        with trio.fail_after(BOUND):
            assert await running.wait() == 0
    took = phase_time(running, "service", "stopped") - phase_time(running, "service", "shutdown")
    assert took < 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


class Statuses(Observer):
    """Records the status each finished call reports (what the access log writes)."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def finished(self, call: Call) -> None:
        self.seen[call.target] = call.status


async def test_requests_cut_at_the_deadline_are_recorded_as_the_client_saw_them(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Cut before its response: the client gets 503 and 503 is recorded; cut mid-response: 'cut'."""
    running = await start(
        mikros_service, tmp_path, lifecycle={"drain_timeout": 0.5, "shutdown_timeout": 3.0}
    )
    statuses = Statuses()
    running.service.telemetry.add_observer(statuses)
    app = running.container.app()
    waiting = await trio.open_tcp_stream("127.0.0.1", port(running))
    streaming = await trio.open_tcp_stream("127.0.0.1", port(running))
    async with waiting, streaming:
        await streaming.send_all(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        with trio.fail_after(BOUND):
            assert (await streaming.receive_some(65536)).startswith(b"HTTP/1.1 200")
        await waiting.send_all(b"GET /slow?seconds=30 HTTP/1.1\r\nHost: t\r\n\r\n")
        with trio.fail_after(BOUND):
            await app.entered.wait()
        running.service.stop("test")
        raw = await read_response(waiting)
        with trio.fail_after(BOUND):
            assert await running.wait() == 0
    assert raw.startswith(b"HTTP/1.1 503"), raw
    assert b"connection: close" in raw.lower()
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["kind"] == "InternalError", raw
    assert statuses.seen == {"/slow": "503", "/stream": "cut"}


async def test_requests_racing_the_drain_are_served_or_untouched(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Requests on idle keep-alive connections as stop begins: 200, or closed before any byte."""
    running = await start(mikros_service, tmp_path, http={"keep_alive_timeout": 5.0})
    request = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"
    address = ("127.0.0.1", port(running))
    clients = [socket.socket() for _ in range(60)]
    for client in clients:
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            client.connect(address)
    await trio.sleep(0.05)  # the connections are accepted
    for client in clients:
        client.setblocking(True)
    go = threading.Event()

    def fire() -> None:
        # From another thread, spread over a few milliseconds: some of
        # these bytes wake their reader in the very step the drain runs.
        go.wait(BOUND)
        for client in clients:
            with contextlib.suppress(OSError):
                client.sendall(request)
            time.sleep(0.0001)

    def answers() -> list[bytes]:
        seen = []
        for client in clients:
            client.settimeout(BOUND)
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := client.recv(65536):
                    received += chunk
            seen.append(received)
            client.close()
        return seen

    def first_exchange() -> list[bytes]:
        for client in clients:
            client.settimeout(BOUND)
            client.sendall(request)
        heads = []
        for client in clients:
            received = b""
            while not received.endswith(b"hello"):
                received += client.recv(65536)
            heads.append(received.partition(b"\r\n")[0])
        return heads

    try:
        # Blocking sockets, used from threads only: the server runs in this one.
        assert set(await trio.to_thread.run_sync(first_exchange)) == {b"HTTP/1.1 200 OK"}
        firing = threading.Thread(target=fire)
        firing.start()
        go.set()
        await trio.sleep(0.001)
        running.service.stop("test")
        with trio.fail_after(BOUND):
            assert await running.wait() == 0
        received = await trio.to_thread.run_sync(answers)
        firing.join(BOUND)
    finally:
        for client in clients:
            client.close()
    firsts = {raw.partition(b"\r\n")[0] for raw in received}
    assert firsts <= {b"HTTP/1.1 200 OK", b""}, firsts
