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

import contextlib
import logging
import math
import re
import select
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

import h11
import trio

from ._http_apps import json_bytes, wire_for_status

__all__ = ["SEND_SLICE", "Deadlines", "H11Connection", "error_response", "socket_has_bytes"]

log = logging.getLogger("mikros_trio.http")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

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
    #: The largest request line + headers accepted (``max_header_bytes``); larger gets 431.
    max_head: int
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
    body = json_bytes(wire_for_status(status, message))
    reason = _REASONS.get(status, b"")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\ndate: %s\r\n\r\n%s" % (status, reason, len(body), _Date.now(), body)
    )


class Deadlines:
    """The timeouts of an endpoint's connections, enforced by one task.

    A connection waiting on its client (for a request head or a body's next
    bytes; to take a response's next slice) sets its read or write deadline,
    a plain number (two, since the app may read and write at once from two
    tasks); this task ends each wait past its deadline. No timer or cancel scope is made per wait:
    on the request path that bookkeeping cost more than the deadlines
    themselves. Deadlines are met within :data:`TICK` seconds.
    """

    def __init__(self) -> None:
        self.connections: set[H11Connection] = set()
        self._arrived = trio.Event()

    def add(self, connection: H11Connection) -> None:
        self.connections.add(connection)
        self._arrived.set()

    async def run(self) -> None:
        while True:
            if not self.connections:
                self._arrived = trio.Event()
                await self._arrived.wait()
            await trio.sleep(TICK)
            now = trio.current_time()
            for connection in self.connections:
                if connection.read_deadline <= now:
                    connection.expire_read()
                if connection.write_deadline <= now:
                    connection.expire_write()


#: How often :class:`Deadlines` looks: the precision of every HTTP/1.1 timeout.
TICK = 0.1


class H11Connection:
    """One plain-text HTTP/1.1 connection, served until it closes or hands off.

    :meth:`run` returns the bytes to hand to hypercorn when the client
    speaks HTTP/2 or asks for an upgrade, ``None`` when the connection is
    done. The endpoint reads :attr:`idle` and calls :meth:`close_idle` and
    :meth:`abort` while draining, as it does for hypercorn's connections.

    h11 parses requests (strictly); responses are written here, since h11's
    validation of a response costs more than the rest of the path. A fresh
    h11 state machine per request is cheaper than h11 sending the response.
    """

    __slots__ = (
        "_app",
        "_body_done",
        "_client",
        "_close",
        "_complete",
        "_continue",
        "_deaf",
        "_endpoint",
        "_extra",
        "_framing",
        "_gone",
        "_h11",
        "_head",
        "_head_sent",
        "_http10",
        "_method",
        "_parked",
        "_pipelined",
        "_remaining",
        "_server",
        "_started",
        "idle",
        "read_deadline",
        "stream",
        "write_deadline",
    )

    def __init__(self, endpoint: Endpoint, stream: trio.SocketStream, app: ASGIApp) -> None:
        self._endpoint = endpoint
        self.stream = stream
        self._app = app
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=endpoint.max_head)
        self.idle = True  # no request in progress
        self.read_deadline = math.inf  # see Deadlines
        self.write_deadline = math.inf
        self._parked = False  # waiting for a request head (see close_idle)
        self._deaf = False  # reading was shut down (see _stop_reading)
        self._client: tuple[str, int] | None = None
        self._server: tuple[str, int] | None = None
        self._reset_request()

    def _reset_request(self) -> None:
        self._method = b"GET"
        self._http10 = False
        self._close = False  # the connection ends after this response
        self._continue = False  # the client waits for 100 Continue
        self._head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self._started = False  # http.response.start received
        self._head_sent = False  # the response's head written
        self._framing = _LENGTH
        self._remaining = 0  # body bytes the response still owes (framing _LENGTH)
        self._complete = False  # the whole response given by the app
        # Whether the next request came before this response was whole.
        self._pipelined: bool | None = None
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
        endpoint = self._endpoint
        deadline = trio.current_time() + endpoint.keep_alive_timeout
        first = await self._first_bytes(deadline)
        if first is None:
            return None
        if first.startswith(b"PRI"):
            return first  # HTTP/2 with prior knowledge
        self._h11.receive_data(first)
        while True:
            request = await self._next_request(deadline)
            if request is None:
                return None
            self.idle = False
            if not await self._serve(request):
                # A protocol upgrade (h2c, WebSocket): hypercorn's to serve.
                return _replay(request, self._h11.trailing_data[0])
            if not self._reusable():
                await self._finish()
                return None
            if endpoint.draining and self._pipelined:
                # A request pipelined behind one in flight when the drain
                # began is not served: the client retries it elsewhere. One
                # sent after that response (which promised keep-alive) is.
                await self._finish()
                return None
            self._next_cycle()
            self.idle = True
            deadline = trio.current_time() + endpoint.keep_alive_timeout

    def _next_cycle(self) -> None:
        """A fresh parser for the next request, fed what the client already sent."""
        data, closed = self._h11.trailing_data
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self._endpoint.max_head)
        if data:
            self._h11.receive_data(data)
        if closed:
            self._h11.receive_data(b"")
        self._reset_request()

    async def _first_bytes(self, deadline: float) -> bytes | None:
        """The connection's first bytes: enough of them to tell HTTP/2's preface apart."""
        endpoint = self._endpoint
        data = b""
        self._parked = True
        try:
            while len(data) < 3 and _PREFACE.startswith(data):
                limit = min(deadline, trio.current_time() + endpoint.read_timeout)
                chunk = await self._receive(limit)
                if not chunk:
                    return None
                data += chunk
        finally:
            self._parked = False
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
                self._parked = True
                try:
                    data = await self._receive(limit)
                finally:
                    self._parked = False
                if data is None:
                    return None
                conn.receive_data(data)
                continue
            if type(event) is h11.Request:
                if self._deaf and not self._body_in_hand(event):
                    # Its head was read in the instant the drain stopped
                    # reading: a body still to come would read as end of
                    # file. Not served, as a request pipelined behind the
                    # drain is not: the client sees the close and retries.
                    return None
                return event
            return None  # the client closed (h11.ConnectionClosed)

    def _body_in_hand(self, request: h11.Request) -> bool:
        """Whether ``request``'s whole body has already been read (or it has none)."""
        for name, value in request.headers:
            if name == b"transfer-encoding":
                return False  # chunked: its end is not known before it is parsed
            if name == b"content-length":
                return len(self._h11.trailing_data[0]) >= int(value)
        return True

    def _reusable(self) -> bool:
        """True if the connection may carry another request."""
        if self._gone or self._close or not self._complete:
            return False
        conn = self._h11
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

    async def _serve(self, request: h11.Request) -> bool:
        """Run the app for one request and make sure the client gets an answer.

        False, before anything runs, for a request asking to switch protocols.
        """
        path, _, query = request.target.partition(b"?")
        raw_path = path.decode("ascii")
        method = request.method
        self._method = method
        headers = []
        # h11's own (raw, lower-case, value) triples: iterating its Headers
        # costs three times as much. The extras pin h11's series for this.
        for _, name, value in request.headers._full_items:
            headers.append((name, value))
            if name == b"connection":
                self._close = b"close" in value.lower()
            elif name == b"expect":
                self._continue = value.lower() == b"100-continue"
            elif name == b"upgrade":
                return False
        if request.http_version == b"1.1":
            version = "1.1"
        else:
            # HTTP/1.0: no chunked responses and no keep-alive to rely on.
            version = "1.0"
            self._http10 = True
            self._close = True
            self._continue = False
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "method": method.decode("ascii"),
            "scheme": "http",
            "path": unquote(raw_path) if "%" in raw_path else raw_path,
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
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
            return True
        if not self._complete and not self._gone:
            # The app returned without a whole response: the client must
            # not wait for one.
            await self._fail()
        return True

    async def _fail(self) -> None:
        """End a request the app could not answer: 500 if nothing was sent, else cut."""
        if not self._head_sent and not self._gone:
            self._head_sent = True
            await self._write(error_response(500, "the app ended without a response"))
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
                if self._continue and not self._head_sent:
                    self._continue = False
                    await self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
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
            if self._extra > self._endpoint.max_head or self._deaf:
                # Stop reading: past a request head pipelined while this
                # one is served (not buffering without bound); or once
                # reading was stopped, where end of file is ours, not the
                # client's, and the response is still wanted.
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
            self._head = (message["status"], message.get("headers", ()))
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
        body = message.get("body", b"")
        if self._head_sent:
            out = self._framed(body, more)
        else:
            out = self._response_head(body, more)
            self._head_sent = True
            out += self._framed(body, more)
        if out:
            if self._pipelined is None and (
                not more or (self._framing is _LENGTH and self._remaining == 0)
            ):
                # The write that completes the response for the client:
                # bytes already read past the request were sent before it,
                # pipelined (see run).
                self._pipelined = bool(self._h11.trailing_data[0])
            await self._write(out)

    def _response_head(self, body: bytes, more: bool) -> bytes:
        """The response's status line and headers, checked as h11 would, and its framing."""
        assert self._head is not None
        status, headers = self._head
        lines = [_status_line(status)]
        length = None
        has_date = False
        for name, value in headers:
            lower = _NAMES.get(name) or _check_name(name)
            if _BAD_VALUE.search(value) is not None:
                raise RuntimeError(f"invalid value for response header {name!r}: {value!r}")
            if lower == b"content-length":
                if length is not None or not value.isdigit() or len(value) > 19:
                    raise RuntimeError(f"invalid response Content-Length {value!r}")
                length = int(value)
            elif lower == b"transfer-encoding":
                continue  # the framing is ours to choose
            elif lower == b"connection":
                self._close = self._close or b"close" in value.lower()
                continue  # said again below if the connection ends
            elif lower == b"date":
                has_date = True
            lines.append(b"%s: %s\r\n" % (name, value))
        if self._method == b"HEAD" or status in _NO_BODY_STATUS or status < 200:
            self._framing = _NONE
        elif length is not None:
            self._framing, self._remaining = _LENGTH, length
        elif not more:
            self._framing, self._remaining = _LENGTH, len(body)
            lines.append(b"content-length: %d\r\n" % len(body))
        elif self._http10:
            self._framing = _UNTIL_CLOSE
        else:
            self._framing = _CHUNKED
            lines.append(b"transfer-encoding: chunked\r\n")
        if self._endpoint.draining or self._framing is _UNTIL_CLOSE:
            self._close = True
        if self._close:
            lines.append(b"connection: close\r\n")
        if not has_date:
            lines.append(b"date: %s\r\n" % _Date.now())
        lines.append(b"\r\n")
        return b"".join(lines)

    def _framed(self, body: bytes, more: bool) -> bytes:
        """``body`` as the response's framing puts it on the wire."""
        framing = self._framing
        if framing is _LENGTH:
            self._remaining -= len(body)
            if self._remaining < 0 or (not more and self._remaining > 0):
                # More or less body than the app's Content-Length: the
                # response is broken, so the connection must not be reused.
                self._close = True
                if self._remaining < 0:
                    raise RuntimeError("the app sent more body than its Content-Length")
            return body
        if framing is _CHUNKED:
            chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            return chunk if more else chunk + b"0\r\n\r\n"
        if framing is _UNTIL_CLOSE:
            return body
        return b""

    # -- the socket --------------------------------------------------------------------

    async def _receive(self, deadline: float) -> bytes | None:
        """Bytes from the client, b"" at end of file, None on a timeout or a broken socket."""
        self.read_deadline = deadline
        try:
            data = await self.stream.receive_some(_RECV)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        finally:
            self.read_deadline = math.inf
        # After _stop_reading, end of file is ours (a timeout, the drain),
        # not the client's: no answer is owed to a request cut short.
        return None if not data and self._deaf else data

    async def _write(self, data: bytes) -> None:
        """Write to the client, each slice bounded by ``send_timeout``; a failure ends it."""
        timeout = self._endpoint.send_timeout
        done = False
        try:
            if len(data) <= SEND_SLICE:
                self.write_deadline = trio.current_time() + timeout
                await self.stream.send_all(data)
            else:
                view = memoryview(data)
                for start in range(0, len(view), SEND_SLICE):
                    self.write_deadline = trio.current_time() + timeout
                    await self.stream.send_all(view[start : start + SEND_SLICE])
            done = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.write_deadline = math.inf
            # A write cut short (the peer, a deadline, a cancellation) leaves
            # the client a partial response: nothing more may follow it.
            if not done:
                self._gone = True

    def expire_read(self) -> None:
        """The read deadline passed (see :class:`Deadlines`): end the wait."""
        self._stop_reading()

    def expire_write(self) -> None:
        """The write deadline passed: the peer reads nothing; drop the connection."""
        timeout = self._endpoint.send_timeout
        log.info("closing a connection whose peer read nothing for %g s", timeout)
        self.abort()

    def _stop_reading(self) -> None:
        """Make the reader's wait end as at end of file, keeping the socket writable.

        Closing the socket instead would lose a request whose bytes the
        reader has just taken: trio yields once more after a successful
        read, and in that instant the reader still looks parked.
        """
        self.read_deadline = math.inf
        self._deaf = True
        with contextlib.suppress(OSError):
            self.stream.socket.shutdown(socket.SHUT_RD)

    async def _reject(self, status: int, message: str) -> None:
        """Answer a request h11 refuses, then close (nothing after it is parsed)."""
        if not self._head_sent and not self._gone:
            self._head_sent = True
            await self._write(error_response(status, message))
        self._gone = True
        await self._finish(linger=True)

    async def _finish(self, *, linger: bool = False) -> None:
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
        self.read_deadline = trio.current_time() + _LINGER_SECONDS
        try:
            while read < _LINGER_BYTES:
                data = await stream.receive_some(_RECV)
                if not data:
                    break
                read += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.read_deadline = math.inf

    def _bytes_waiting(self) -> bool:
        return socket_has_bytes(self.stream.socket)

    # -- the endpoint's controls -------------------------------------------------------

    def close_idle(self) -> None:
        """End this idle connection, unless bytes of a request have just arrived.

        Bytes already in the socket are read and their request is served
        (with ``Connection: close``); the connection then ends, since the
        endpoint is draining.
        """
        if self._parked and not self._bytes_waiting():
            self._stop_reading()

    def abort(self) -> None:
        """Close the socket now, waking any wait on it."""
        self._gone = True
        self.stream.socket.close()


#: How a response's body goes on the wire.
_LENGTH, _CHUNKED, _UNTIL_CLOSE, _NONE = "length", "chunked", "until-close", "none"

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|^[ \t]|[ \t]$")
#: Response header names already checked, by their lower-case form (bounded).
_NAMES: dict[bytes, bytes] = {}
_STATUS_LINES: dict[int, bytes] = {}


def _check_name(name: bytes) -> bytes:
    if _TOKEN.fullmatch(name) is None:
        raise RuntimeError(f"invalid response header name {name!r}")
    lower = name.lower()
    if len(_NAMES) < 1024:
        _NAMES[name] = lower
    return lower


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise RuntimeError(f"invalid response status {status!r}")
        line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))
        if len(_STATUS_LINES) < 1024:
            _STATUS_LINES[status] = line
    return line


def socket_has_bytes(sock: trio.socket.SocketType) -> bool:
    """True if ``sock`` holds bytes no reader has taken yet (False once it is closed)."""
    poll = select.poll()
    try:
        poll.register(sock.fileno(), select.POLLIN)
    except ValueError:
        return False  # closed: fileno() is -1
    return bool(poll.poll(0))


def _address(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return (str(address[0]), int(address[1]))
    return None


def _replay(request: h11.Request, rest: bytes) -> bytes:
    """The bytes of ``request``'s head again, with what followed it, for hypercorn to parse."""
    lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
    lines.extend(name + b": " + value for name, value in request.headers.raw_items())
    return b"\r\n".join(lines) + b"\r\n\r\n" + rest
