"""The HTTP kind's HTTP/1.1 path: framing, hand-overs, app failures and hostile input.

Raw sockets, since the bytes on the wire are the point; the QuartTrio test
app for what a service does, and plain ASGI callables for what a broken
app does.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing
import wsproto
import wsproto.events
from dependency_injector import providers

from helpers import BOUND, http_port, parse_responses, raw_exchange
from helpers import start_http as start
from mikros_trio import ServiceContainer
from mikros_trio.testing import RunningService, ServiceStarter

GET_HELLO = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"


async def exchange(running: RunningService, data: bytes) -> bytes:
    raw, _ = await raw_exchange(
        http_port(running), data + b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    return raw


async def test_expect_100_continue_gets_100_before_the_body(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A client that waits for 100 Continue gets it once the app reads, then its answer."""
    running = await start(mikros_service, tmp_path)
    async with await trio.open_tcp_stream("127.0.0.1", http_port(running)) as stream:
        await stream.send_all(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        with trio.fail_after(BOUND):
            interim = await stream.receive_some(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(b"12345")
        received = b""
        with trio.fail_after(BOUND):
            while not received.endswith(b"}\n"):
                received += await stream.receive_some(65536)
    [response] = parse_responses(received, [b"POST"])
    assert (response.status, json.loads(response.body)) == (200, {"length": 5})


async def test_head_gets_headers_only_and_the_connection_stays_usable(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """HEAD: the GET's headers and no body; the next request on the connection is parsed right."""
    running = await start(mikros_service, tmp_path)
    raw = await exchange(running, b"HEAD /hello HTTP/1.1\r\nHost: t\r\n\r\n" + GET_HELLO)
    head, get, last = parse_responses(raw, [b"HEAD", b"GET", b"GET"])
    assert (head.status, head.body, head.headers[b"content-length"]) == (200, b"", b"5")
    assert (get.status, get.body) == (200, b"hello")
    assert last.status == 404


async def test_chunked_request_body_is_read_whole(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A chunked upload, in several chunks and several writes, reaches the app whole."""
    running = await start(mikros_service, tmp_path)
    chunks = b"".join(b"%x\r\n%s\r\n" % (n, b"x" * n) for n in (1, 10, 100, 1000)) + b"0\r\n\r\n"
    request = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    raw = await exchange(running, request)
    first, _ = parse_responses(raw, [b"POST"])
    assert (first.status, json.loads(first.body)) == (200, {"length": 1111})


async def test_streamed_response_is_chunked_on_http11_and_close_delimited_on_http10(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A body of unknown length: chunked for HTTP/1.1 (the connection lives), EOF for 1.0."""
    running = await start(mikros_service, tmp_path)
    path = b"/chunks?count=3&delay=0"
    raw = await exchange(running, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
    streamed, after = parse_responses(raw)
    assert streamed.headers[b"transfer-encoding"] == b"chunked"
    assert (streamed.body, after.status) == (b"chunk 0,chunk 1,chunk 2,", 404)
    raw, _ = await raw_exchange(http_port(running), b"GET %s HTTP/1.0\r\n\r\n" % path)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"chunk 0,chunk 1,chunk 2,"


async def test_http10_request_is_answered_and_closed(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """HTTP/1.0 without keep-alive: one answer with its length, then the server closes."""
    running = await start(mikros_service, tmp_path)
    raw, _ = await raw_exchange(http_port(running), b"GET /hello HTTP/1.0\r\n\r\n" + GET_HELLO)
    [response] = parse_responses(raw)
    assert (response.status, response.body) == (200, b"hello")
    assert response.headers[b"connection"] == b"close"


async def test_many_pipelined_requests_are_answered_in_order(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """200 requests in one write behind a slow one: 201 answers, in order, on one connection."""
    running = await start(mikros_service, tmp_path)
    requests = b"GET /slow?seconds=0.2 HTTP/1.1\r\nHost: t\r\n\r\n"
    requests += b"".join(b"GET /items/k%d HTTP/1.1\r\nHost: t\r\n\r\n" % n for n in range(200))
    raw = await exchange(running, requests)
    found = parse_responses(raw)
    assert len(found) == 202
    assert found[0].status == 200
    messages = [json.loads(r.body)["message"] for r in found[1:201]]
    assert messages == [f"no item 'k{n}'" for n in range(200)]


async def test_h2c_upgrade_after_a_keep_alive_request(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An h2c upgrade on the second request of a connection switches it to HTTP/2."""
    running = await start(mikros_service, tmp_path)
    async with await trio.open_tcp_stream("127.0.0.1", http_port(running)) as stream:
        await stream.send_all(GET_HELLO)
        received = b""
        with trio.fail_after(BOUND):
            while not received.endswith(b"hello"):
                received += await stream.receive_some(65536)
        await stream.send_all(
            b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        with trio.fail_after(BOUND):
            switched = await stream.receive_some(65536)
    assert switched.startswith(b"HTTP/1.1 101 ")
    assert b"upgrade: h2c" in switched.lower()


async def test_websocket_is_served_through_the_hand_over(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A WebSocket upgrade (after a plain request) reaches the Quart app's websocket route."""
    running = await start(mikros_service, tmp_path)
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    async with await trio.open_tcp_stream("127.0.0.1", http_port(running)) as stream:
        await stream.send_all(GET_HELLO)
        with trio.fail_after(BOUND):
            await stream.receive_some(65536)
        await stream.send_all(client.send(wsproto.events.Request(host="t", target="/ws")))
        events: list[Any] = []
        with trio.fail_after(BOUND):
            while not any(isinstance(e, wsproto.events.AcceptConnection) for e in events):
                client.receive_data(await stream.receive_some(65536))
                events.extend(client.events())
            await stream.send_all(client.send(wsproto.events.TextMessage(data="ping")))
            while not any(isinstance(e, wsproto.events.TextMessage) for e in events):
                client.receive_data(await stream.receive_some(65536))
                events.extend(client.events())
    [message] = [e for e in events if isinstance(e, wsproto.events.TextMessage)]
    assert message.data == "ping"


# -- what the path does with a broken app -------------------------------------------


def raw_app_container(app: Callable[..., Any]) -> type[ServiceContainer]:
    class RawContainer(ServiceContainer):
        pass

    RawContainer.app = providers.Object(app)  # type: ignore[attr-defined]
    return RawContainer


async def start_raw(
    mikros_service: ServiceStarter, tmp_path: Path, app: Callable[..., Any]
) -> RunningService:
    return await start(mikros_service, tmp_path, container=raw_app_container(app))


async def no_lifespan(scope: dict[str, Any], receive: Any, send: Any) -> bool:
    """Answer a lifespan scope (True), so the apps below only handle requests."""
    if scope["type"] != "lifespan":
        return False
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})
    return True


async def get_closing(running: RunningService, path: bytes) -> bytes:
    """``GET path`` with ``Connection: close`` on a fresh connection: all the server sent."""
    request = b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path
    raw, _ = await raw_exchange(http_port(running), request)
    return raw


async def answer(send: Any, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """A raw app's 200 answer: ``headers`` as given, then ``body`` whole."""
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def test_app_failures_get_a_500_json_answer(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An app that raises, or returns without answering: 500 Mikros JSON; the service serves on."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await no_lifespan(scope, receive, send):
            return
        if scope["path"] == "/raise":
            raise RuntimeError("broken app")

    running = await start_raw(mikros_service, tmp_path, app)
    for path in (b"/raise", b"/silent"):
        [response] = parse_responses(await get_closing(running, path))
        assert response.status == 500
        assert response.headers[b"content-type"] == b"application/json"
        assert json.loads(response.body)["kind"] == "InternalError"
    assert running.health.ready


async def test_a_header_carrying_a_line_break_is_never_written(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Response splitting: a header value with CR LF fails the request (500), nothing injected."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await no_lifespan(scope, receive, send):
            return
        name, value = {
            "/value": (b"x-user", b"a\r\nSet-Cookie: stolen=1"),
            "/name": (b"x-user\r\nSet-Cookie", b"stolen=1"),
            "/length": (b"content-length", b"5, 6"),
        }[scope["path"]]
        await answer(send, [(name, value)], b"hello")

    running = await start_raw(mikros_service, tmp_path, app)
    for path in (b"/value", b"/name", b"/length"):
        raw = await get_closing(running, path)
        assert b"stolen" not in raw
        [response] = parse_responses(raw)
        assert response.status == 500


async def test_a_body_shorter_than_its_content_length_ends_the_connection(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An app that declares 10 bytes and sends 5: the client sees the connection end, no reuse."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await no_lifespan(scope, receive, send):
            return
        await answer(send, [(b"content-length", b"10")], b"hello")

    running = await start_raw(mikros_service, tmp_path, app)
    raw, _ = await raw_exchange(http_port(running), GET_HELLO + GET_HELLO)
    assert raw.endswith(b"\r\n\r\nhello")
    assert raw.count(b"HTTP/1.1") == 1


async def test_lifespan_state_reaches_every_request(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """What the app's lifespan startup puts in its state, each request sees (a shallow copy)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            scope["state"]["pool"] = "ready"
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = scope["state"].get("pool", "missing").encode()
        scope["state"]["pool"] = "changed by a request"
        await answer(send, [(b"content-length", b"%d" % len(body))], body)

    running = await start_raw(mikros_service, tmp_path, app)
    raw, _ = await raw_exchange(
        http_port(running),
        GET_HELLO + GET_HELLO.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
    )
    assert [r.body for r in parse_responses(raw)] == [b"ready", b"ready"]


# -- the drain stopping reads while a request head is in hand ---------------------------


@dataclass
class _Draining:
    """What a connection reads from its endpoint (the Endpoint protocol): draining."""

    draining: bool = True
    read_timeout: float = 5.0
    keep_alive_timeout: float = 5.0
    send_timeout: float = 5.0
    max_head: int = 64 * 1024
    state: dict[str, Any] = field(default_factory=dict)


async def _deaf_connection(
    head: bytes, body_before: bytes, body_after: bytes
) -> tuple[list[Any], bytes]:
    """Send ``head`` (+ ``body_before``), stop reading as the drain does, then ``body_after``.

    The drain stops reading a connection waiting for a request; a head
    that arrives in that instant is in the reader's hands when reading has
    already stopped. Returns what the app received and what the client got.
    """
    from mikros_trio._http_h11 import H11Connection

    received: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        received.append(await receive())
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"stored"})

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as client:
        stream = await listeners[0].accept()
        connection = H11Connection(_Draining(), stream, app)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            await trio.testing.wait_all_tasks_blocked()  # parked, waiting for a request
            client.sendall(head + body_before)  # no checkpoint in between: the race
            connection._stop_reading()
            await trio.testing.wait_all_tasks_blocked()
            with contextlib.suppress(OSError):
                client.sendall(body_after)
            with trio.fail_after(BOUND):
                while True:
                    await trio.testing.wait_all_tasks_blocked()
                    if nursery.child_tasks == set():
                        break
                    await trio.sleep(0.01)
        await stream.aclose()  # what the endpoint does once the connection returns
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := client.recv(65536):
                answer += chunk
    await listeners[0].aclose()
    return received, answer


POST_HEAD = b"POST /orders HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n"


async def test_a_head_read_as_reading_stopped_whose_body_cannot_arrive_is_not_served() -> None:
    """Its body would read as end of file: the app must not run; the client sees a close."""
    received, answer = await _deaf_connection(POST_HEAD, b"", b"12345")
    assert received == []
    assert answer == b""


async def test_a_head_read_as_reading_stopped_with_its_body_in_hand_is_served() -> None:
    """The whole request arrived before reading stopped: served, with Connection: close."""
    received, answer = await _deaf_connection(POST_HEAD, b"12345", b"")
    assert received == [{"type": "http.request", "body": b"12345", "more_body": False}]
    [response] = parse_responses(answer, [b"POST"])
    assert (response.status, response.body) == (201, b"stored")
    assert response.headers.get(b"connection") == b"close"
