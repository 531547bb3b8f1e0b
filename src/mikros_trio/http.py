"""The HTTP kind (``types = ["http"]``): a QuartTrio app on hypercorn's protocol stack.

The container provides the app (``[runtime.http] app``, default ``app``);
this module serves it as a supervisor component. It reuses hypercorn's
protocol layer (``TCPServer``: HTTP/1.1, h2c upgrade, HTTP/2 over TLS) but
owns the listener and the set of connections, because hypercorn's own
``serve`` waits its whole ``graceful_timeout`` when a keep-alive connection
sits idle (3 s measured). Owning them gives the shutdown the design asks for:

1. readiness turns 503 (the supervisor's health, read by the probes);
2. after the readiness delay the component is asked to stop: the listener
   closes (new connections are refused), idle connections close at once,
   busy ones finish their request and close (hypercorn answers it with
   ``Connection: close``);
3. at the drain deadline the supervisor cancels whatever is left.

Probes (``/livez``, ``/readyz``, ``/healthz``) and request-size limits sit in
a thin ASGI layer in front of the app, so they cost one dict lookup per
request and never reach Quart routing. With ``admin_port`` set, probes move
to a second listener that starts before the main one and stops after it.

Errors: a :class:`~mikros_trio.ServiceError` raised by a handler becomes its
HTTP status with the Mikros JSON body; any other exception becomes 500 with
an ``InternalError`` body and its traceback logged; unknown routes and other
HTTP errors get JSON bodies too. The service keeps serving.

Requires the ``http`` extra (``pip install mikros-trio[http]``); nothing
here is imported unless a service's types include ``http``.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import select
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr

from ._component import Component, Lifetime, Role
from ._container import BuildContext
from ._health import Health
from ._http_apps import (
    HTTP_STATUS,
    adapt_app,
    install_error_handlers,
    is_cancellation,
    wire_for_status,
)
from ._http_h2 import Protocols
from ._http_lifespan import AppLifespan, app_lifespan
from ._listen import open_tcp_listeners
from ._runtime_settings import HttpSettings
from ._telemetry import UNMATCHED, Endpoint, Telemetry

__all__ = ["HTTP_STATUS", "AdminServer", "HttpServer", "build_http", "install_error_handlers"]

log = logging.getLogger("mikros_trio.http")

# Probe paths (Kubernetes conventions).
LIVEZ, READYZ, HEALTHZ = "/livez", "/readyz", "/healthz"

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
_JSON = [(b"content-type", b"application/json")]


async def _send_json(send: Any, status: int, body: Any, *, close: bool = False) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = [*_JSON, (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class _Front:
    """ASGI layer before the app: probes, features' endpoints, the body-size limit, and calls.

    ``app`` is ``None`` on an admin listener, which serves only probes and
    endpoints. Every request that reaches the app is reported to the
    service's telemetry as a :class:`~mikros_trio.Call` (current for the
    request's task, so handlers' log lines carry its ids).
    """

    __slots__ = ("_app", "_endpoints", "_health", "_max_body", "_probes", "_telemetry")

    def __init__(
        self,
        app: ASGIApp | None,
        health: Health,
        telemetry: Telemetry,
        *,
        probes: bool,
        max_body: int,
    ) -> None:
        self._app = app
        self._health = health
        self._telemetry = telemetry
        self._probes = probes
        self._max_body = max_body
        # Features' paths (/metrics) live where the probes do.
        self._endpoints = telemetry.endpoints if probes else {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if self._probes:
                path = scope["path"]
                if path == READYZ:
                    ready = self._health.ready
                    body = {"status": "ready" if ready else self._health.phase.value}
                    return await _send_json(send, 200 if ready else 503, body)
                if path == LIVEZ:
                    live = self._health.live
                    return await _send_json(send, 200 if live else 503, {"status": "live"})
                if path == HEALTHZ:
                    return await _send_json(send, 200, self._health.snapshot())
                endpoint = self._endpoints.get(path)
                if endpoint is not None:
                    return await _send_endpoint(send, endpoint)
            if self._app is None:
                return await _send_json(send, 404, wire_for_status(404, "no such probe"))
            length, chunked = _framing(scope["headers"])
            if chunked and length >= 0:
                # Both framings (RFC 9112 section 6.1): h11 reads the body as
                # chunked, a proxy in front may have read Content-Length; the
                # bytes between are a smuggled request. Answer and close.
                body = wire_for_status(400, "Content-Length with Transfer-Encoding")
                return await _send_json(send, 400, body, close=True)
            if length > self._max_body:
                # Answer before the app reads anything; close, since the body
                # the client is still sending would otherwise be parsed as
                # the next request.
                body = wire_for_status(413, f"request body over {self._max_body} bytes")
                return await _send_json(send, 413, body, close=True)
            if self._telemetry.observers:
                return await self._observed(scope, receive, send)
        elif self._app is None:
            return None  # lifespan on the admin listener: nothing to start
        assert self._app is not None
        try:
            await self._app(scope, receive, send)
        except BaseException as error:
            if scope["type"] == "http" and is_cancellation(error):
                await _answer_cut(send)
            raise
        return None

    async def _observed(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run the app for one request, reported to the telemetry as a call."""
        assert self._app is not None
        telemetry = self._telemetry
        call = telemetry.begin(
            "http",
            "server",
            "",
            method=scope["method"],
            target=scope["path"],
            headers=scope["headers"],
        )
        extra = [(name.encode(), value.encode()) for name, value in call.outgoing.items()]
        # What the client got: the status sent, or CUT when the response was
        # cut short (the drain deadline) and no whole answer went out.
        status = 500  # the app died before answering: hypercorn sends an empty 500
        complete = False

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                if extra:
                    message["headers"] = [*message["headers"], *extra]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        token = telemetry.enter(call)
        outcome = ""
        try:
            await self._app(scope, receive, observed_send)
        except Exception as error:
            call.error = error
            raise
        except BaseException as error:
            if is_cancellation(error) and not complete:
                outcome = "503" if await _answer_cut(send) else CUT
            raise
        finally:
            telemetry.leave(token)
            if not call.name:
                call.name = UNMATCHED
            outcome = outcome or str(status)
            telemetry.end(call, outcome, failed=outcome == CUT or status >= 500)


#: The status the access log, metrics and traces record for a request whose
#: response was cut at the drain deadline after it had started: the client
#: got a partial response, or none.
CUT = "cut"


async def _answer_cut(send: Any) -> bool:
    """Answer a request cut at the drain deadline with 503 + close; False if it cannot be.

    Runs shielded, briefly: the connection is being torn down. It cannot
    once the response has started (the server refuses a second start) or
    the client is gone.
    """
    body = wire_for_status(503, "the server is shutting down: request cut at the drain deadline")
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _CUT_GRACE) as scope:
        try:
            # No ``Connection: close`` of our own: draining, hypercorn adds it
            # on HTTP/1.1, and HTTP/2 forbids the header.
            await _send_json(send, 503, body)
        except Exception:
            return False
    return not scope.cancelled_caught


async def _send_endpoint(send: Any, endpoint: Endpoint) -> None:
    status, content_type, body = endpoint()
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    """A request's declared body length (-1 if none) and whether it says Transfer-Encoding."""
    length, chunked = -1, False
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = 0
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


class _Connection(TCPServer):
    """hypercorn's connection handler, told when it is idle so shutdown can close it.

    hypercorn runs connection steps (sending bytes, closing the socket,
    re-arming the keep-alive timer) in the app's task, which QuartTrio
    cancels as soon as its response is out: unshielded, those steps were
    lost, so the keep-alive timer never re-armed after a response and a
    connection the protocol closed stayed open. They are shielded here,
    each send bounded by ``send_timeout`` (a peer that stops reading is
    disconnected), and :meth:`abort` (at the drain deadline) ends such a
    wait. Reading is owned here too: see :meth:`_read_data`.
    """

    def __init__(self, endpoint: _Endpoint, stream: trio.abc.Stream) -> None:
        super().__init__(endpoint.app, endpoint.config, endpoint.context, endpoint.state, stream)
        self._endpoint = endpoint
        self._send_timeout = endpoint.send_timeout
        self.idle = True  # no request yet
        self.scope = trio.CancelScope()
        self._reading = trio.CancelScope()
        # The reader's current wait for bytes, while there is one (see close_idle).
        self._wait: trio.CancelScope | None = None
        self._read_loop = False  # True once the TLS handshake and protocol setup are done
        # One keep-alive timer for the connection's whole life, re-armed by
        # moving its deadline: hypercorn starts a new timer task after every
        # response, which cost ~15% of throughput (bench/http_overhead.py).
        self._keep_alive = trio.CancelScope(
            deadline=trio.current_time() + self.config.keep_alive_timeout
        )

    async def run(self) -> None:
        # As hypercorn's, with the protocols of _http_h2 (HTTP/2 bounded).
        try:
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await self.stream.do_handshake()  # type: ignore[attr-defined]
            except (trio.BrokenResourceError, trio.TooSlowError):
                return  # handshake failed
            alpn_protocol = self.stream.selected_alpn_protocol()  # type: ignore[attr-defined]
            socket = self.stream.transport_stream.socket  # type: ignore[attr-defined]
            ssl = True
        except AttributeError:  # not TLS
            alpn_protocol = "http/1.1"
            socket = self.stream.socket  # type: ignore[attr-defined]
            ssl = False
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = Protocols(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state.copy()),
                    ssl,
                    client,
                    server,
                    self.protocol_send,
                    alpn_protocol=alpn_protocol,
                    send_timeout=self._send_timeout,
                )
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    async def _idle_timeout(self) -> None:
        with self._keep_alive:
            await trio.sleep_forever()
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, Updated):
            self.idle = event.idle
            if event.idle and self._endpoint.draining:
                self.close_idle()
            self._keep_alive.deadline = (
                trio.current_time() + self.config.keep_alive_timeout if event.idle else math.inf
            )
        elif isinstance(event, Closed):
            h11_connection = self._h11()
            if h11_connection is not None and h11_connection.our_state is h11.SEND_BODY:
                # h11 met bytes it refuses (a request smuggled behind one we
                # answer with Connection: close) while that answer is going
                # out: hypercorn would close mid-response and the client
                # got nothing. The socket closes once the response is done.
                return
            with trio.CancelScope(shield=True):
                await self._close()
            # The reader may be parked inside the protocol on a pipelined
            # request (h11 pauses until this response is done): with the
            # socket closed, nothing would ever wake it.
            self._reading.cancel()
            await self.protocol.handle(Closed())
        elif isinstance(event, RawData):
            if not event.data:
                # h11 emits empty chunks (a body's end under Content-Length):
                # half of all sends; nothing to write, so skip the lock and
                # the shielded scope.
                return
            # hypercorn shields the send but not the wait for the send lock:
            # what followed a cancelled wait (HTTP/2's GOAWAY, then Updated)
            # was lost and the connection lived on to the drain deadline.
            # The shield has a deadline, re-armed for each slice written: a
            # peer that reads nothing for send_timeout is disconnected
            # instead of holding the task; a slow one that reads is not.
            data = memoryview(event.data)
            try:
                with trio.CancelScope(shield=True) as sending:
                    async with self.send_lock:
                        for start in range(0, len(data), _SEND_SLICE):
                            sending.deadline = trio.current_time() + self._send_timeout
                            await self.stream.send_all(data[start : start + _SEND_SLICE])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
                return
            if sending.cancelled_caught:
                log.info(
                    "closing a connection whose peer read nothing for %g s", self._send_timeout
                )
                self.abort()
                await self.protocol.handle(Closed())
        else:
            await super().protocol_send(event)

    def close_idle(self) -> None:
        """End this idle connection without losing a request whose bytes were just read.

        Only a wait still parked is cancelled: bytes a wait already
        received are handled (their request is served, with
        ``Connection: close``) and the reader then ends the connection,
        since it is draining. Cancelling the whole connection here, as
        before, also cancelled a request parsed in that instant: its
        client got an empty 500.
        """
        if not self._read_loop:
            self.scope.cancel()  # TLS handshake or setup: no request can be in flight
        elif self._wait is not None and not self._bytes_waiting():
            self._wait.cancel()
        # Otherwise bytes sent before the drain began are in the socket:
        # the reader wakes for them, serves their request, then ends.

    def _bytes_waiting(self) -> bool:
        """True if the socket holds bytes the reader has not yet been woken for."""
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if not isinstance(stream, trio.SocketStream):
            return False
        poll = select.poll()
        poll.register(stream.socket.fileno(), select.POLLIN)
        return bool(poll.poll(0))

    def _client_owes_bytes(self) -> bool:
        """True while waiting for a request's headers or, on HTTP/1.1, the rest of its body."""
        if self.idle:
            return True
        connection = self._h11()
        return connection is not None and connection.their_state is h11.SEND_BODY

    def _h11(self) -> h11.Connection | None:
        """The h11 state machine, on an HTTP/1.1 connection."""
        inner = getattr(self.protocol, "protocol", None)  # hypercorn's H11Protocol or H2Protocol
        connection = getattr(inner, "connection", None)
        return connection if isinstance(connection, h11.Connection) else None

    async def _read_data(self) -> None:
        """Feed the protocol until end-of-file, close, read timeout or an idle drain.

        ``read_timeout`` bounds each wait for bytes the client owes (see
        :meth:`_client_owes_bytes`). hypercorn bounded every read, so a
        handler slower than ``read_timeout`` lost its response; and after a
        timeout it kept the connection open until the keep-alive timer ran
        out. Idle keep-alive connections are closed by that timer, which
        also bounds a request head that trickles in (the timer re-arms only
        once a whole request head has arrived).
        """
        read_timeout = self.config.read_timeout or math.inf
        endpoint = self._endpoint
        self._read_loop = True
        with self._reading:
            while not (self.idle and endpoint.draining):
                limit = read_timeout if self._client_owes_bytes() else math.inf
                with trio.move_on_after(limit) as waiting:
                    self._wait = waiting
                    try:
                        data = await self.stream.receive_some(MAX_RECV)
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        break
                    finally:
                        self._wait = None
                if waiting.cancelled_caught:
                    break
                await self.protocol.handle(RawData(bytes(data)))
                if not data:
                    break
        await self.idle_task.stop()  # nothing left to time: end the connection now
        await self.protocol.handle(Closed())

    def abort(self) -> None:
        """Close the socket now, waking any send blocked on it (hypercorn shields sends)."""
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()


#: Bytes written under one send_timeout deadline: a response of many
#: slices may take longer in all, as long as the client keeps reading.
_SEND_SLICE = 64 * 1024

#: Seconds requests cut at the drain deadline get to send their 503 before sockets close.
_CUT_GRACE = 0.1


class _Endpoint:
    """One listening address served by hypercorn's protocols, drainable on demand."""

    def __init__(self, app: Any, config: Config, state: LifespanState, send_timeout: float) -> None:
        self.app = ASGIWrapper(app)
        self.config = config
        self.context = WorkerContext(None)
        self.state = ConnectionState(state.copy())
        self.send_timeout = send_timeout
        self.draining = False
        self._connections: set[_Connection] = set()
        self._none_left = trio.Event()
        self._accept = trio.CancelScope()
        self._listeners: list[trio.abc.Listener[Any]] = []

    async def bind(self, host: str, port: int) -> int:
        """Open the listening sockets; return the bound port.

        Raises ``OSError`` naming the address or the certificate files, so
        the start fails with the cause on its first line.
        """
        ssl_context = None
        if self.config.certfile is not None:
            try:
                ssl_context = self.config.create_ssl_context()
            except (OSError, ssl.SSLError) as error:
                files = f"certfile {self.config.certfile}, keyfile {self.config.keyfile}"
                reason = error.strerror or str(error)
                raise OSError(error.errno, f"cannot load the TLS {files}: {reason}") from error
        try:
            sockets = await open_tcp_listeners(port, host=host)
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise OSError(error.errno, f"cannot listen on {host}:{port}: {reason}") from error
        bound: int = sockets[0].socket.getsockname()[1]
        if ssl_context is None:
            self._listeners = list(sockets)
        else:
            self._listeners = [
                trio.SSLListener(sock, ssl_context, https_compatible=True) for sock in sockets
            ]
        return bound

    def close_listeners(self) -> None:
        """Close the listening sockets (a start that failed after :meth:`bind`)."""
        for listener in self._listeners:
            sock = getattr(listener, "transport_listener", listener)
            if isinstance(sock, trio.SocketListener):
                sock.socket.close()

    async def serve(self) -> None:
        """Accept until :meth:`drain`, then wait for every connection to end."""
        async with trio.open_nursery() as connections:
            with self._accept:
                await trio.serve_listeners(
                    self._handle, self._listeners, handler_nursery=connections
                )

    async def _handle(self, stream: trio.abc.Stream) -> None:
        connection = _Connection(self, stream)
        self._connections.add(connection)
        try:
            with connection.scope:
                if self.draining:
                    return  # accepted in the same instant draining began
                await connection.run()
        finally:
            self._connections.discard(connection)
            if not self._connections:
                self._none_left.set()
                self._none_left = trio.Event()
            # A cancelled run skips hypercorn's own close; never leak the socket.
            await trio.aclose_forcefully(stream)

    async def drain(self) -> None:
        """Stop accepting; close idle connections now and busy ones after their request."""
        self.draining = True
        # hypercorn adds ``Connection: close`` to an HTTP/1.1 response only
        # past keep_alive_max_requests; zero makes every response still to
        # come say so, so clients do not reuse a connection about to close.
        self.config.keep_alive_max_requests = 0
        self._accept.cancel()  # serve_listeners closes the listeners on the way out
        await self.context.terminated.set()  # hypercorn stops keeping connections alive
        for connection in list(self._connections):
            if connection.idle:
                connection.close_idle()

    async def abort(self) -> None:
        """Close every remaining connection's socket (the component is cancelled).

        Requests cut at the drain deadline first get a moment to answer
        503 (see ``_Front``), then whatever is left is closed at once.
        """
        if self._connections:
            with trio.move_on_after(_CUT_GRACE) as grace:
                grace.shield = True
                await self._none_left.wait()
        for connection in list(self._connections):
            connection.abort()


def _hypercorn_config(settings: HttpSettings) -> Config:
    config = Config()
    config.keep_alive_timeout = settings.keep_alive_timeout
    config.read_timeout = math.ceil(settings.read_timeout)
    config.h11_max_incomplete_size = 64 * 1024  # request line + headers
    # Advertised and enforced by h2: more streams end the connection.
    config.h2_max_concurrent_streams = settings.h2_max_concurrent_streams
    config.certfile = settings.certfile
    config.keyfile = settings.keyfile
    # The supervisor owns every deadline; hypercorn's own must not fire first.
    config.graceful_timeout = 0
    config.accesslog = None
    config.errorlog = log
    return config


class _HttpComponent(Component):
    """Serves one endpoint until stopped; the supervisor bounds the drain."""

    def __init__(self, name: str, settings: HttpSettings, port: int, host: str) -> None:
        self.name = name
        self._settings = settings
        self._port = port
        self._host = host
        self.port: int | None = None

    @abc.abstractmethod
    def _front(self, lifetime: Lifetime) -> tuple[_Front, Any]:
        """What this endpoint serves, and the app whose lifespan to run (or None)."""

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # The start deadline the supervisor set on this component's scope:
        # a cancellation at or after it, before any shutdown, is the start
        # timeout, and the app's hook still running then is named.
        start_deadline = trio.current_effective_deadline()
        front, lifespan_app = self._front(lifetime)
        config = _hypercorn_config(self._settings)
        state: LifespanState = {}
        endpoint = _Endpoint(front, config, state, self._settings.send_timeout)
        # The listener first: a port in use or a bad certificate fails the
        # start at once, before the app's startup hooks run.
        self.port = await endpoint.bind(self._host, self._port)
        try:
            async with app_lifespan(cast(Any, front), cast(Any, state)) as lifespan:
                if lifespan_app is not None:
                    await _app_startup(lifespan, lifetime, start_deadline)
                try:
                    await self._serve(endpoint, lifetime, task_status)
                finally:
                    if lifespan_app is not None:
                        # after_serving runs even when the drain was cut: it
                        # gets what is left of the drain, at least a short
                        # grace, shielded so the app's cleanup is not torn
                        # (and logged as a lifespan error) mid-way.
                        grace = trio.current_time() + _APP_SHUTDOWN_GRACE
                        with trio.CancelScope(deadline=max(lifetime.deadline, grace), shield=True):
                            await lifespan.shutdown()
        finally:
            endpoint.close_listeners()

    async def _serve(
        self, endpoint: _Endpoint, lifetime: Lifetime, task_status: trio.TaskStatus[Any]
    ) -> None:
        assert self.port is not None
        lifetime.publish_address(self._host, self.port)
        log.info("%s listening on %s:%d", self.name, self._host, self.port)
        async with trio.open_nursery() as nursery:

            async def drain_on_stop() -> None:
                try:
                    await lifetime.wait_stopping()
                    await endpoint.drain()
                    await trio.sleep_forever()
                finally:
                    # Cancelled once everything has ended, or at the drain
                    # deadline: then sends hypercorn shields from
                    # cancellation could still block on a client that stopped
                    # reading, and only closing their sockets ends them.
                    await endpoint.abort()

            nursery.start_soon(drain_on_stop)
            task_status.started()
            try:
                await endpoint.serve()
            finally:
                nursery.cancel_scope.cancel()


#: Seconds the app's after_serving gets at least, even once the drain deadline has passed.
_APP_SHUTDOWN_GRACE = 0.5


async def _app_startup(lifespan: AppLifespan, lifetime: Lifetime, start_deadline: float) -> None:
    """Run the app's before_serving hooks; a hang past the start deadline is named as such."""
    try:
        await lifespan.startup()
    except trio.Cancelled:
        if lifetime.trigger is None and trio.current_time() >= start_deadline:
            # As trio.fail_after does: the cancellation becomes the error
            # that says what was still running.
            raise TimeoutError(
                "the app's startup (before_serving) was still running at the start timeout"
            ) from None
        raise


class HttpServer(_HttpComponent):
    """The service's HTTP server: the user's app behind probes and limits."""

    role = Role.GENERATING

    def __init__(
        self,
        settings: HttpSettings,
        port: int,
        app_provider: Callable[[], Any],
        service_name: str,
        *,
        probes: bool,
        telemetry: Telemetry,
    ) -> None:
        super().__init__("http", settings, port, settings.host)
        self._telemetry = telemetry
        self._app_provider = app_provider
        self._service_name = service_name
        self._probes = probes

    def _front(self, lifetime: Lifetime) -> tuple[_Front, Any]:
        app = adapt_app(self._app_provider(), self._settings, self._service_name, self._telemetry)
        front = _Front(
            app,
            lifetime.health,
            self._telemetry,
            probes=self._probes,
            max_body=self._settings.max_body_size,
        )
        return front, app


class AdminServer(_HttpComponent):
    """A probes-only listener on ``admin_port``: up before the main server, down after it."""

    role = Role.PROCESSING

    def __init__(self, settings: HttpSettings, port: int, telemetry: Telemetry) -> None:
        super().__init__("http-admin", settings, port, settings.host)
        self._telemetry = telemetry

    def _front(self, lifetime: Lifetime) -> tuple[_Front, Any]:
        front = _Front(None, lifetime.health, self._telemetry, probes=True, max_body=0)
        return front, None


def build_http(context: BuildContext) -> Sequence[Component]:
    """Kind builder: the HTTP server, and the admin listener when configured."""
    settings: HttpSettings = context.settings
    provider = context.provider(settings.app, "runtime.http.app")
    port = context.definition.port("http")
    assert port is not None  # http always has a port (default 8080)
    admin = settings.admin_port is not None
    server = HttpServer(
        settings,
        port,
        provider,
        context.definition.name,
        probes=not admin,
        telemetry=context.telemetry,
    )
    if not admin:
        return [server]
    assert settings.admin_port is not None
    return [server, AdminServer(settings, settings.admin_port, context.telemetry)]
