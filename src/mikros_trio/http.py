"""The HTTP kind (``types = ["http"]``): an ASGI app (QuartTrio, Starlette, FastAPI) on Trio.

The container provides the app (``[runtime.http] app``, default ``app``);
this module serves it as a supervisor component and owns the listener and
the set of connections. Plain-text HTTP/1.1 connections are served by
:mod:`._http_h11` (one task per connection, the app called in it); TLS,
HTTP/2 and protocol upgrades go through hypercorn's protocol layer
(:mod:`._http_hyper`, imported on the first such connection). Owning the
connections gives the shutdown the design asks for:

1. readiness turns 503 (the supervisor's health, read by the probes);
2. after the readiness delay the component is asked to stop: the listener
   closes (new connections are refused), idle connections close at once,
   busy ones finish their request and close (its answer says
   ``Connection: close``);
3. at the drain deadline the supervisor cancels whatever is left.

Probes (``/livez``, ``/readyz``, ``/healthz``, and Mikros' ``/health``: 200
with an empty body while ready, 503 otherwise) and request-size limits
(``max_body_size``, ``max_header_bytes``) sit in a thin ASGI layer in front
of the app, so they cost a few comparisons per request and never reach the
app's routing. With ``admin_port`` set, probes move to a second listener
that starts before the main one and stops after it. Probes stay at the root
whatever ``base_path`` is: orchestrators look for them there.

Between that layer and the app, and only when configured (see
:mod:`._http_hooks`): CORS (``cors_*``; preflights answered there), the auth
hook (``auth``, a container provider; :class:`AuthRequest` says what it is
given and how it answers; ``disable_auth`` turns it off, as in Go) and the
base path (``base_path``, passed to the app as ``root_path``).

Errors (see :mod:`._http_apps`): a :class:`~mikros_trio.ServiceError` raised
by a handler becomes its HTTP status with the Mikros JSON body; any other exception becomes 500 with
an ``InternalError`` body and its traceback logged; unknown routes and other
HTTP errors get JSON bodies too. The service keeps serving.

Requires the ``http`` extra (``pip install mikros-trio[http]``); nothing
here is imported unless a service's types include ``http``.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import trio

from ._component import Component, Lifetime, Role
from ._container import BuildContext
from ._health import Health, Phase
from ._http_apps import (
    HTTP_STATUS,
    adapt_app,
    install_error_handlers,
    is_cancellation,
    send_json,
    wire_for_status,
)
from ._http_h11 import Deadlines, H11Connection
from ._http_hooks import IDENTITY, Auth, AuthRequest, BasePath, Cors
from ._http_lifespan import AppLifespan, app_lifespan
from ._listen import open_tcp_listeners
from ._runtime_settings import HttpSettings
from ._telemetry import UNMATCHED, Endpoint, Telemetry

if TYPE_CHECKING:  # hypercorn is imported on the first connection it serves
    from ._http_hyper import HyperConnection, Hypercorn

__all__ = [
    "HTTP_STATUS",
    "IDENTITY",
    "AdminServer",
    "AuthRequest",
    "HttpServer",
    "build_http",
    "install_error_handlers",
]

log = logging.getLogger("mikros_trio.http")

# Probe paths (Kubernetes conventions), and Mikros' own: Go and Rust HTTP
# services answer GET /health 200 with an empty body.
LIVEZ, READYZ, HEALTHZ, HEALTH = "/livez", "/readyz", "/healthz", "/health"

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class _Front:
    """ASGI layer before the app: probes, features' endpoints, the body-size limit, and calls.

    ``app`` is ``None`` on an admin listener, which serves only probes and
    endpoints. Every request that reaches the app is reported to the
    service's telemetry as a :class:`~mikros_trio.ext.Call` (current for the
    request's task, so handlers' log lines carry its ids).
    """

    __slots__ = (
        "_app",
        "_endpoints",
        "_health",
        "_max_body",
        "_max_head",
        "_probes",
        "_telemetry",
    )

    def __init__(
        self,
        app: ASGIApp | None,
        health: Health,
        telemetry: Telemetry,
        *,
        probes: bool,
        max_body: int,
        max_head: int = 0,
    ) -> None:
        self._app = app
        self._health = health
        self._telemetry = telemetry
        self._probes = probes
        self._max_body = max_body
        self._max_head = max_head
        # Features' paths (/metrics) live where the probes do.
        self._endpoints = telemetry.endpoints if probes else {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if self._probes:
                path = scope["path"]
                if path == READYZ:
                    ready = self._health.ready
                    body = {"status": "ready" if ready else _not_ready(self._health)}
                    return await send_json(send, 200 if ready else 503, body)
                if path == LIVEZ:
                    live = self._health.live
                    return await send_json(send, 200 if live else 503, {"status": "live"})
                if path == HEALTHZ:
                    return await send_json(send, 200, self._health.snapshot())
                if path == HEALTH:
                    return await _send_health(send, self._health)
                endpoint = self._endpoints.get(path)
                if endpoint is not None:
                    return await _send_endpoint(send, endpoint)
            if self._app is None:
                return await send_json(send, 404, wire_for_status(404, "no such probe"))
            length, chunked, head = _framing(scope["headers"])
            head += len(scope["raw_path"]) + len(scope["query_string"])
            if head > self._max_head:
                # The servers' parsers bound a head that arrives in parts;
                # one that came whole in a single read is measured here.
                body = wire_for_status(431, f"request head over {self._max_head} bytes")
                return await send_json(send, 431, body, close=True)
            if chunked and length >= 0:
                # Both framings (RFC 9112 section 6.1): h11 reads the body as
                # chunked, a proxy in front may have read Content-Length; the
                # bytes between are a smuggled request. Answer and close.
                body = wire_for_status(400, "Content-Length with Transfer-Encoding")
                return await send_json(send, 400, body, close=True)
            if length > self._max_body:
                # Answer before the app reads anything; close, since the body
                # the client is still sending would otherwise be parsed as
                # the next request.
                body = wire_for_status(413, f"request body over {self._max_body} bytes")
                return await send_json(send, 413, body, close=True)
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


def _not_ready(health: Health) -> str:
    """Why ``/readyz`` says 503: the phase, a failing resource, or the other workers."""
    phase = health.phase
    if phase is not Phase.SERVING:
        return str(phase.value)
    failing = health.failing
    if failing:
        return "unhealthy: " + ", ".join(sorted(failing))
    return "waiting for other workers"


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
            await send_json(send, 503, body)
        except Exception:
            return False
    return not scope.cancelled_caught


async def _send_health(send: Any, health: Health) -> None:
    """Mikros' ``/health``: readiness, as Go and Rust say it (200, empty body); 503 says why not."""
    body = b"" if health.ready else _not_ready(health).encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
    ]
    status = 503 if body else 200
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_endpoint(send: Any, endpoint: Endpoint) -> None:
    status, content_type, body = endpoint()
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[int, bool, int]:
    """A request's declared body length (-1 if none), whether it is chunked, and its head's size.

    The size counts each ``Name: value\r\n`` and the method and version, not the target.
    """
    length, chunked, size = -1, False, 16
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = 0
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked, size


#: Connections accepted per wake of a listener, at most: then others run.
_ACCEPT_BATCH = 64
#: accept(2) failures that say the system is out of a resource (descriptors,
#: memory), and the seconds to wait before accepting again.
_ACCEPT_CAPACITY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BACKOFF = 0.1
#: accept(2) failures about the one connection, not the listener.
_ACCEPT_RETRY = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

#: Seconds requests cut at the drain deadline get to send their 503 before sockets close.
_CUT_GRACE = 0.1


class _Endpoint:
    """One listening address served by hypercorn's protocols, drainable on demand."""

    def __init__(self, app: Any, state: dict[str, Any], settings: HttpSettings) -> None:
        self.front = app
        self._settings = settings
        self._hyper: Hypercorn | None = None
        # The app's lifespan state, filled by its startup: each request
        # gets a shallow copy (ASGI), so it must be read after startup.
        self.state: dict[str, Any] = state
        self.read_timeout = settings.read_timeout
        self.keep_alive_timeout = settings.keep_alive_timeout
        self.send_timeout = settings.send_timeout
        self.max_head = settings.max_header_bytes
        self.draining = False
        self._connections: set[HyperConnection | H11Connection] = set()
        self._deadlines = Deadlines()
        self._none_left = trio.Event()
        self._accept = trio.CancelScope()
        self._listeners: list[trio.SocketListener] = []
        self._ssl_context: ssl.SSLContext | None = None

    async def bind(self, host: str, port: int) -> int:
        """Open the listening sockets; return the bound port.

        Raises ``OSError`` naming the address or the certificate files, so
        the start fails with the cause on its first line.
        """
        ssl_context = None
        if self._settings.certfile is not None:
            try:
                ssl_context = self._hypercorn().config.create_ssl_context()
            except (OSError, ssl.SSLError) as error:
                files = f"certfile {self._settings.certfile}, keyfile {self._settings.keyfile}"
                reason = error.strerror or str(error)
                raise OSError(error.errno, f"cannot load the TLS {files}: {reason}") from error
        try:
            sockets = await open_tcp_listeners(port, host=host)
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise OSError(error.errno, f"cannot listen on {host}:{port}: {reason}") from error
        bound: int = sockets[0].socket.getsockname()[1]
        self._listeners = list(sockets)
        self._ssl_context = ssl_context
        return bound

    def close_listeners(self) -> None:
        """Close the listening sockets (a start that failed after :meth:`bind`)."""
        for listener in self._listeners:
            listener.socket.close()

    async def serve(self) -> None:
        """Accept until :meth:`drain`, then wait for every connection to end."""
        async with trio.open_nursery() as timers:
            timers.start_soon(self._deadlines.run)
            async with trio.open_nursery() as connections:
                try:
                    with self._accept:
                        async with trio.open_nursery() as accepting:
                            for listener in self._listeners:
                                accepting.start_soon(self._accept_all, listener, connections)
                finally:
                    self.close_listeners()
            timers.cancel_scope.cancel()

    async def _accept_all(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        """Accept every connection waiting each time the listener wakes, not one per wake.

        trio's listener accepts one connection per scheduler pass, so under
        load each client of a burst waited one pass per client accepted
        before it. Accepting runs on a duplicate of the listening
        socket, since trio lets one task at a time wait on a socket.
        """
        trio_socket = listener.socket
        with socket.fromfd(trio_socket.fileno(), trio_socket.family, trio_socket.type) as sock:
            sock.setblocking(False)
            while True:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(_ACCEPT_BATCH):
                    try:
                        accepted, _ = sock.accept()
                    except BlockingIOError:
                        break
                    except OSError as error:
                        if error.errno in _ACCEPT_RETRY:
                            continue  # the client gave up while queued
                        if error.errno not in _ACCEPT_CAPACITY:
                            raise
                        # Out of descriptors or memory: connections already
                        # open keep being served; accept again shortly.
                        log.error("cannot accept a connection: %s", os.strerror(error.errno))
                        await trio.sleep(_ACCEPT_BACKOFF)
                        break
                    stream: trio.abc.Stream = trio.SocketStream(
                        trio.socket.from_stdlib_socket(accepted)
                    )
                    if self._ssl_context is not None:
                        stream = trio.SSLStream(
                            stream, self._ssl_context, server_side=True, https_compatible=True
                        )
                    connections.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        # Plain-text connections start on the lean HTTP/1.1 path; TLS
        # (ALPN may pick HTTP/2) and what that path hands over go through
        # hypercorn's protocols.
        connection: HyperConnection | H11Connection
        if isinstance(stream, trio.SocketStream):
            connection = H11Connection(self, stream, self.front)
            self._deadlines.add(connection)
        else:
            connection = await self._hyper_connection(stream, b"")
        self._connections.add(connection)
        try:
            if self.draining:
                return  # accepted in the same instant draining began
            if isinstance(connection, H11Connection):
                handoff = await connection.run()
                self._deadlines.connections.discard(connection)
                if handoff is None:
                    return
                self._connections.discard(connection)
                connection = await self._hyper_connection(stream, handoff)
                self._connections.add(connection)
            with connection.scope:
                await connection.run()
        finally:
            self._connections.discard(connection)
            if isinstance(connection, H11Connection):
                self._deadlines.connections.discard(connection)
            if not self._connections:
                self._none_left.set()
                self._none_left = trio.Event()
            # A cancelled run skips hypercorn's own close; never leak the socket.
            await trio.aclose_forcefully(stream)

    def _hypercorn(self) -> Hypercorn:
        """hypercorn's share of this endpoint, made (and hypercorn imported) on first use."""
        if self._hyper is None:
            from ._http_hyper import Hypercorn

            self._hyper = Hypercorn(self.front, self._settings)
        return self._hyper

    async def _hyper_connection(self, stream: trio.abc.Stream, initial: bytes) -> HyperConnection:
        from ._http_hyper import HyperConnection

        hyper = self._hypercorn()
        if self.draining:
            await hyper.drain()  # made after the drain began
        return HyperConnection(self, hyper, stream, initial)

    async def drain(self) -> None:
        """Stop accepting; close idle connections now and busy ones after their request."""
        self.draining = True
        self._accept.cancel()  # the accept loops end and serve() closes the listeners
        if self._hyper is not None:
            await self._hyper.drain()
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
        state: dict[str, Any] = {}
        endpoint = _Endpoint(front, state, self._settings)
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
        auth_provider: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__("http", settings, port, settings.host)
        self._telemetry = telemetry
        self._app_provider = app_provider
        self._service_name = service_name
        self._probes = probes
        self._auth_provider = auth_provider

    def _front(self, lifetime: Lifetime) -> tuple[_Front, Any]:
        settings = self._settings
        app = adapt_app(self._app_provider(), settings, self._service_name, self._telemetry)
        # Requests (and the lifespan, which the layers pass through) go to
        # the app behind the layers configured; with none, to the app itself.
        served = _layers(app, settings, self._auth_provider, self._service_name, self._telemetry)
        front = _Front(
            served,
            lifetime.health,
            self._telemetry,
            probes=self._probes,
            max_body=settings.max_body_size,
            max_head=settings.max_header_bytes,
        )
        return front, app


def _layers(
    app: ASGIApp,
    settings: HttpSettings,
    auth_provider: Callable[[], Any] | None,
    service_name: str,
    telemetry: Telemetry,
) -> ASGIApp:
    """``app`` behind the configured base path, auth hook and CORS, outermost last (as Go)."""
    from ._http_apps import _Answers

    if settings.base_path:
        app = BasePath(app, settings.base_path)
    if auth_provider is not None and not settings.disable_auth:
        app = Auth(app, auth_provider(), _Answers(service_name, telemetry))
        log.info("http auth: on (hook %r)", settings.auth)
    elif settings.auth is not None:
        log.warning("http auth: off (disable_auth = true; hook %r not called)", settings.auth)
    else:
        log.debug("http auth: off (no [runtime.http] auth hook)")
    if settings.cors_allowed_origins:
        problem = settings.cors_problem()
        if problem:  # cors_strict = false: Go's warning, and no CORS
            log.warning("invalid CORS settings: %s; CORS is off", problem)
        else:
            app = Cors(app, settings)
    return app


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
    auth = None
    if settings.auth is not None and not settings.disable_auth:
        auth = context.provider(settings.auth, "runtime.http.auth")
    server = HttpServer(
        settings,
        port,
        provider,
        context.definition.name,
        probes=not admin,
        telemetry=context.telemetry,
        auth_provider=auth,
    )
    if not admin:
        return [server]
    assert settings.admin_port is not None
    return [server, AdminServer(settings, settings.admin_port, context.telemetry)]
