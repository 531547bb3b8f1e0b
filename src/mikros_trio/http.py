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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState

from ._component import Component, Lifetime, Role
from ._container import BuildContext
from ._health import Health
from ._runtime_settings import HttpSettings
from ._telemetry import UNMATCHED, Endpoint, Telemetry, current_call
from ._wire import masked_wire, unexpected_error, wire_error
from .errors import ErrorKind, ServiceError

__all__ = ["HTTP_STATUS", "AdminServer", "HttpServer", "build_http", "install_error_handlers"]

log = logging.getLogger("mikros_trio.http")

#: HTTP status for each Mikros error kind.
HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.VALIDATION: 400,
    ErrorKind.PERMISSION: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONDITION: 412,
    ErrorKind.INTERNAL: 500,
    ErrorKind.RPC: 500,
    ErrorKind.CUSTOM: 500,
}

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
                return await _send_json(send, 404, _wire_for_status(404, "no such probe"))
            if _declared_length(scope) > self._max_body:
                # Answer before the app reads anything; close, since the body
                # the client is still sending would otherwise be parsed as
                # the next request.
                body = _wire_for_status(413, f"request body over {self._max_body} bytes")
                return await _send_json(send, 413, body, close=True)
            if self._telemetry.observers:
                return await self._observed(scope, receive, send)
        elif self._app is None:
            return None  # lifespan on the admin listener: nothing to start
        assert self._app is not None
        await self._app(scope, receive, send)
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
        status = 500  # what the client gets if the app dies before answering

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if extra:
                    message["headers"] = [*message["headers"], *extra]
            await send(message)

        token = telemetry.enter(call)
        try:
            await self._app(scope, receive, observed_send)
        except Exception as error:
            call.error = error
            raise
        finally:
            telemetry.leave(token)
            if not call.name:
                call.name = UNMATCHED
            telemetry.end(call, str(status), failed=status >= 500)


async def _send_endpoint(send: Any, endpoint: Endpoint) -> None:
    status, content_type, body = endpoint()
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _declared_length(scope: dict[str, Any]) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _wire_for_status(status: int, message: str) -> dict[str, Any]:
    """The Mikros error body for a plain HTTP error status."""
    kind = {
        403: ErrorKind.PERMISSION,
        404: ErrorKind.NOT_FOUND,
        412: ErrorKind.CONDITION,
    }.get(status, ErrorKind.VALIDATION if status < 500 else ErrorKind.INTERNAL)
    return {"code": 0, "kind": kind.value, "message": message}


def install_error_handlers(app: Any, service_name: str, telemetry: Telemetry | None = None) -> None:
    """Make ``app`` answer every error with Mikros JSON, and name calls by route (once per app).

    Registered on the user's Quart app so its own, more specific handlers
    still win. ``telemetry`` (the service's hub) decides whether an
    unexpected error's text is sent (``[features.errors] expose_details``)
    and masks secrets in what is.
    """
    if getattr(app, "_mikros_trio_errors", False):
        return
    from quart import request
    from werkzeug.exceptions import HTTPException

    hub = telemetry or Telemetry(service_name)

    async def service_error(error: ServiceError) -> tuple[dict[str, Any], int]:
        call = current_call()
        if call is not None:
            call.error_kind = error.kind
            call.error = error
        return wire_error(error, service_name, hub), HTTP_STATUS[error.kind]

    async def http_error(error: HTTPException) -> tuple[dict[str, Any], int]:
        status = error.code or 500
        # abort(403, description) text is the handler's: it may quote a secret.
        return masked_wire(_wire_for_status(status, error.description or error.name), hub), status

    async def unexpected(error: Exception) -> tuple[dict[str, Any], int]:
        log.error("unhandled error in an HTTP handler", exc_info=error)
        call = current_call()
        if call is not None:
            call.error_kind = ErrorKind.INTERNAL
            call.error = error
        return wire_error(unexpected_error(error, hub), service_name, hub), 500

    async def name_call() -> None:
        # The route rule, not the path: a bounded label for metrics and
        # span names. Runs before any other hook, even when nothing matched.
        call = current_call()
        if call is not None:
            rule = request.url_rule
            call.name = rule.rule if rule is not None else UNMATCHED

    app.register_error_handler(ServiceError, service_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
    app.before_request_funcs.setdefault(None, []).insert(0, name_call)
    app._mikros_trio_errors = True


class _Connection(TCPServer):
    """hypercorn's connection handler, told when it is idle so shutdown can close it.

    hypercorn runs connection steps (sending bytes, closing the socket,
    re-arming the keep-alive timer) in the app's task, which QuartTrio
    cancels as soon as its response is out: unshielded, those steps were
    lost, so the keep-alive timer never re-armed after a response and a
    connection the protocol closed stayed open. They are shielded here;
    none waits on anything but the socket, and :meth:`abort` (at the drain
    deadline) ends such a wait. Reading is owned here too: see
    :meth:`_read_data`.
    """

    def __init__(self, endpoint: _Endpoint, stream: trio.abc.Stream) -> None:
        super().__init__(endpoint.app, endpoint.config, endpoint.context, endpoint.state, stream)
        self._endpoint = endpoint
        self.idle = True  # no request yet
        self.scope = trio.CancelScope()
        self._reading = trio.CancelScope()
        # One keep-alive timer for the connection's whole life, re-armed by
        # moving its deadline: hypercorn starts a new timer task after every
        # response, which cost ~15% of throughput (bench/http_overhead.py).
        self._keep_alive = trio.CancelScope(
            deadline=trio.current_time() + self.config.keep_alive_timeout
        )

    async def _idle_timeout(self) -> None:
        with self._keep_alive:
            await trio.sleep_forever()
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, Updated):
            self.idle = event.idle
            if event.idle and self._endpoint.draining:
                self.scope.cancel()
            self._keep_alive.deadline = (
                trio.current_time() + self.config.keep_alive_timeout if event.idle else math.inf
            )
        elif isinstance(event, Closed):
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
            try:
                with trio.CancelScope(shield=True):
                    async with self.send_lock:
                        await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
        else:
            await super().protocol_send(event)

    def _client_owes_bytes(self) -> bool:
        """True while waiting for a request's headers or, on HTTP/1.1, the rest of its body."""
        if self.idle:
            return True
        inner = getattr(self.protocol, "protocol", None)  # hypercorn's H11Protocol or H2Protocol
        connection = getattr(inner, "connection", None)
        return isinstance(connection, h11.Connection) and connection.their_state is h11.SEND_BODY

    async def _read_data(self) -> None:
        """Feed the protocol until end-of-file, close or read timeout.

        ``read_timeout`` bounds each wait for bytes the client owes (see
        :meth:`_client_owes_bytes`). hypercorn bounded every read, so a
        handler slower than ``read_timeout`` lost its response; and after a
        timeout it kept the connection open until the keep-alive timer ran
        out. Idle keep-alive connections are closed by that timer.
        """
        read_timeout = self.config.read_timeout or math.inf
        with self._reading:
            while True:
                limit = read_timeout if self._client_owes_bytes() else math.inf
                with trio.move_on_after(limit) as waiting:
                    try:
                        data = await self.stream.receive_some(MAX_RECV)
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        break
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


class _Endpoint:
    """One listening address served by hypercorn's protocols, drainable on demand."""

    def __init__(self, app: Any, config: Config, state: LifespanState) -> None:
        self.app = ASGIWrapper(app)
        self.config = config
        self.context = WorkerContext(None)
        self.state = ConnectionState(state.copy())
        self.draining = False
        self._connections: set[_Connection] = set()
        self._accept = trio.CancelScope()
        self._listeners: list[trio.abc.Listener[Any]] = []

    async def bind(self, host: str, port: int) -> int:
        """Open the listening sockets; return the bound port."""
        sockets = await trio.open_tcp_listeners(port, host=host)
        bound: int = sockets[0].socket.getsockname()[1]
        ssl_context = self.config.create_ssl_context()
        if ssl_context is None:
            self._listeners = list(sockets)
        else:
            self._listeners = [
                trio.SSLListener(sock, ssl_context, https_compatible=True) for sock in sockets
            ]
        return bound

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
                connection.scope.cancel()

    def abort(self) -> None:
        """Close every remaining connection's socket at once (the component is cancelled)."""
        for connection in list(self._connections):
            connection.abort()


def _hypercorn_config(settings: HttpSettings) -> Config:
    config = Config()
    config.keep_alive_timeout = settings.keep_alive_timeout
    config.read_timeout = math.ceil(settings.read_timeout)
    config.h11_max_incomplete_size = 64 * 1024  # request line + headers
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
        front, lifespan_app = self._front(lifetime)
        config = _hypercorn_config(self._settings)
        state: LifespanState = {}
        # The app's lifespan task ignores the component's cancellation (see
        # the end of this method) and is ended through this scope instead.
        app_scope = trio.CancelScope(shield=True)
        async with trio.open_nursery() as nursery:
            lifespan = None
            if lifespan_app is not None:
                # The app's own startup/shutdown (Quart's before_serving /
                # after_serving) runs inside the component's lifetime.
                lifespan = Lifespan(ASGIWrapper(cast(Any, front)), config, state)
                await nursery.start(_shielded, app_scope, lifespan.handle_lifespan)
                await lifespan.wait_for_startup()
            endpoint = _Endpoint(front, config, state)
            self.port = await endpoint.bind(self._host, self._port)
            lifetime.publish_address(self._host, self.port)
            log.info("%s listening on %s:%d", self.name, self._host, self.port)

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
                    endpoint.abort()

            nursery.start_soon(drain_on_stop)
            task_status.started()
            try:
                await endpoint.serve()
            finally:
                if lifespan is not None:
                    # after_serving runs even when the drain was cut, with a
                    # short bound of its own, so the app's cleanup is not
                    # torn (and logged as a lifespan error) mid-way.
                    with trio.move_on_after(_APP_SHUTDOWN_GRACE) as grace:
                        grace.shield = True
                        await lifespan.wait_for_shutdown()
                app_scope.cancel()
                nursery.cancel_scope.cancel()


#: Seconds the app's after_serving gets once the drain deadline has passed.
_APP_SHUTDOWN_GRACE = 0.5


async def _shielded(
    scope: trio.CancelScope,
    function: Callable[..., Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Run ``function(task_status=...)`` inside ``scope`` (a shielded one, cancelled by hand)."""
    with scope:
        await function(task_status=task_status)


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
        app = self._app_provider()
        install_error_handlers(app, self._service_name, self._telemetry)
        if hasattr(app, "config"):
            app.config["MAX_CONTENT_LENGTH"] = self._settings.max_body_size
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
