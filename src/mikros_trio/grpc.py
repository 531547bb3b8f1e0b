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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
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
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import GRPCStreamState
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import (
    GRPCError,
    MessageTooLargeError,
    ProtocolError,
    RpcFailedError,
)
from purerpc.grpclib.status import Status, StatusCode
from purerpc.rpc import Cardinality, RPCSignature
from purerpc.wrappers import (
    call_server_unary_stream,
    call_server_unary_unary,
    send_multiple_messages_server,
    send_single_message_server,
    stream_to_async_iterator,
)

from ._component import Component, Lifetime, Role
from ._container import BuildContext, ServiceContainer, container_class, provided_type
from ._definition import Definition
from ._grpc_proto import HEALTH, REFLECTION
from ._health import Health
from ._runtime_settings import GrpcSettings
from .errors import ConfigError, ConfigIssue, ErrorKind, InternalError, RPCError, ServiceError

__all__ = [
    "GRPC_STATUS",
    "ClientChannel",
    "GrpcServer",
    "build_grpc",
    "call",
    "client",
    "status_for",
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


# Errors that mean "this peer or this stream is gone", never a bug of ours.
_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, GRPCError)


def status_for(error: ServiceError, service_name: str) -> Status:
    """The gRPC status carrying ``error``: its code, and the Mikros JSON as message."""
    wire = error.to_wire()
    wire.setdefault("service_name", service_name)
    return Status(GRPC_STATUS[error.kind], json.dumps(wire, separators=(",", ":")))


class _Stream(GRPCProtoStream):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's stream, whose event queue is closed once nothing uses it any more.

    purerpc never closes the anyio memory stream that carries a stream's
    events, and anyio warns (``ResourceWarning``) for each one collected
    unclosed: two per RPC. The connection's reader is done with the queue
    when the stream is closed both ways or the connection ends
    (:meth:`abandon`); the consumer (handler or caller) when it has read
    the end of the stream or, on a server, when its handler returned
    (:meth:`release`). The sending half closes when the reader is done (a
    consumer still gets what was queued, then end-of-stream); the
    receiving half once both are.
    """

    _consumed = False
    #: Server side: the handler's cancel scope, and whether the client reset the stream.
    _handler: trio.CancelScope | None = None
    _reset = False

    async def receive_event(self) -> Any:
        # purerpc's GRPCProtoStream.receive_event over GRPCStream._receive,
        # plus the queue's end and the _TooLarge event.
        try:
            event = await self._incoming_events[1].receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self.release()
            if self.client_side:  # the connection ended before the response did
                raise self._grpc_socket.lost() from None
            raise
        if isinstance(event, MessageReceived):
            self._grpc_connection.acknowledge_received_data(
                self._stream_id, event.flow_controlled_length
            )
            await self._socket.flush()
            message_type = getattr(self, "_incoming_message_type", None)
            if message_type is not None:
                event.data = message_type.FromString(event.data)
        elif isinstance(event, RequestEnded | ResponseEnded):
            self._end_stream_event = event
            self.release()
        elif isinstance(event, _TooLarge):
            raise RpcFailedError(Status(StatusCode.RESOURCE_EXHAUSTED, event.message))
        else:
            self._start_stream_event = event
        return event

    def _close_remote(self) -> None:
        super()._close_remote()
        if self._state is GRPCStreamState.CLOSED:
            self.abandon()

    def _close_local(self) -> None:
        super()._close_local()
        if self._state is GRPCStreamState.CLOSED:
            self.abandon()

    def release(self) -> None:
        """The consumer reads no more events."""
        self._consumed = True
        if self._incoming_events[0]._closed:
            self._incoming_events[1].close()

    def abandon(self) -> None:
        """No more events will be queued (the stream or its connection ended)."""
        self._incoming_events[0].close()
        if self._consumed:
            self._incoming_events[1].close()

    def reset(self) -> None:
        """The client reset the stream (it cancelled the call): its handler is cancelled."""
        self._reset = True
        self._grpc_socket._streams.pop(self._stream_id, None)
        self.abandon()
        if self._handler is not None:
            self._handler.cancel()


class _TooLarge:
    """Stream event: the request's next message is over ``max_message_size``."""

    __slots__ = ("message", "stream_id")

    def __init__(self, stream_id: int, message: str) -> None:
        self.stream_id = stream_id
        self.message = message


class _Reset:
    """Stream event: the client reset the stream (RST_STREAM)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _Dropped:
    """Read buffer of a stream whose requests are no longer read: data is acknowledged, dropped."""

    def __init__(self, h2_connection: Any, stream_id: int) -> None:
        self._h2 = h2_connection
        self._stream_id = stream_id

    def data_received(self, data: bytes, flow_controlled_length: int | None = None) -> None:
        self._h2.acknowledge_received_data(flow_controlled_length or len(data), self._stream_id)

    def read_all_complete_messages_flowcontrol(self) -> list[Any]:
        return []


class _ServerConnection(GRPCConnection):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's server protocol state, with a bad request confined to its own stream.

    purerpc raises out of the connection's reader, ending every call on it,
    when one request has unusable headers or a message over the size limit;
    here the first resets that stream, the second answers it
    RESOURCE_EXHAUSTED. A request with no body at all (HEADERS carrying
    END_STREAM: zero messages) is a request, not an error. purerpc ignores
    a client's RST_STREAM, leaving the handler waiting for requests that
    cannot come; here it cancels the handler.
    """

    #: Set when this server sent GOAWAY: streams the client opens above it
    #: are refused (REFUSED_STREAM, so the client may safely retry them
    #: elsewhere), never run.
    last_stream_id: int | None = None

    def _request_received(self, event: h2.events.RequestReceived) -> list[Any]:
        event.stream_ended = None  # h2 also reports the StreamEnded on its own
        if self.last_stream_id is not None and event.stream_id > self.last_stream_id:
            self._drop(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return []
        try:
            return list(super()._request_received(event))
        except (ProtocolError, KeyError, ValueError):  # what purerpc's header parsing raises
            self._drop(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return []

    def _drop(self, stream_id: int, error_code: Any) -> None:
        """Reset a stream that will not run; its data is acknowledged and dropped."""
        self.h2_connection.reset_stream(stream_id, error_code)
        self.message_read_buffers[stream_id] = _Dropped(self.h2_connection, stream_id)

    def _data_received(self, event: h2.events.DataReceived) -> list[Any]:
        if event.stream_id not in self.message_read_buffers:  # reset, or ended already
            _Dropped(self.h2_connection, event.stream_id).data_received(
                event.data, event.flow_controlled_length
            )
            return []
        try:
            return list(super()._data_received(event))
        except MessageTooLargeError as error:
            dropped = _Dropped(self.h2_connection, event.stream_id)
            dropped.data_received(event.data, event.flow_controlled_length)
            self.message_read_buffers[event.stream_id] = dropped
            return [_TooLarge(event.stream_id, str(error))]

    def _stream_ended(self, event: h2.events.StreamEnded) -> list[Any]:
        if isinstance(self.message_read_buffers.get(event.stream_id), _Dropped):
            del self.message_read_buffers[event.stream_id]
            return [RequestEnded(event.stream_id)]  # (dropped if it never had a stream)
        return list(super()._stream_ended(event))

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Any]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [_Reset(event.stream_id)]


class _ServerSocket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's server socket with :class:`_Stream` streams and :class:`_ServerConnection`."""

    StreamClass = _Stream

    def __init__(self, config: GRPCConfiguration, stream: Any) -> None:
        super().__init__(config, stream)
        self._grpc_connection = self._socket._grpc_connection = _ServerConnection(config)

    async def _listen(self) -> AsyncIterator[_Stream]:
        """purerpc's reader loop, yielding each new stream; events reach their stream in order.

        Unlike purerpc's, it skips events for a stream that is gone (reset,
        or closed both ways earlier in the same read) instead of failing
        the whole connection on them, and acts on :class:`_Reset`.
        """
        while True:
            try:
                data = await self._socket.recv(self._receive_buffer_size)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            events = self._grpc_connection.receive_data(data)
            await self._socket.flush()
            for event in events:
                if isinstance(event, WindowUpdated) and event.stream_id == 0:
                    for each in list(self._streams.values()):
                        await each._set_flow_control_update()
                    continue
                if isinstance(event, RequestReceived):
                    self._allocate_stream(event.stream_id)
                stream = self._streams.get(event.stream_id)
                if stream is None:
                    continue
                if isinstance(event, WindowUpdated):
                    await stream._set_flow_control_update()
                elif isinstance(event, _Reset):
                    stream.reset()
                else:
                    await stream._incoming_events[0].send(event)
                    if isinstance(event, RequestReceived):
                        yield stream
                    elif isinstance(event, RequestEnded):
                        stream._close_remote()


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
    """Routes each stream to its method; errors become statuses, cancellation propagates."""

    def __init__(self, services: dict[str, purerpc.Service], service_name: str) -> None:
        self.services = services
        self.service_name = service_name

    async def __call__(self, stream: Any) -> None:
        await stream.start_response()
        event = await stream.receive_event()
        if not isinstance(event, RequestReceived):
            await stream.close(Status(StatusCode.INTERNAL, "expected request headers"))
            return
        service = self.services.get(event.service_name)
        method = service.methods.get(event.method_name) if service is not None else None
        if method is None:
            await stream.close(
                Status(
                    StatusCode.UNIMPLEMENTED,
                    f"method {event.service_name}/{event.method_name} is not implemented",
                )
            )
            return
        call = functools.partial(method.method_fn, request=event)
        stream.expect_message_type(method.signature.request_type)
        try:
            await _CALLERS[method.signature.cardinality](call, stream)
            return
        # RpcFailedError and ProtocolError are GRPCErrors too: they come first.
        except RpcFailedError as error:
            status = error.status  # the handler's own status, or a peer's it let through
        except MessageTooLargeError as error:  # a response over max_message_size
            status = Status(StatusCode.RESOURCE_EXHAUSTED, str(error))
        except ProtocolError as error:  # the request broke gRPC's framing rules
            status = Status(StatusCode.INTERNAL, f"malformed request: {error}")
        except ServiceError as error:
            status = status_for(error, self.service_name)
        except Exception as error:
            if isinstance(error, h2.exceptions.StreamClosedError) or _stream_gone(stream):
                return  # the client reset the stream or went away: nobody to answer
            log.error(
                "unhandled error in %s/%s", event.service_name, event.method_name, exc_info=error
            )
            internal = InternalError(
                "internal error",
                details=f"{type(error).__name__}: {error}",
            )
            status = status_for(internal, self.service_name)
        if _stream_gone(stream):
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):  # the client reset the stream
            await stream.close(status)


def _stream_gone(stream: Any) -> bool:
    """True when nothing more can be sent on ``stream``: answered, or its connection ended."""
    return bool(
        stream.state in (GRPCStreamState.HALF_CLOSED_LOCAL, GRPCStreamState.CLOSED)
        or stream._incoming_events[0]._closed
    )


async def _call_stream_unary(func: Callable[[Any], Any], stream: Any) -> None:
    """purerpc's ``call_server_stream_unary``, closing the request iterator when done.

    A handler may stop reading requests early (or fail); unclosed, the
    iterator is finalized by the garbage collector, which Trio reports
    with a ``ResourceWarning``.
    """
    async with contextlib.aclosing(stream_to_async_iterator(stream)) as requests:
        await send_single_message_server(stream, await func(requests))


async def _call_stream_stream(func: Callable[[Any], Any], stream: Any) -> None:
    """purerpc's ``call_server_stream_stream``, closing the request iterator when done."""
    async with contextlib.aclosing(stream_to_async_iterator(stream)) as requests:
        await send_multiple_messages_server(stream, func(requests))


_CALLERS = {
    Cardinality.UNARY_UNARY: call_server_unary_unary,
    Cardinality.UNARY_STREAM: call_server_unary_stream,
    Cardinality.STREAM_UNARY: _call_stream_unary,
    Cardinality.STREAM_STREAM: _call_stream_stream,
}


class _Health:
    """``grpc.health.v1.Health`` over the supervisor's health state."""

    def __init__(self, health: Health, lifetime: Lifetime, names: Iterable[str]) -> None:
        self._health = health
        self._lifetime = lifetime
        self._names = {"", *names}
        self._response = HEALTH["HealthCheckResponse"]

    def _status(self, service: str) -> int:
        statuses = self._response.ServingStatus
        if service not in self._names:
            return int(statuses.Value("SERVICE_UNKNOWN"))
        return int(statuses.Value("SERVING" if self._health.ready else "NOT_SERVING"))

    async def check(self, request: Any) -> Any:
        status = self._status(request.service)
        if status == self._response.ServingStatus.Value("SERVICE_UNKNOWN"):
            raise RpcFailedError(
                Status(StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
            )
        return self._response(status=status)

    async def watch(self, request: Any) -> AsyncIterator[Any]:
        # Ends when this server starts draining: a watch is not work to
        # wait for, and the last status it sent was NOT_SERVING.
        version = self._health.version
        last = self._status(request.service)
        yield self._response(status=last)
        while not self._lifetime.stopping:
            version = await self._health.wait_changed(version)
            status = self._status(request.service)
            if status != last:
                last = status
                yield self._response(status=status)

    def service(self) -> purerpc.Service:
        service = purerpc.Service(HEALTH.service_name)
        request, response = HEALTH["HealthCheckRequest"], HEALTH["HealthCheckResponse"]
        service.add_method(
            "Check", self.check, RPCSignature(Cardinality.UNARY_UNARY, request, response)
        )
        service.add_method(
            "Watch", self.watch, RPCSignature(Cardinality.UNARY_STREAM, request, response)
        )
        return service


class _Reflection:
    """Server reflection: lists services and serves their file descriptors."""

    def __init__(self, services: dict[str, purerpc.Service]) -> None:
        self._services = services
        self._files: dict[str, Any] = {}  # file name → FileDescriptor
        self._symbols: dict[str, Any] = {}
        for service in services.values():
            for method in service.methods.values():
                for message in (method.signature.request_type, method.signature.response_type):
                    descriptor = getattr(message, "DESCRIPTOR", None)
                    if descriptor is not None:
                        self._add_file(descriptor.file)
                        self._symbols.setdefault(service.name, descriptor.file)
        for proto in (HEALTH, *REFLECTION.values()):
            self._add_file(proto.file)
            self._symbols[proto.service_name] = proto.file

    def _add_file(self, file: Any) -> None:
        if file.name in self._files:
            return
        self._files[file.name] = file
        for message in file.message_types_by_name.values():
            self._symbols[message.full_name] = file
        for enum in file.enum_types_by_name.values():
            self._symbols[enum.full_name] = file
        for service in file.services_by_name.values():
            self._symbols[service.full_name] = file
            for method in service.methods:
                self._symbols[method.full_name] = file
        for dependency in file.dependencies:
            self._add_file(dependency)

    def _with_dependencies(self, file: Any) -> list[bytes]:
        out: list[bytes] = []
        seen: set[str] = set()
        stack = [file]
        while stack:
            current = stack.pop()
            if current.name in seen:
                continue
            seen.add(current.name)
            out.append(current.serialized_pb)
            stack.extend(current.dependencies)
        return out

    def _answer(self, messages: Any, request: Any) -> Any:
        response = messages["ServerReflectionResponse"](
            valid_host=request.host, original_request=request
        )
        which = request.WhichOneof("message_request")
        file = None
        if which == "list_services":
            names = sorted(self._services)
            response.list_services_response.service.extend(
                messages["ServiceResponse"](name=name) for name in names
            )
            return response
        if which == "file_by_filename":
            file = self._files.get(request.file_by_filename)
        elif which == "file_containing_symbol":
            file = self._symbols.get(request.file_containing_symbol)
        if file is None:
            response.error_response.error_code = StatusCode.NOT_FOUND.value
            response.error_response.error_message = f"not found: {which}"
            return response
        response.file_descriptor_response.file_descriptor_proto.extend(
            self._with_dependencies(file)
        )
        return response

    def service(self, version: str) -> purerpc.Service:
        proto = REFLECTION[version]
        messages = proto.messages

        async def info(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                yield self._answer(messages, request)

        service = purerpc.Service(proto.service_name)
        service.add_method(
            "ServerReflectionInfo",
            info,
            RPCSignature(
                Cardinality.STREAM_STREAM,
                messages["ServerReflectionRequest"],
                messages["ServerReflectionResponse"],
            ),
        )
        return service


class GrpcServer(Component):
    """The service's gRPC server: user servicers plus health and reflection."""

    role = Role.GENERATING

    def __init__(
        self,
        settings: GrpcSettings,
        port: int,
        servicers: Sequence[Callable[[], Any]],
        service_name: str,
    ) -> None:
        self.name = "grpc"
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
        services[HEALTH.service_name] = _Health(lifetime.health, lifetime, user).service()
        reflection = _Reflection(services)
        for version in REFLECTION:
            service = reflection.service(version)
            services[service.name] = service
        return services

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        dispatcher = _Dispatcher(self._services(lifetime), self._service_name)
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
                socket = await stack.enter_async_context(_ServerSocket(config, stream))
                stack.callback(_abandon_streams, socket)
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
                    _abandon_streams(socket)
        except* _GONE:
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
        except _GONE:
            pass  # the stream or the connection ended under the handler
        finally:
            stream.release()
            connection.active -= 1
            if self._draining and connection.active == 0:
                connection.reading.cancel()


def _only(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """True if ``error`` (or every leaf of an exception group) is one of ``kinds``."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(kinds)[1] is None
    return isinstance(error, kinds)


def _abandon_streams(socket: GRPCProtoSocket) -> None:
    """The connection ended: no stream still open on it gets more events."""
    for stream in list(socket._streams.values()):
        stream.abandon()


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
        GrpcServer(settings, port, _servicer_providers(context, settings), context.definition.name)
    ]


class _ClientSocket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's client socket, made to fail its streams when the connection ends.

    purerpc's reader just returns when the server closes the connection,
    leaving every stream waiting for a response that cannot come; here
    their queues are closed, so each caller gets an :class:`RPCError`
    instead of a hang.

    A GOAWAY from the server (it is draining) only retires the connection:
    h2 would move it to CLOSED and refuse the rest of the responses still
    in flight, which the server is finishing. Streams the server says it
    will not process fail at once; new calls go to a new connection.
    """

    StreamClass = _Stream

    def __init__(self, config: GRPCConfiguration, stream: Any, name: str, target: str) -> None:
        super().__init__(config, stream)
        self.ended = trio.Event()
        #: Set when the server sent GOAWAY: it takes no new streams here.
        self.retired = False
        self._name = name
        self._target = target
        h2_connection = self._grpc_connection.h2_connection
        h2_connection._frame_dispatch_table[GoAwayFrame] = self._receive_goaway

    def _receive_goaway(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        self.retired = True
        for stream_id, stream in list(self._streams.items()):
            if stream_id > frame.last_stream_id:
                stream.abandon()
        return [], []

    def lost(self) -> RPCError:
        """The error of a call whose connection ended before its response did."""
        return RPCError(
            f"client {self._name!r}: the connection to {self._target} ended mid-call",
            destination=self._name,
        )

    async def _reader_thread(self) -> None:
        try:
            await super()._reader_thread()
        except _GONE:
            pass
        finally:
            self.ended.set()
            _abandon_streams(self)


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

    def __init__(self, name: str, definition: Definition) -> None:
        settings = definition.clients[name]
        self.name = name
        self._host = settings.host
        self._port = settings.port
        self._socket: _ClientSocket | None = None
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

    async def start_request(self, *args: Any, **kwargs: Any) -> Any:
        """Start a stream on the live connection, connecting first if needed."""
        socket = await self._connected()
        try:
            return await socket.start_request(*args, **kwargs)
        except Exception:
            # The connection died between calls (or the server sent GOAWAY):
            # nothing of this request left; reconnect once and start it again.
            socket.ended.set()
            socket = await self._connected()
            return await socket.start_request(*args, **kwargs)

    async def _connected(self) -> _ClientSocket:
        async with self._lock:
            if self._socket is None or self._socket.ended.is_set() or self._socket.retired:
                if self._nursery is None:
                    raise RPCError(f"client {self.name!r} is closed", destination=self.name)
                self._socket = await self._nursery.start(self._hold)
            return self._socket

    async def _hold(self, *, task_status: trio.TaskStatus[_ClientSocket]) -> None:
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
        socket = _ClientSocket(GRPCConfiguration(client_side=True), stream, self.name, target)
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
            if not _only(error, _GONE):  # the peer went away: the next call reconnects
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
    return providers.Singleton(ClientChannel, name, ServiceContainer.definition)


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
