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
  the readiness delay the listener closes, every connection gets an HTTP/2
  GOAWAY (clients open no new streams on it), idle connections close at
  once and busy ones when their last RPC ends; at the drain deadline the
  supervisor cancels the rest, and every socket is closed on the way out;
- errors: handlers are called inside ``except Exception`` only, so
  cancellation always propagates. A :class:`~mikros_trio.ServiceError`
  becomes its gRPC code with the Mikros error JSON as the status message;
  any other exception becomes ``INTERNAL`` with an ``InternalError`` JSON.

The server also serves ``grpc.health.v1.Health`` (Check and Watch, for
``""`` and each registered service, read from the supervisor's health) and
server reflection (``grpc.reflection.v1alpha`` and ``v1``).

Servicers come from the container: ``[runtime.grpc] servicers`` names the
providers; when it is empty, every Singleton/Object provider whose class is
a ``purerpc.Servicer`` is served. Requires the ``grpc`` extra.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
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
from hyperframe.frame import GoAwayFrame
from purerpc.grpc_proto import GRPCProtoSocket
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

from ._component import Component, Lifetime, Role
from ._container import BuildContext, ServiceContainer, container_class, provided_type
from ._definition import Definition
from ._grpc_proto import HEALTH, REFLECTION
from ._grpc_services import HealthService, ReflectionService
from ._grpc_wire import (
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
from ._wire import unexpected_error, wire_error
from .errors import ConfigError, ConfigIssue, ErrorKind, RPCError, ServiceError

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

#: gRPC status code for each Mikros error kind.
GRPC_STATUS: dict[ErrorKind, StatusCode] = {
    ErrorKind.VALIDATION: StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: StatusCode.NOT_FOUND,
    ErrorKind.PERMISSION: StatusCode.PERMISSION_DENIED,
    ErrorKind.CONDITION: StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: StatusCode.INTERNAL,
    ErrorKind.RPC: StatusCode.INTERNAL,
    ErrorKind.CUSTOM: StatusCode.INTERNAL,
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


#: Error kinds that are the server's fault (the others are the caller's).
INTERNAL_KINDS = frozenset({ErrorKind.INTERNAL, ErrorKind.RPC, ErrorKind.CUSTOM})


class _Connection:
    """One client connection: its socket, its in-flight RPCs, and a way to end it."""

    __slots__ = ("active", "goaway_sent", "reading", "socket")

    def __init__(self) -> None:
        self.active = 0
        self.goaway_sent = False
        # Cancelled to stop reading new requests once drained; what was
        # written (last responses, the GOAWAY) is still flushed before the
        # socket closes.
        self.reading = trio.CancelScope()
        self.socket: GRPCProtoSocket | None = None

    async def goaway(self) -> None:
        """Tell the client to open no new streams here (HTTP/2 GOAWAY, no error).

        Sent as a bare frame: h2's ``close_connection()`` also moves its
        state machine to CLOSED, after which the streams still in flight
        could neither send their responses nor receive the rest of their
        requests.
        """
        if self.socket is None or self.goaway_sent:
            return
        self.goaway_sent = True
        connection = self.socket._grpc_connection.h2_connection
        last = connection.highest_inbound_stream_id
        self.socket._grpc_connection.last_stream_id = last
        frame = GoAwayFrame(stream_id=0, last_stream_id=last, error_code=0)
        connection._data_to_send += frame.serialize()
        await self.socket._socket.flush()


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
        try:
            await CALLERS[method.signature.cardinality](call, stream)
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
        except Exception as error:
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
        code = StatusCode.UNKNOWN if self.telemetry.grpc_status_unknown else GRPC_STATUS[error.kind]
        return Status(code, json.dumps(wire, separators=(",", ":")))


def _note_error(error: Exception, kind: ErrorKind) -> None:
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
        listener = await anyio.create_tcp_listener(
            local_host=self._settings.host, local_port=self._port
        )
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

                async def accept(
                    one: Any,
                ) -> None:  # anyio types it Listener; each is a SocketListener
                    while True:
                        stream = await one.accept()
                        connections.start_soon(self._serve_connection, dispatcher, stream)

                with self._accept:
                    async with listener, trio.open_nursery() as accepting:
                        for one in listener.listeners:
                            accepting.start_soon(accept, one)
            nursery.cancel_scope.cancel()

    async def _drain(self) -> None:
        self._draining = True
        self._accept.cancel()
        for connection in list(self._connections):
            await connection.goaway()
            if connection.active == 0:
                connection.reading.cancel()

    async def _serve_connection(self, dispatcher: _Dispatcher, stream: Any) -> None:
        connection = _Connection()
        self._connections.add(connection)
        config = GRPCConfiguration(
            client_side=False, max_message_length=self._settings.max_message_size
        )
        try:
            async with AsyncExitStack() as stack:
                socket = await stack.enter_async_context(ServerSocket(config, stream))
                stack.callback(abandon_streams, socket)
                connection.socket = socket
                if self._draining:
                    await connection.goaway()
                    return
                async with trio.open_nursery() as rpcs:
                    with connection.reading:
                        async for grpc_stream in socket.listen():
                            connection.active += 1
                            rpcs.start_soon(self._serve_rpc, dispatcher, connection, grpc_stream)
                    # The client closed the connection, or it drained: no stream
                    # gets more requests (handlers waiting for one get end-of-stream).
                    abandon_streams(socket)
        except* GONE:
            pass  # the client went away or broke the protocol: only its connection ends
        except* h2.exceptions.ProtocolError as group:
            # Not HTTP/2, or HTTP/2 broken: the client's fault, not worth a warning.
            log.debug("gRPC connection dropped: %s", group.exceptions[0])
        except* Exception as group:
            log.warning("gRPC connection failed", exc_info=group)
        finally:
            self._connections.discard(connection)
            await anyio.aclose_forcefully(stream)

    async def _serve_rpc(
        self, dispatcher: _Dispatcher, connection: _Connection, stream: Any
    ) -> None:
        try:
            with trio.CancelScope() as stream._handler:
                if stream._reset:  # the client cancelled the call before it began
                    stream._handler.cancel()
                await dispatcher(stream)
        except GONE:
            pass  # the stream or the connection ended under the handler
        finally:
            stream.release()
            connection.active -= 1
            if self._draining and connection.active == 0:
                connection.reading.cancel()


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
    assert port is not None  # grpc always has a port (default 50051)
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

        def on_end(code: str) -> None:
            telemetry.end(call, code, failed=StatusCode[code] in SERVER_FAULTS)

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
        socket = await self._connected()
        try:
            return await socket.start_request(
                scheme, service_name, method_name, *args, custom_metadata=metadata, **kwargs
            )
        except Exception:
            # The connection died between calls (or the server sent GOAWAY):
            # nothing of this request left; reconnect once and start it again.
            socket.ended.set()
            socket = await self._connected()
            return await socket.start_request(
                scheme, service_name, method_name, *args, custom_metadata=metadata, **kwargs
            )

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
    Mikros Go and Rust services, send — becomes that kind; any other status
    becomes an :class:`~mikros_trio.RPCError` naming the code.
    """
    status = error.status
    try:
        wire = json.loads(status.status_message or "")
    except ValueError:
        wire = None
    if isinstance(wire, dict) and "kind" in wire:
        typed = ServiceError.from_wire(wire)
        typed.destination = typed.destination or destination
        return typed
    return RPCError(
        f"{destination or 'peer'} answered {status.status_code.name}: {status.status_message}",
        destination=destination,
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
        return await method(request, metadata=metadata)
    except RpcFailedError as error:
        raise typed_error(error, destination) from error
