"""purerpc's protocol pieces, adapted so one bad stream or a lost peer never hangs a call.

purerpc (0.8, in maintenance) raises out of a connection's reader for
problems of one stream, ignores RST_STREAM, never closes its per-stream
event queues, and leaves calls waiting when the connection ends. The
subclasses here correct each of those; every override says which purerpc
behaviour it replaces. Used by :mod:`mikros_trio.grpc` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import h2.errors
import h2.events
import h2.exceptions
import trio
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
from purerpc.rpc import Cardinality
from purerpc.wrappers import (
    call_server_unary_stream,
    call_server_unary_unary,
    send_multiple_messages_server,
    send_single_message_server,
    stream_to_async_iterator,
)

from .errors import RPCError

__all__ = [
    "CALLERS",
    "GONE",
    "ClientSocket",
    "ServerSocket",
    "abandon_streams",
    "call_stream_stream",
    "call_stream_unary",
    "only",
    "stream_gone",
]

# Errors that mean "this peer or this stream is gone", never a bug of ours.
GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, GRPCError)


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
    #: Client side: told the call's final status code name, once (telemetry).
    on_end: Callable[[str], None] | None = None

    def _ended(self, code: str) -> None:
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(code)

    async def receive_event(self) -> Any:
        # purerpc's GRPCProtoStream.receive_event over GRPCStream._receive,
        # plus the queue's end and the _TooLarge event.
        try:
            event = await self._incoming_events[1].receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self.release()
            if self.client_side:  # the connection ended before the response did
                self._ended("UNAVAILABLE")
                raise self._grpc_socket.lost() from None
            raise
        except trio.Cancelled:
            self._ended("CANCELLED")  # the caller gave up waiting
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
            if isinstance(event, ResponseEnded):
                self._ended(StatusCode(event.status.status_code).name)
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


class ServerSocket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
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


def stream_gone(stream: Any) -> bool:
    """True when nothing more can be sent on ``stream``: answered, or its connection ended."""
    return bool(
        stream.state in (GRPCStreamState.HALF_CLOSED_LOCAL, GRPCStreamState.CLOSED)
        or stream._incoming_events[0]._closed
    )


async def call_stream_unary(func: Callable[[Any], Any], stream: Any) -> None:
    """purerpc's ``call_server_stream_unary``, closing the request iterator when done.

    A handler may stop reading requests early (or fail); unclosed, the
    iterator is finalized by the garbage collector, which Trio reports
    with a ``ResourceWarning``.
    """
    async with contextlib.aclosing(stream_to_async_iterator(stream)) as requests:
        await send_single_message_server(stream, await func(requests))


async def call_stream_stream(func: Callable[[Any], Any], stream: Any) -> None:
    """purerpc's ``call_server_stream_stream``, closing the request iterator when done."""
    async with contextlib.aclosing(stream_to_async_iterator(stream)) as requests:
        await send_multiple_messages_server(stream, func(requests))


CALLERS = {
    Cardinality.UNARY_UNARY: call_server_unary_unary,
    Cardinality.UNARY_STREAM: call_server_unary_stream,
    Cardinality.STREAM_UNARY: call_stream_unary,
    Cardinality.STREAM_STREAM: call_stream_stream,
}


def only(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """True if ``error`` (or every leaf of an exception group) is one of ``kinds``."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(kinds)[1] is None
    return isinstance(error, kinds)


def abandon_streams(socket: GRPCProtoSocket) -> None:
    """The connection ended: no stream still open on it gets more events."""
    for stream in list(socket._streams.values()):
        stream.abandon()


class ClientSocket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
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
        except GONE:
            pass
        finally:
            self.ended.set()
            abandon_streams(self)
