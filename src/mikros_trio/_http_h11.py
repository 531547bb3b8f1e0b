"""The HTTP kind's HTTP/1.1 connection: one task per connection, the app called in it.

hypercorn's Trio path spawns tasks and passes every request through memory
channels, which makes scheduling, not parsing, the cost of a request. Here a
plain-text connection is served by one task: it parses with h11, calls the
ASGI app inline, and ``receive``/``send`` read and write the socket
directly. Nothing is spawned per request, a response's head and body go out
in one write when the app sends them together, and each wait for the
client has its own deadline:

* a request head must arrive within ``keep_alive_timeout`` of the
  connection's start or its previous response, and no wait for its bytes
  may exceed ``read_timeout``;
* a request body's bytes may pause ``read_timeout`` at most (the whole
  body's deadline is the app's ``body_timeout``);
* a response write may wait ``send_timeout`` per slice for a peer that
  reads nothing.

What this path does not serve it hands to hypercorn's protocol layer with
the bytes read so far: HTTP/2 with prior knowledge, and a request asking for
a protocol upgrade (h2c, WebSocket). TLS connections never come here.
"""

from __future__ import annotations

import logging
import math
import select
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

import h11
import trio

from ._http_apps import wire_for_status

__all__ = ["H11Connection", "error_response"]

log = logging.getLogger("mikros_trio.http")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

#: The largest request line + headers accepted; larger gets 431.
MAX_HEAD = 64 * 1024

#: Bytes written under one send deadline: a long response may take longer in
#: all, as long as the client keeps reading.
SEND_SLICE = 64 * 1024

_RECV = 64 * 1024
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_DISCONNECT = {"type": "http.disconnect"}
_NO_BODY_STATUS = frozenset({204, 304})
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
#: How long a closing connection reads and drops what its client still sends,
#: so the kernel does not answer those bytes with a reset that destroys the
#: response before the client reads it; and how much it reads at most.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 256 * 1024


class Endpoint(Protocol):
    """What a connection needs of the listener it came from."""

    draining: bool
    read_timeout: float
    keep_alive_timeout: float
    send_timeout: float
    state: dict[str, Any]


class _Date:
    """The ``Date`` header value, formatted once per second."""

    second = 0
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = formatdate(second, usegmt=True).encode()
        return cls.value


def error_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response with a Mikros JSON body and ``Connection: close``."""
    import json

    body = json.dumps(wire_for_status(status, message), separators=(",", ":")).encode()
    reason = _REASONS.get(status, b"")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\ndate: %s\r\n\r\n%s" % (status, reason, len(body), _Date.now(), body)
    )


class H11Connection:
    """One plain-text HTTP/1.1 connection, served until it closes or hands off.

    :meth:`run` returns the bytes to hand to hypercorn when the client
    speaks HTTP/2 or asks for an upgrade, ``None`` when the connection is
    done. The endpoint reads :attr:`idle` and calls :meth:`close_idle` and
    :meth:`abort` while draining, as it does for hypercorn's connections.
    """

    __slots__ = (
        "_app",
        "_body_done",
        "_client",
        "_complete",
        "_endpoint",
        "_extra",
        "_gone",
        "_h11",
        "_head",
        "_head_sent",
        "_method",
        "_server",
        "_started",
        "_wait",
        "idle",
        "scope",
        "stream",
    )

    def __init__(self, endpoint: Endpoint, stream: trio.SocketStream, app: ASGIApp) -> None:
        self._endpoint = endpoint
        self.stream = stream
        self._app = app
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.idle = True  # no request in progress
        self.scope = trio.CancelScope()
        # The wait for a request head while one is parked (see close_idle).
        self._wait: trio.CancelScope | None = None
        self._client: tuple[str, int] | None = None
        self._server: tuple[str, int] | None = None
        self._reset_request()

    def _reset_request(self) -> None:
        self._method = b"GET"
        self._head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self._started = False  # http.response.start received
        self._head_sent = False  # the response's head written
        self._complete = False  # the whole response written
        self._body_done = False  # the whole request body given to the app
        self._gone = False  # the client left, or the connection broke: sends are dropped
        self._extra = 0  # bytes read past the request while waiting for a disconnect

    # -- the connection's life -----------------------------------------------------

    async def run(self) -> bytes | None:
        sock = self.stream.socket
        try:
            self._client = _address(sock.getpeername())
            self._server = _address(sock.getsockname())
        except OSError:
            return None  # the client left before we looked
        conn = self._h11
        endpoint = self._endpoint
        deadline = trio.current_time() + endpoint.keep_alive_timeout
        first = await self._first_bytes(deadline)
        if first is None:
            return None
        if first.startswith(b"PRI"):
            return first  # HTTP/2 with prior knowledge
        conn.receive_data(first)
        while True:
            request = await self._next_request(deadline)
            if request is None:
                return None
            if _asks_upgrade(request):
                return _replay(request, conn.trailing_data[0])
            self.idle = False
            await self._serve(request)
            if not self._reusable():
                await self._close()
                return None
            conn.start_next_cycle()
            self._reset_request()
            self.idle = True
            if endpoint.draining:
                # A request pipelined behind one answered while draining is
                # not served: the client retries it elsewhere.
                await self._close()
                return None
            deadline = trio.current_time() + endpoint.keep_alive_timeout

    async def _first_bytes(self, deadline: float) -> bytes | None:
        """The connection's first bytes: enough of them to tell HTTP/2's preface apart."""
        endpoint = self._endpoint
        data = b""
        while len(data) < 3 and _PREFACE.startswith(data):
            chunk = await self._receive(min(deadline, trio.current_time() + endpoint.read_timeout))
            if not chunk:
                return None
            data += chunk
        return data

    async def _next_request(self, deadline: float) -> h11.Request | None:
        """The next request's head, or None once the connection is to end."""
        conn = self._h11
        endpoint = self._endpoint
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as error:
                await self._reject(error.error_status_hint, str(error))
                return None
            if event is h11.NEED_DATA:
                if endpoint.draining and not self._bytes_waiting():
                    return None
                limit = min(deadline, trio.current_time() + endpoint.read_timeout)
                data = await self._receive(limit)
                if data is None:
                    return None
                conn.receive_data(data)
                continue
            if type(event) is h11.Request:
                return event
            return None  # the client closed (h11.ConnectionClosed)

    def _reusable(self) -> bool:
        """True if the connection may carry another request."""
        conn = self._h11
        if self._gone or not self._complete or conn.our_state is not h11.DONE:
            return False
        while conn.their_state is h11.SEND_BODY:
            # The app answered without reading the whole body: skip what
            # has already arrived; waiting for more is not worth a request.
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return False
            if event is h11.NEED_DATA or type(event) is h11.ConnectionClosed:
                return False
        return conn.their_state is h11.DONE

    async def _serve(self, request: h11.Request) -> None:
        """Run the app for one request and make sure the client gets an answer."""
        target = request.target
        path, _, query = target.partition(b"?")
        raw_path = path.decode("ascii")
        method = request.method
        self._method = method
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "1.1" if request.http_version == b"1.1" else "1.0",
            "method": method.decode("ascii"),
            "scheme": "http",
            "path": unquote(raw_path) if "%" in raw_path else raw_path,
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": [(name, value) for _, name, value in request.headers._full_items],
            "client": self._client,
            "server": self._server,
            "state": self._endpoint.state.copy(),
            "extensions": {},
        }
        try:
            await self._app(scope, self.receive, self.send)
        except Exception:
            log.exception("unhandled error in the ASGI app")
            await self._fail()
            return
        if not self._complete and not self._gone:
            # The app returned without a whole response: the client must
            # not wait for one (hypercorn sent an empty 500).
            await self._fail()

    async def _fail(self) -> None:
        """End a request the app could not answer: 500 if nothing was sent, else cut."""
        if not self._head_sent and not self._gone:
            body = error_response(500, "the app ended without a response")
            await self._write(body)
        self._gone = True

    # -- ASGI receive ----------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        if self._body_done or self._gone:
            return await self._wait_disconnect()
        conn = self._h11
        parts: list[bytes] = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as error:
                # A malformed body (a bad chunk): answer if we still can,
                # and the app sees its client gone.
                await self._reject(error.error_status_hint, str(error))
                return _DISCONNECT
            kind = type(event)
            if kind is h11.Data:
                parts.append(event.data)  # type: ignore[union-attr]
                continue
            if kind is h11.EndOfMessage:
                self._body_done = True
                body = parts[0] if len(parts) == 1 else b"".join(parts)
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            if event is h11.NEED_DATA:
                if parts:
                    body = b"".join(parts)
                    return {"type": "http.request", "body": body, "more_body": True}
                if conn.they_are_waiting_for_100_continue:
                    informational = h11.InformationalResponse(status_code=100, headers=[])
                    await self._write(conn.send(informational))
                endpoint = self._endpoint
                data = await self._receive(trio.current_time() + endpoint.read_timeout)
                if not data:
                    # Timed out, or end of file mid-body: the client is gone.
                    self._gone = True
                    return _DISCONNECT
                conn.receive_data(data)
                continue
            self._gone = True  # ConnectionClosed
            return _DISCONNECT

    async def _wait_disconnect(self) -> dict[str, Any]:
        """Block until the client goes: ASGI's ``http.disconnect`` after the whole body."""
        conn = self._h11
        while not self._gone:
            if self._extra > MAX_HEAD:
                # A client pipelining more than a request head while this
                # one is served: stop reading it (not buffering without bound).
                await trio.sleep_forever()
            data = await self._receive(math.inf)
            if not data:
                self._gone = True
                break
            self._extra += len(data)
            conn.receive_data(data)
        return _DISCONNECT

    # -- ASGI send ---------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self._started:
                raise RuntimeError("http.response.start sent twice")
            self._started = True
            self._head = (message["status"], list(message.get("headers", ())))
            return
        if kind != "http.response.body":
            return  # extensions this path does not offer
        if not self._started or self._complete:
            raise RuntimeError("http.response.body without a response to add it to")
        more = message.get("more_body", False)
        if not more:
            self._complete = True
        if self._gone:
            return
        conn = self._h11
        body = message.get("body", b"")
        out = b""
        if not self._head_sent:
            out = self._response_head(body, more)
            self._head_sent = True
        if body and conn.our_state is h11.SEND_BODY and not self._bodiless():
            out += conn.send(h11.Data(data=body))
        if not more:
            out += conn.send(h11.EndOfMessage())
        if out:
            await self._write(out)

    def _bodiless(self) -> bool:
        assert self._head is not None
        return self._method == b"HEAD" or self._head[0] in _NO_BODY_STATUS

    def _response_head(self, body: bytes, more: bool) -> bytes:
        assert self._head is not None
        status, headers = self._head
        if not more and not self._bodiless():
            for name, _ in headers:
                if name.lower() in (b"content-length", b"transfer-encoding"):
                    break
            else:
                # A whole body in one message: say its length rather than
                # letting h11 chunk it.
                headers.append((b"content-length", b"%d" % len(body)))
        if self._endpoint.draining:
            headers.append((b"connection", b"close"))
        headers.append((b"date", _Date.now()))
        try:
            return self._h11.send(
                h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))
            )
        except h11.LocalProtocolError as error:
            raise RuntimeError(f"the app's response is not valid HTTP/1.1: {error}") from None

    # -- the socket --------------------------------------------------------------------

    async def _receive(self, deadline: float) -> bytes | None:
        """Bytes from the client, b"" at end of file, None on a timeout or a broken socket."""
        with trio.CancelScope(deadline=deadline) as wait:
            self._wait = wait
            try:
                return await self.stream.receive_some(_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            finally:
                self._wait = None
        return None

    async def _write(self, data: bytes) -> None:
        """Write to the client, each slice bounded by ``send_timeout``; a failure ends it."""
        timeout = self._endpoint.send_timeout
        done = False
        try:
            view = memoryview(data)
            for start in range(0, len(view), SEND_SLICE):
                with trio.move_on_after(timeout) as sending:
                    await self.stream.send_all(view[start : start + SEND_SLICE])
                if sending.cancelled_caught:
                    log.info("closing a connection whose peer read nothing for %g s", timeout)
                    self.abort()
                    break
            else:
                done = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            # A write cut short (the peer, a deadline, a cancellation) leaves
            # the client a partial response: nothing more may follow it.
            if not done:
                self._gone = True

    async def _reject(self, status: int, message: str) -> None:
        """Answer a request h11 refuses, then close (nothing after it is parsed)."""
        if not self._head_sent and not self._gone:
            self._head_sent = True
            await self._write(error_response(status, message))
        self._gone = True
        await self._close(linger=True)

    async def _close(self, *, linger: bool = False) -> None:
        """Close after the response, reading what the client still sends (bounded) first.

        Bytes left unread in the socket when it closes make the kernel send
        a reset, which can destroy the response in the client's buffer.
        """
        stream = self.stream
        try:
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        if not linger and self._h11.their_state is h11.DONE and not self._bytes_waiting():
            return
        read = 0
        with trio.move_on_after(_LINGER_SECONDS):
            while read < _LINGER_BYTES:
                try:
                    data = await stream.receive_some(_RECV)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                read += len(data)

    def _bytes_waiting(self) -> bool:
        """True if the socket holds bytes the reader has not yet read."""
        poll = select.poll()
        try:
            poll.register(self.stream.socket.fileno(), select.POLLIN)
        except ValueError:
            return False  # closed
        return bool(poll.poll(0))

    # -- the endpoint's controls -------------------------------------------------------

    def close_idle(self) -> None:
        """End this idle connection, unless bytes of a request have just arrived.

        Bytes already in the socket are read and their request is served
        (with ``Connection: close``); the connection then ends, since the
        endpoint is draining.
        """
        if self._wait is not None and not self._bytes_waiting():
            self._wait.cancel()

    def abort(self) -> None:
        """Close the socket now, waking any send blocked on it."""
        self._gone = True
        self.stream.socket.close()


def _address(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return (str(address[0]), int(address[1]))
    return None


def _asks_upgrade(request: h11.Request) -> bool:
    """True for a request asking to switch protocols (h2c, WebSocket)."""
    return any(name == b"upgrade" for _, name, _ in request.headers._full_items)


def _replay(request: h11.Request, rest: bytes) -> bytes:
    """The bytes of ``request``'s head again, with what followed it, for hypercorn to parse."""
    lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
    lines.extend(name + b": " + value for name, value in request.headers.raw_items())
    return b"\r\n".join(lines) + b"\r\n\r\n" + rest
