"""The gRPC kind (``types = ["grpc"]``): purerpc servicers behind a drainable server.

purerpc's own ``Server.serve_async`` cannot be stopped: cancelling it
leaves the listening and connection sockets open (clients hang), and its
bare ``except:`` blocks swallow ``trio.Cancelled``. This module reuses
purerpc's protocol and codec pieces (``GRPCProtoSocket``, the call
wrappers) and owns everything around them:

- the listener and one task per connection, tracked with their in-flight
  RPC count; each connection's reader loop, so that a bad request (bad
  headers, a message over ``max_message_size``) fails only its own call,
  and a call the client cancels (RST_STREAM) cancels its handler;
- shutdown: health turns NOT_SERVING the moment the trigger happens; after
  the readiness delay the listener closes and every connection gets
  grpc-go's two-step GOAWAY (any stream + PING, then the last stream
  received), so nothing a client sent in time is refused; idle connections
  close at once and busy ones when their last RPC ends; at the drain
  deadline the supervisor cancels the rest, and every socket is closed on
  the way out;
- connection management (``[runtime.grpc]``, after grpc-go's keepalive
  parameters): idle and age limits, keepalive pings, ping enforcement, one
  timer task per connection; accept errors from running out of descriptors
  are logged once and retried;
- errors: a handler's exception of any kind, ``BaseException`` included,
  fails its own call; only cancellation propagates. A
  :class:`~mikros_trio.ServiceError` becomes a status whose message is the
  Mikros error JSON; any other exception an ``InternalError`` JSON. The
  status code is UNKNOWN, as Mikros Go v0.19.0 and Rust servers send and
  as Go v0.19.0's client needs to read the kind (it turns any other code
  into InternalError); ``[features.errors] grpc_status = "mapped"`` sends
  :data:`GRPC_STATUS` instead, Go main's codes, which Go main, Rust, grpcio
  clients and ours decode, but Go v0.19.0 does not.

The server also serves ``grpc.health.v1.Health`` (Check and Watch, for
``""`` and each registered service, read from the supervisor's health) and
server reflection (``grpc.reflection.v1alpha`` and ``v1``).

Servicers come from the container: ``[runtime.grpc] servicers`` names the
providers; when it is empty, every Singleton/Object provider whose class is
a ``purerpc.Servicer`` is served. Requires the ``grpc`` extra.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.abc
import h2.errors
import h2.events
import h2.exceptions
import purerpc
import trio
from dependency_injector import providers
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import (
    RequestReceived,
)
from purerpc.grpclib.exceptions import (
    MessageTooLargeError,
    ProtocolError,
    RpcFailedError,
)
from purerpc.grpclib.status import Status, StatusCode
from purerpc.rpc import Cardinality

from ._component import Component, Lifetime, Role
from ._container import BuildContext, ServiceContainer, container_class, provided_type
from ._definition import Definition
from ._error_wire import policy as error_policy
from ._error_wire import unexpected_error, wire_error
from ._grpc_proto import HEALTH, REFLECTION
from ._grpc_services import HealthService, ReflectionService
from ._listen import open_anyio_listener
from ._purerpc_fixes import (
    CALLERS,
    GONE,
    ClientSocket,
    ServerSocket,
    abandon_streams,
    only,
    stream_gone,
)
from ._runtime_settings import GrpcSettings
from ._telemetry import Telemetry, current_call
from .errors import ConfigError, ConfigIssue, ErrorKind, RPCError, ServiceError, mikros_wire

__all__ = [
    "GRPC_STATUS",
    "ClientChannel",
    "GrpcServer",
    "build_grpc",
    "call",
    "client",
    "typed_error",
]

log = logging.getLogger("mikros_trio.grpc")

#: gRPC status code of each Mikros error kind with ``grpc_status = "mapped"``:
#: Mikros Go main's ``grpcCode`` (RPCError is UNAVAILABLE; CustomError, a kind
#: Go main no longer has, UNKNOWN as Go main sends any kind it does not know).
GRPC_STATUS: dict[ErrorKind, StatusCode] = {
    ErrorKind.VALIDATION: StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: StatusCode.NOT_FOUND,
    ErrorKind.PERMISSION: StatusCode.PERMISSION_DENIED,
    ErrorKind.CONDITION: StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: StatusCode.INTERNAL,
    ErrorKind.RPC: StatusCode.UNAVAILABLE,
    ErrorKind.CUSTOM: StatusCode.UNKNOWN,
}


#: ``Call.name`` of a call to a method this server does not have (a bounded label).
UNKNOWN = "(unknown)"

#: Codes that mean the server failed, not the caller (``Call.failed``).
SERVER_FAULTS = frozenset(
    {
        StatusCode.UNKNOWN,
        StatusCode.INTERNAL,
        StatusCode.UNAVAILABLE,
        StatusCode.DATA_LOSS,
        StatusCode.DEADLINE_EXCEEDED,
        StatusCode.UNIMPLEMENTED,
        StatusCode.RESOURCE_EXHAUSTED,
    }
)


#: Cardinalities whose request is one message.
_UNARY_REQUEST = frozenset({Cardinality.UNARY_UNARY, Cardinality.UNARY_STREAM})

#: Error kinds that are the server's fault (the others are the caller's).
INTERNAL_KINDS = frozenset({ErrorKind.INTERNAL, ErrorKind.RPC, ErrorKind.CUSTOM})


#: PING payloads the server sends: the drain's (two-step GOAWAY) and keepalive's.
DRAIN_PING = b"mkdrain\x00"
KEEPALIVE_PING = b"mkalive\x00"

#: The first GOAWAY of a drain names the largest stream id: "no new streams,
#: but those already sent will be served" (grpc-go's two-step GOAWAY).
ANY_STREAM = 2**31 - 1

#: How long a drain waits for the PING sent with its first GOAWAY before the
#: final GOAWAY (grpc-go: 1 s); streams the client sent before it are served.
DRAIN_PING_TIMEOUT = 1.0

#: Accept errors that mean "out of descriptors or memory for now": logged,
#: retried every ACCEPT_BACKOFF seconds (as trio's serve_listeners does).
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF = 0.1

#: Seconds a connection closed for abuse or a protocol error keeps reading
#: (and dropping) before it closes, so its GOAWAY reaches the client.
LINGER = 1.0


class _Connection:
    """One client connection: its socket, its in-flight RPCs, its timers, a way to end it.

    One task per connection (:meth:`keep`) sleeps in :attr:`timer`, a cancel
    scope whose deadline is the earliest of the connection's timers
    (keepalive, idle, age); events only move that deadline earlier, and the
    task works out on waking what is due. No task or timer per RPC.
    """

    __slots__ = (
        "draining",
        "final_sent",
        "idle_since",
        "keeping",
        "reading",
        "scope",
        "settings",
        "socket",
        "timer",
    )

    def __init__(self, settings: GrpcSettings) -> None:
        self.settings = settings
        self.draining = False  # the first GOAWAY went out
        self.final_sent = False  # the final GOAWAY went out: close once idle
        # Cancelled to stop reading new requests once drained; what was
        # written (last responses, the GOAWAY) is still flushed before the
        # socket closes.
        self.reading = trio.CancelScope()
        # Cancelled to end the connection at once (keepalive unanswered,
        # age grace over, abuse): every RPC on it is cancelled.
        self.scope = trio.CancelScope()
        self.timer = trio.CancelScope()
        self.keeping = trio.CancelScope()  # cancelled when reading ends
        self.socket: ServerSocket | None = None
        self.idle_since = trio.current_time()

    @property
    def active(self) -> int:
        return self.socket.protocol.in_flight if self.socket is not None else 0

    def wake_at(self, deadline: float) -> None:
        """Make :meth:`keep` look again at ``deadline`` (or earlier)."""
        if deadline < self.timer.deadline:
            self.timer.deadline = deadline

    async def first_goaway(self) -> trio.Event | None:
        """Step one of a drain: GOAWAY(any stream) and a PING; the event is its answer."""
        if self.socket is None or self.draining:
            return None
        self.draining = True
        await self.socket.goaway(ANY_STREAM)
        return await self.socket.ping(DRAIN_PING)

    async def final_goaway(self) -> None:
        """Step two: GOAWAY(the last stream received); streams above it are refused."""
        if self.socket is None or self.final_sent:
            return
        self.final_sent = True
        last = self.socket.protocol.h2_connection.highest_inbound_stream_id
        self.socket.protocol.last_stream_id = last
        await self.socket.goaway(last)
        if self.active == 0:
            self.reading.cancel()

    async def drain(self) -> None:
        """Both steps of the GOAWAY, the second once the PING is answered (bounded)."""
        answered = await self.first_goaway()
        if answered is not None:
            with trio.move_on_after(DRAIN_PING_TIMEOUT):
                await answered.wait()
        await self.final_goaway()

    async def keep(self) -> None:
        """The connection's timers: keepalive pings, idle and age limits (grpc-go's)."""
        with self.keeping:
            await self._keep()

    async def _keep(self) -> None:
        settings = self.settings
        socket = self.socket
        assert socket is not None
        idle = settings.max_connection_idle
        keepalive = settings.keepalive_time
        age = settings.max_connection_age
        # Jitter (±10 %, as grpc-go) keeps connections made together from
        # all draining together.
        now = trio.current_time()
        aged = now + age * random.uniform(0.9, 1.1) if age is not None else math.inf
        cut = math.inf  # aged + grace, once aged
        ping: trio.Event | None = None
        ping_due = math.inf
        while True:
            now = trio.current_time()
            if ping is not None and ping.is_set():
                ping = None
            if ping is not None and now >= ping_due:
                log.info("grpc: a client did not answer a keepalive ping; connection closed")
                self.scope.cancel()
                return
            if now >= cut:
                log.info("grpc: connection closed at max_connection_age + grace")
                self.scope.cancel()
                return
            idle_due = self.idle_since + idle if idle is not None and self.active == 0 else math.inf
            if not self.draining and now >= min(aged, idle_due):
                if now >= aged:
                    cut = now + settings.max_connection_age_grace
                await self.drain()  # GOAWAY: the client's next call opens a new connection
                continue
            deadlines = [cut] if self.draining else [aged, idle_due]
            if ping is not None:
                deadlines.append(ping_due)
            elif keepalive is not None:
                due = socket.last_read + keepalive
                if now >= due:
                    ping = await socket.ping(KEEPALIVE_PING)
                    if ping is None:  # h2 sends nothing more here: no call on it can answer
                        self.scope.cancel()
                        return
                    ping_due = now + settings.keepalive_timeout
                    continue
                deadlines.append(due)
            self.timer = trio.CancelScope(deadline=min(deadlines))
            with self.timer:
                await trio.sleep_forever()


class _Dispatcher:
    """Routes each stream to its method; errors become statuses, cancellation propagates.

    Every call is reported to the service's telemetry (current for the
    handler's task, so its log lines carry the call's ids).
    """

    def __init__(
        self, services: dict[str, purerpc.Service], service_name: str, telemetry: Telemetry
    ) -> None:
        self.services = services
        self.service_name = service_name
        self.telemetry = telemetry

    async def __call__(self, stream: Any) -> None:
        await stream.start_response()
        # The request's events are read without checkpoints (eager): a call
        # cancelled before it began (the client reset it, the connection or
        # the drain ended) is cancelled here, as at the checkpoint of a read.
        await trio.lowlevel.checkpoint_if_cancelled()
        stream.eager = True
        event = await stream.receive_event()
        if not isinstance(event, RequestReceived):
            await stream.close(Status(StatusCode.INTERNAL, "expected request headers"))
            return
        service = self.services.get(event.service_name)
        method = service.methods.get(event.method_name) if service is not None else None
        telemetry = self.telemetry
        if not telemetry.observers:
            await self._dispatch(event, method, stream)
            return
        name = f"/{event.service_name}/{event.method_name}" if method is not None else UNKNOWN
        call = telemetry.begin("grpc", "server", name, target=name, headers=event.custom_metadata)
        token = telemetry.enter(call)
        code = StatusCode.CANCELLED  # unless the handler gets to an answer
        try:
            code = await self._dispatch(event, method, stream)
        finally:
            telemetry.leave(token)
            # A Mikros error is the server's fault only for the internal
            # kinds, whatever code carried it (UNKNOWN in Go's convention).
            kind = call.error_kind
            failed = kind in INTERNAL_KINDS if kind is not None else code in SERVER_FAULTS
            telemetry.end(call, code.name, failed=failed)

    async def _dispatch(self, event: Any, method: Any, stream: Any) -> StatusCode:
        """Run the call; return the status code the client was sent."""
        if method is None:
            await stream.close(
                Status(
                    StatusCode.UNIMPLEMENTED,
                    f"method {event.service_name}/{event.method_name} is not implemented",
                )
            )
            return StatusCode.UNIMPLEMENTED
        call = functools.partial(method.method_fn, request=event)
        stream.expect_message_type(method.signature.request_type)
        cardinality = method.signature.cardinality
        # A request stream may hold many messages: a checkpoint each, so one
        # call never holds the loop (see _Stream.eager).
        stream.eager = cardinality in _UNARY_REQUEST
        try:
            await CALLERS[cardinality](call, stream)
            return StatusCode.OK
        # RpcFailedError and ProtocolError are GRPCErrors too: they come first.
        except RpcFailedError as error:
            status = error.status  # the handler's own status, or a peer's it let through
        except MessageTooLargeError as error:  # a response over max_message_size
            status = Status(StatusCode.RESOURCE_EXHAUSTED, str(error))
        except ProtocolError as error:  # the request broke gRPC's framing rules
            status = Status(StatusCode.INTERNAL, f"malformed request: {error}")
        except ServiceError as error:
            _note_error(error, error.kind)
            status = self._status(error)
        except BaseException as error:
            # Not only Exception: a handler's SystemExit, KeyboardInterrupt or
            # other BaseException fails its own call, never the whole service.
            # Cancellation (the client's, the drain deadline's) propagates.
            if _cancellation(error):
                raise
            if isinstance(error, h2.exceptions.StreamClosedError) or stream_gone(stream):
                return StatusCode.CANCELLED  # the client reset the stream or went away
            log.error(
                "unhandled error in %s/%s", event.service_name, event.method_name, exc_info=error
            )
            _note_error(error, ErrorKind.INTERNAL)
            status = self._status(unexpected_error(error, self.telemetry))
        if stream_gone(stream):
            return StatusCode.CANCELLED
        with contextlib.suppress(h2.exceptions.ProtocolError):  # the client reset the stream
            await stream.close(status)
        return StatusCode(status.status_code)

    def _status(self, error: ServiceError) -> Status:
        wire = wire_error(error, self.service_name, self.telemetry)
        mapped = error_policy(self.telemetry).grpc_status == "mapped"
        code = GRPC_STATUS[error.kind] if mapped else StatusCode.UNKNOWN
        return Status(code, _fitted_status_message(wire))


#: Most bytes of a status message sent. It travels in the trailers, which
#: grpcio clients refuse past 8 KiB (soft limit, 16 KiB hard: the call fails
#: RESOURCE_EXHAUSTED and the error's kind is lost; far past it, the call
#: hangs to its deadline) and Rust's tonic (hyper) past 16 KiB.
_MAX_STATUS_MESSAGE = 6144


def _fitted_status_message(wire: dict[str, Any]) -> str:
    """``wire`` as a status message of at most :data:`_MAX_STATUS_MESSAGE` bytes.

    Too long, the cause is cut first (it goes out twice, as ``details`` and
    ``cause``), then the message, then attributes are dropped; ``code``,
    ``kind`` and the names stay whole, so every Mikros client still reads
    the kind.
    """
    text = _compact(wire)
    excess = _encoded_size(text) - _MAX_STATUS_MESSAGE
    if excess <= 0:
        return text
    wire = dict(wire)
    for keys in (("details", "cause"), ("message",)):
        present = [key for key in keys if isinstance(wire.get(key), str)]
        if not present:
            continue
        value: str = wire[present[0]]
        # Each character cut saves at least one byte in each copy.
        keep = max(0, len(value) - (-(-excess // len(present))) - _CUT_MARK_ROOM)
        cut = f"{value[:keep]}… ({len(value) - keep} characters cut)"
        for key in present:
            wire[key] = cut
        text = _compact(wire)
        excess = _encoded_size(text) - _MAX_STATUS_MESSAGE
        if excess <= 0:
            return text
    wire.pop("attributes", None)
    return _compact(wire)


#: Room the "… (N characters cut)" mark needs, escaped.
_CUT_MARK_ROOM = 40


def _compact(wire: dict[str, Any]) -> str:
    return json.dumps(wire, separators=(",", ":"))


def _encoded_size(text: str) -> int:
    # ASCII JSON (json.dumps escapes the rest) is sent as is but for "%",
    # which the grpc-message encoding writes as three bytes.
    return len(text) + 2 * text.count("%")


async def _linger(stream: Any) -> None:
    """Close our side and read (and drop) what the client still sends, briefly.

    Closing a socket with unread bytes makes the kernel send RST, and a
    client that gets RST may lose what was sent just before, the GOAWAY
    saying why (nginx's "lingering close" does this too).
    """
    with trio.move_on_after(LINGER), contextlib.suppress(*GONE):
        await stream.send_eof()
        while True:
            await stream.receive(65536)


def _cancellation(error: BaseException) -> bool:
    """True for Trio's Cancelled, alone or inside an exception group."""
    if isinstance(error, BaseExceptionGroup):
        return error.subgroup(trio.Cancelled) is not None
    return isinstance(error, trio.Cancelled)


def _note_error(error: BaseException, kind: ErrorKind) -> None:
    call = current_call()
    if call is not None:
        call.error = error
        call.error_kind = kind


class GrpcServer(Component):
    """The service's gRPC server: user servicers plus health and reflection."""

    role = Role.GENERATING

    def __init__(
        self,
        settings: GrpcSettings,
        port: int,
        servicers: Sequence[Callable[[], Any]],
        service_name: str,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.name = "grpc"
        self._telemetry = telemetry or Telemetry(service_name)
        self._settings = settings
        self._port = port
        self._servicers = servicers
        self._service_name = service_name
        self._connections: set[_Connection] = set()
        self._draining = False
        self._accept = trio.CancelScope()
        self.port: int | None = None

    def _services(self, lifetime: Lifetime) -> dict[str, purerpc.Service]:
        services: dict[str, purerpc.Service] = {}
        for provider in self._servicers:
            service = provider().service
            services[service.name] = service
        user = list(services)
        services[HEALTH.service_name] = HealthService(lifetime.health, lifetime, user).service()
        reflection = ReflectionService(services)
        for version in REFLECTION:
            service = reflection.service(version)
            services[service.name] = service
        return services

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        dispatcher = _Dispatcher(self._services(lifetime), self._service_name, self._telemetry)
        listener = await open_anyio_listener(self._port, host=self._settings.host)
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        lifetime.publish_address(self._settings.host, self.port)
        log.info("grpc listening on %s:%d", self._settings.host, self.port)
        async with trio.open_nursery() as nursery:

            async def drain_on_stop() -> None:
                await lifetime.wait_stopping()
                await self._drain()

            nursery.start_soon(drain_on_stop)
            task_status.started()
            async with trio.open_nursery() as connections:
                with self._accept:
                    async with listener, trio.open_nursery() as accepting:
                        for one in listener.listeners:
                            accepting.start_soon(self._accept_from, one, connections, dispatcher)
            nursery.cancel_scope.cancel()

    async def _accept_from(
        self, listener: Any, connections: trio.Nursery, dispatcher: _Dispatcher
    ) -> None:
        """Accept connections; running out of descriptors or memory is waited out, not fatal."""
        failures = 0
        while True:
            try:
                stream = await listener.accept()
            except anyio.BrokenResourceError as error:  # anyio's wrapping of the OSError
                cause = error.__cause__
                if not isinstance(cause, OSError) or cause.errno not in _RESOURCE_ERRORS:
                    raise
                if failures == 0:  # once per burst, not per attempt
                    log.warning(
                        "grpc: cannot accept connections (%s); retrying every %g s",
                        cause.strerror,
                        ACCEPT_BACKOFF,
                    )
                failures += 1
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            if failures:
                log.warning("grpc: accepting connections again after %d failed tries", failures)
                failures = 0
            connections.start_soon(self._serve_connection, dispatcher, stream)

    async def _drain(self) -> None:
        """Stop accepting; drain every connection with a two-step GOAWAY.

        Step one (GOAWAY naming any stream, and a PING) tells every client
        at once to open no new streams; once each has answered the PING (so
        every stream it sent before hearing it has arrived), or after
        :data:`DRAIN_PING_TIMEOUT`, step two names the last stream that
        will be served. Nothing a client sent in time is refused.
        """
        self._draining = True
        self._accept.cancel()
        connections = list(self._connections)
        answers = [await connection.first_goaway() for connection in connections]
        with trio.move_on_after(DRAIN_PING_TIMEOUT):
            for answered in answers:
                if answered is not None:
                    await answered.wait()
        for connection in connections:
            await connection.final_goaway()

    async def _serve_connection(self, dispatcher: _Dispatcher, stream: Any) -> None:
        connection = _Connection(self._settings)
        self._connections.add(connection)
        linger = False
        config = GRPCConfiguration(
            client_side=False, max_message_length=self._settings.max_message_size
        )
        try:
            with connection.scope:
                async with AsyncExitStack() as stack:
                    socket = ServerSocket(config, stream, self._settings)
                    await stack.enter_async_context(socket)
                    stack.callback(abandon_streams, socket)
                    connection.socket = socket
                    if self._draining:
                        await connection.final_goaway()
                        return
                    async with trio.open_nursery() as rpcs:
                        rpcs.start_soon(connection.keep)
                        with connection.reading:
                            async for grpc_stream in socket.listen():
                                socket.protocol.rpc_started()
                                rpcs.start_soon(
                                    self._serve_rpc, dispatcher, connection, grpc_stream
                                )
                        if socket.calm is not None:
                            log.warning(
                                "grpc: connection closed (GOAWAY ENHANCE_YOUR_CALM): %s",
                                socket.calm,
                            )
                        elif socket.broken is not None:
                            # The client's fault, not worth a warning.
                            log.debug("gRPC connection dropped: %s", socket.broken)
                        if socket.calm or socket.broken:
                            rpcs.cancel_scope.cancel()
                            linger = True
                        # The client closed the connection, or it drained: no stream
                        # gets more requests (handlers waiting for one get end-of-stream).
                        abandon_streams(socket)
                        connection.keeping.cancel()  # only the handlers are left
        except* GONE:
            pass  # the client went away or broke the protocol: only its connection ends
        except* h2.exceptions.ProtocolError as group:
            # Not HTTP/2, or HTTP/2 broken: the client's fault, not worth a warning.
            log.debug("gRPC connection dropped: %s", group.exceptions[0])
        except* Exception as group:
            log.warning("gRPC connection failed", exc_info=group)
        finally:
            self._connections.discard(connection)
            try:
                if linger:
                    await _linger(stream)
            finally:  # even when cancelled while lingering: the socket never leaks
                await anyio.aclose_forcefully(stream)

    async def _serve_rpc(
        self, dispatcher: _Dispatcher, connection: _Connection, stream: Any
    ) -> None:
        try:
            with trio.CancelScope() as stream._handler:
                if stream._reset:  # the client cancelled the call before it began
                    stream._handler.cancel()
                await dispatcher(stream)
        except (*GONE, h2.exceptions.ProtocolError):
            # The stream or the connection ended under the handler (h2 refuses
            # to send on a stream the client reset: a ProtocolError of that
            # stream alone; errors of the connection come from its reader).
            pass
        finally:
            stream.release()
            protocol = stream._grpc_socket.protocol
            protocol.in_flight -= 1
            if protocol.in_flight == 0:
                if connection.final_sent:
                    connection.reading.cancel()
                connection.idle_since = now = trio.current_time()
                idle = self._settings.max_connection_idle
                if idle is not None:
                    connection.wake_at(now + idle)


def _servicer_providers(context: BuildContext, settings: GrpcSettings) -> list[Any]:
    container = context.container
    if settings.servicers:
        return [
            context.provider(name, f"runtime.grpc.servicers[{index}]")
            for index, name in enumerate(settings.servicers)
        ]
    found = []
    for provider in container.providers.values():
        cls = provided_type(provider)
        if cls is not None and issubclass(cls, purerpc.Servicer):
            found.append(provider)
    if not found:
        raise ConfigError(
            [
                ConfigIssue(
                    context.definition.source,
                    "runtime.grpc.servicers",
                    f"no purerpc.Servicer provider in {container_class(container).__name__}; "
                    "add one or name them here",
                )
            ]
        )
    return found


def build_grpc(context: BuildContext) -> Sequence[Component]:
    """Kind builder: one gRPC server for the container's servicers."""
    settings: GrpcSettings = context.settings
    port = context.definition.port("grpc")
    assert port is not None  # grpc always has a port (default 7070)
    return [
        GrpcServer(
            settings,
            port,
            _servicer_providers(context, settings),
            context.definition.name,
            context.telemetry,
        )
    ]


class ClientChannel:
    """A purerpc channel to ``[clients.<name>]``, as a lifecycle component.

    Pass it to a generated stub (``GreeterStub(channel)``). It connects on
    the first call, and again after the connection ends (the server drained
    or restarted), so a service starts even while its peers are down. A call
    while the target is unreachable fails within ``connect_timeout`` with an
    :class:`~mikros_trio.RPCError` naming the client, never hangs. Declare
    it with :func:`client`.
    """

    #: Seconds a call waits for the connection before failing.
    connect_timeout = 5.0

    def __init__(
        self, name: str, definition: Definition, telemetry: Telemetry | None = None
    ) -> None:
        settings = definition.clients[name]
        self.name = name
        self._telemetry = telemetry or Telemetry(definition.name)
        self._host = settings.host
        self._port = settings.port
        self._socket: ClientSocket | None = None
        self._lock = trio.Lock()
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None

    @property
    def _grpc_socket(self) -> ClientChannel:
        # purerpc's Client calls ``channel._grpc_socket.start_request``.
        return self

    async def __aenter__(self) -> ClientChannel:
        """Open the nursery connections live in (no network yet).

        An async context manager rather than start/shutdown hooks: the
        supervisor always exits it, even on a forced exit, which a nursery
        needs.
        """
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the connection; calls after this fail."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        self._nursery = None
        await self._stack.aclose()

    async def start_request(
        self,
        scheme: str,
        service_name: str,
        method_name: str,
        *args: Any,
        custom_metadata: Sequence[tuple[str, Any]] = (),
        **kwargs: Any,
    ) -> Any:
        """Start a stream on the live connection, connecting first if needed.

        The call is reported to the service's telemetry (a client call: what
        observers add to ``call.outgoing``, such as a ``traceparent``, goes
        out as request metadata) and ends when its response does.
        """
        telemetry = self._telemetry
        if not telemetry.observers:
            return await self._start(
                scheme, service_name, method_name, args, kwargs, custom_metadata
            )
        call = telemetry.begin("grpc", "client", f"/{service_name}/{method_name}", target=self.name)
        if call.outgoing:
            custom_metadata = (*custom_metadata, *call.outgoing.items())
        try:
            stream = await self._start(
                scheme, service_name, method_name, args, kwargs, custom_metadata
            )
        except BaseException as error:
            telemetry.end(call, StatusCode.UNAVAILABLE.name, failed=True, error=error)
            raise

        def on_end(code: str, message: str) -> None:
            # A Mikros error travels as UNKNOWN (or any code): its kind says
            # whose fault it is, as it does for the server's own record.
            failed = StatusCode[code] in SERVER_FAULTS
            wire = mikros_wire(message) if message.startswith("{") else None
            if wire is not None:
                call.error_kind = ServiceError.from_wire(wire).kind
                failed = call.error_kind in INTERNAL_KINDS
            telemetry.end(call, code, failed=failed)

        stream.on_end = on_end
        return stream

    async def _start(
        self,
        scheme: str,
        service_name: str,
        method_name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        custom_metadata: Sequence[tuple[str, Any]],
    ) -> Any:
        metadata = tuple(custom_metadata)

        async def start(socket: ClientSocket) -> Any:
            return await socket.start_request(
                scheme, service_name, method_name, *args, custom_metadata=metadata, **kwargs
            )

        socket = await self._connected()
        try:
            stream = await start(socket)
        except Exception:
            # The connection died between calls (or the server sent GOAWAY):
            # nothing of this request left; reconnect once and start it again.
            socket.ended.set()
            stream = await start(await self._connected())
        # A call the server refuses unprocessed is started again, once, on a
        # fresh connection (the stream replays its request).
        stream._retry = lambda: self._connected_then(start)
        return stream

    async def _connected_then(self, start: Callable[[ClientSocket], Awaitable[Any]]) -> Any:
        return await start(await self._connected())

    async def _connected(self) -> ClientSocket:
        async with self._lock:
            if self._socket is None or self._socket.ended.is_set() or self._socket.retired:
                if self._nursery is None:
                    raise RPCError(f"client {self.name!r} is closed", destination=self.name)
                self._socket = await self._nursery.start(self._hold)
            return self._socket

    async def _hold(self, *, task_status: trio.TaskStatus[ClientSocket]) -> None:
        """Connect, hand the socket over, and keep it open until it ends."""
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await anyio.connect_tcp(self._host, self._port)
        except (OSError, trio.TooSlowError) as error:
            reason = "timed out" if isinstance(error, trio.TooSlowError) else str(error)
            raise RPCError(
                f"client {self.name!r}: {self._host}:{self._port} is unavailable ({reason})",
                destination=self.name,
            ) from None
        target = f"{self._host}:{self._port}"
        socket = ClientSocket(GRPCConfiguration(client_side=True), stream, self.name, target)
        started = False
        try:
            async with socket:
                task_status.started(socket)
                started = True
                await socket.ended.wait()
        except Exception as error:
            # Never let a connection's failure out: it would cancel the
            # channel's nursery, which every connection shares.
            if not started:
                raise RPCError(
                    f"client {self.name!r}: {target} is unavailable ({error!r})",
                    destination=self.name,
                ) from error
            if not only(error, GONE):  # the peer went away: the next call reconnects
                log.warning("client %r: connection to %s failed", self.name, target, exc_info=error)
        finally:
            socket.ended.set()
            await anyio.aclose_forcefully(stream)


def client(name: str) -> providers.Singleton[ClientChannel]:
    """A provider of the channel to ``[clients.<name>]``.

    Example::

        class Container(ServiceContainer):
            greeter_channel = mikros_trio.grpc.client("greeter")
            greeter = providers.Singleton(GreeterStub, greeter_channel)

    The channel is a work-processing component: it opens before the
    service's servers start and closes after they drain.
    """
    return providers.Singleton(
        ClientChannel, name, ServiceContainer.definition, ServiceContainer.telemetry
    )


def typed_error(error: RpcFailedError, destination: str = "") -> ServiceError:
    """The Mikros error a failed call carries, typed again (``NotFoundError``…).

    A status whose message is Mikros error JSON — what this server, and
    Mikros Go and Rust services, send — becomes that kind whatever its code
    (as Go main's and Rust's clients read it); any other status, such as Go
    main's ``INTERNAL "internal server error"``, becomes an
    :class:`~mikros_trio.InternalError` with the text as details, as Mikros
    Go's client decodes it (see :meth:`ServiceError.decode`).
    """
    status = error.status
    return ServiceError.decode(
        status.status_message or "", destination=destination, status=status.status_code.name
    )


async def call(
    method: Callable[..., Awaitable[Any]],
    request: Any,
    *,
    destination: str = "",
    metadata: Any = None,
) -> Any:
    """Make a unary call through a stub; a failure raises the typed Mikros error.

    Example (an HTTP handler relaying a greeter's error as the same kind)::

        reply = await mikros_trio.grpc.call(greeter.SayHello, request, destination="greeter")
    """
    try:
        # Without metadata the stub gets the request alone, so a test's fake
        # method with the signature ``(request)`` stands in for a stub's.
        if metadata is None:
            return await method(request)
        return await method(request, metadata=metadata)
    except RpcFailedError as error:
        raise typed_error(error, destination) from error
