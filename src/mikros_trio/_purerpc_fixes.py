"""purerpc's protocol pieces, adapted so one bad stream or a lost peer never hangs a call.

purerpc (0.8, in maintenance) raises out of a connection's reader for
problems of one stream, ignores RST_STREAM, never closes its per-stream
event queues, leaves calls waiting when the connection ends, and bounds
nothing a client can make a server hold (65,536 streams, 1 GiB windows, 16
MiB frames). The subclasses here correct each of those, bound what one
connection may cost (``[runtime.grpc]``), and give the client one retry of
a call the server refused unprocessed; every override says which purerpc
behaviour it replaces. Used by :mod:`mikros_trio.grpc` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.connection import ConnectionInputs, ConnectionState
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import GRPCStreamState, SocketWrapper
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
    raise_status,
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

from ._runtime_settings import GrpcSettings
from .errors import RPCError

__all__ = [
    "CALLERS",
    "GONE",
    "MAX_WINDOW",
    "ClientSocket",
    "ServerSocket",
    "abandon_streams",
    "call_stream_stream",
    "call_stream_unary",
    "only",
    "stream_gone",
]

# Errors that mean "this peer or this stream is gone", never a bug of ours (h2's
# StreamClosedError: writing to a stream the client has reset).
GONE = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    GRPCError,
    h2.exceptions.StreamClosedError,
)

#: Bytes a server connection reads at once.
READ_SIZE = 64 * 1024

#: Bytes of responses queued for one client before its handlers wait (a
#: client that does not read its socket holds no more than this of ours).
OUTBOUND_LIMIT = 1024 * 1024

#: The largest HTTP/2 flow-control window (RFC 9113 section 6.9.1).
MAX_WINDOW = 2**31 - 1


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
    #: Client side: told the call's final status code name and message, once (telemetry).
    on_end: Callable[[str, str], None] | None = None
    #: Server side: take an event already queued without a checkpoint (the
    #: dispatcher sets it while the events left are few and bounded: a
    #: unary request's headers, message and end).
    eager = False

    def _ended(self, code: str, message: str = "") -> None:
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(code, message)

    async def receive_event(self) -> Any:
        # purerpc's GRPCProtoStream.receive_event over GRPCStream._receive,
        # plus the queue's end and the _TooLarge event.
        queue = self._incoming_events[1]
        try:
            if self.eager:
                # anyio's receive checkpoints even with an event waiting: a
                # scheduler pass per event, most of a unary call's passes.
                try:
                    event = queue.receive_nowait()
                except anyio.WouldBlock:
                    event = await queue.receive()
            else:
                event = await queue.receive()
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
                status = event.status
                self._ended(StatusCode(status.status_code).name, status.status_message or "")
        elif isinstance(event, _TooLarge):
            raise RpcFailedError(Status(StatusCode.RESOURCE_EXHAUSTED, event.message))
        elif isinstance(event, _Refused):
            await self._retried()
            return await self.receive_event()
        elif isinstance(event, Status):  # the server reset the stream
            self.release()
            self._ended(StatusCode(event.status_code).name)
            raise_status(event)  # purerpc's typed error, as for a status in trailers
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

    async def _wait_flow_control_update(self) -> None:
        # purerpc waits for the client's WINDOW_UPDATE forever: a client that
        # stops reading would hold the handler (and its response) for good.
        # Only a blocked send pays for this cancel scope, never the fast path.
        limits = getattr(self._grpc_socket, "limits", None)
        if limits is None:  # client side: the caller's own deadline bounds it
            await super()._wait_flow_control_update()
            return
        with trio.move_on_after(limits.send_stall_timeout):
            await super()._wait_flow_control_update()
            return
        await self._stalled()

    async def _stalled(self) -> None:
        """The client has read nothing for send_stall_timeout: reset, as if it had cancelled."""
        self._grpc_socket.refuse(self._stream_id, h2.errors.ErrorCodes.CANCEL)
        await self._socket.flush()
        self.reset()  # cancels the handler
        await trio.lowlevel.checkpoint()

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

    def reset(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """The peer reset the stream.

        On a server the client cancelled the call: its handler is
        cancelled. On a client the caller gets the code's status, or, for
        REFUSED_STREAM (the server did not process it), a retry.
        """
        self._reset = True
        self._grpc_socket._streams.pop(self._stream_id, None)
        if self.client_side:
            if error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                self.refuse()
                return
            code = _RESET_STATUS.get(error_code, StatusCode.INTERNAL)
            self._queue(Status(code, f"stream reset by the server ({error_code})"))
        self.abandon()
        if self._handler is not None:
            self._handler.cancel()

    def _queue(self, event: Any) -> None:
        if not self._incoming_events[0]._closed:
            self._incoming_events[0].send_nowait(event)

    # -- client side: one transparent retry of a refused call ----------------------

    #: Messages sent so far (None once over RETRY_BUFFER), whether the request
    #: side is complete, and how to start the same call again (set by the channel).
    _replay: list[bytes] | None = None
    _replay_size = 0
    _request_done = False
    _retry: Callable[[], Any] | None = None

    def refuse(self) -> None:
        """The server refused this stream unprocessed (REFUSED_STREAM, or above its GOAWAY)."""
        self._grpc_socket._streams.pop(self._stream_id, None)
        self._grpc_socket.retired = True  # the retry goes to a fresh connection
        self._queue(_Refused())
        self.abandon()

    async def send_message(self, message: Any) -> None:
        # grpc-go forgives a client's pings once the server has written to
        # it (grpcio pings to size its window as responses stream in).
        self._grpc_connection.wrote = True
        data = message.SerializeToString()
        if self._replay is not None:
            self._replay_size += len(data)
            if self._replay_size <= RETRY_BUFFER:
                self._replay.append(data)
            else:
                self._replay = None
        socket = self._socket
        if isinstance(socket, _Writer) and socket.pending() > OUTBOUND_LIMIT:
            # A client with wide windows that does not read its socket: the
            # handler waits for the bytes already queued (bounded) instead of
            # queueing more.
            with trio.move_on_after(self._grpc_socket.limits.send_stall_timeout):
                await socket.room()
            if socket.pending() > OUTBOUND_LIMIT:
                await self._stalled()
        await self._send(data)

    async def close(self, *args: Any, **kwargs: Any) -> None:
        self._request_done = True
        await super().close(*args, **kwargs)

    async def _retried(self) -> None:
        """Start this call again on a fresh connection and become that stream.

        Only once, and only for a call whose whole request is kept (all of
        it sent, within RETRY_BUFFER): the server refused it, so it ran
        nowhere, and sending it again cannot run it twice.
        """
        retry, self._retry = self._retry, None
        if retry is None or self._replay is None or not self._request_done:
            self._ended("UNAVAILABLE")
            raise self._grpc_socket.refused()
        again = await retry()
        for data in self._replay:
            await again._send(data)
        await again.close()
        self._incoming_events[1].close()
        on_end = self.on_end
        self.__dict__.update(vars(again))
        self._retry, self.on_end = None, on_end
        # The new connection delivers the stream's events to this object.
        again._grpc_socket._streams[again._stream_id] = self


class _TooLarge:
    """Stream event: the request's next message is over ``max_message_size``."""

    __slots__ = ("message", "stream_id")

    def __init__(self, stream_id: int, message: str) -> None:
        self.stream_id = stream_id
        self.message = message


class _Reset:
    """Stream event: the peer reset the stream (RST_STREAM)."""

    __slots__ = ("error_code", "stream_id")

    def __init__(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class _Refused:
    """Stream event (client side): the server refused the stream unprocessed; retry it."""

    __slots__ = ()


#: gRPC status of a client stream the server reset, by HTTP/2 error code
#: (gRPC's PROTOCOL-HTTP2 mapping); any other code is INTERNAL.
_RESET_STATUS = {
    h2.errors.ErrorCodes.CANCEL: StatusCode.CANCELLED,
    h2.errors.ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}

#: Bytes of request messages a client call keeps to replay it once if the
#: server refuses it unprocessed (grpc's per_rpc_retry_buffer_size default).
RETRY_BUFFER = 256 * 1024


class _Dropped:
    """Read buffer of a stream whose requests are no longer read: data is acknowledged, dropped."""

    def __init__(self, h2_connection: Any, stream_id: int) -> None:
        self._h2 = h2_connection
        self._stream_id = stream_id

    def data_received(self, data: bytes, flow_controlled_length: int | None = None) -> None:
        self._h2.acknowledge_received_data(flow_controlled_length or len(data), self._stream_id)

    def read_all_complete_messages_flowcontrol(self) -> list[Any]:
        return []


class _PingAck:
    """Connection event: the client answered one of our PINGs."""

    __slots__ = ("data", "stream_id")

    def __init__(self, data: bytes) -> None:
        self.stream_id = 0
        self.data = data


class _Abuse(Exception):
    """The client abuses the protocol: GOAWAY ENHANCE_YOUR_CALM naming ``reason``, then close.

    Raised in the middle of h2's parsing, so the rest of the read is not
    worked through; not an h2 ProtocolError, so h2 queues no GOAWAY of its
    own (ours carries the reason).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _H2(h2.connection.H2Connection):  # type: ignore[misc]  # h2 is untyped
    """h2's connection, ignoring WINDOW_UPDATE and RST_STREAM on a stream it has forgotten.

    After an endpoint ends a stream, its peer may still send WINDOW_UPDATE
    or RST_STREAM frames that crossed the END_STREAM; RFC 9113 section 5.1
    says they MUST be ignored. h2 3.2 ignores them only while the closed
    stream is still in ``streams`` (purerpc's monkeypatch of its stream
    state machine). h2 forgets closed streams whenever a new one opens;
    after that, such a frame makes ``_get_stream_by_id`` raise
    StreamClosedError, which h2 turns into a connection error (GOAWAY
    STREAM_CLOSED) unless the stream had been reset, and every RPC on the
    connection dies. grpcio sends a WINDOW_UPDATE on a stream as it reads
    the response's DATA: one that crosses the trailers, arriving after
    another call's HEADERS, was enough.
    """

    def _forgotten(self, stream_id: int) -> bool:
        """True for a stream that was opened (its id is not above the highest) and is gone."""
        if stream_id == 0 or stream_id in self.streams:
            return False
        if self._stream_id_is_outbound(stream_id):
            return bool(stream_id <= self.highest_outbound_stream_id)
        return bool(stream_id <= self.highest_inbound_stream_id)

    def _receive_window_update_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        if self._forgotten(frame.stream_id):
            return [], self.state_machine.process_input(ConnectionInputs.RECV_WINDOW_UPDATE)
        return super()._receive_window_update_frame(frame)  # type: ignore[no-any-return]

    def _receive_rst_stream_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        if self._forgotten(frame.stream_id):
            return [], self.state_machine.process_input(ConnectionInputs.RECV_RST_STREAM)
        return super()._receive_rst_stream_frame(frame)  # type: ignore[no-any-return]


class _ServerH2(_H2):
    """h2's server connection, refusing streams over the limit as it parses them.

    h2 parses a whole read before purerpc sees an event: refusing later
    would leave thousands of streams open meanwhile, and h2 counts open
    streams by walking all of them for each new one (quadratic). It also
    counts the client's PINGs, and spends the reset budget
    (``max_resets_per_second``) on each stream the client resets or opens
    over the limit.
    """

    pings = 0
    max_streams = 0
    budget = 0
    _open_before = 0
    _spent = 0
    _spent_until = 0.0

    @property
    def open_inbound_streams(self) -> int:
        # h2 treats a stream over SETTINGS_MAX_CONCURRENT_STREAMS as an error
        # of the whole connection (every RPC on it dies); RFC 9113 section
        # 5.1.2 allows a stream error, which _receive_headers_frame gives
        # (REFUSED_STREAM). Counting still prunes h2's closed streams, and
        # is kept for that check (h2 asks just before it opens a stream).
        self._open_before = self._open_streams(1)
        return 0

    def spend(self, reason: str) -> None:
        """One reset or refused stream; over the budget, the client is cut off."""
        # HTTP/2 "rapid reset" (CVE-2023-44487): opening and resetting
        # streams costs the client nothing and the server a handler each; a
        # flood of streams over the limit costs as little, and is cut alike.
        now = trio.current_time()
        if now >= self._spent_until:
            self._spent, self._spent_until = 0, now + 1.0
        self._spent += 1
        if self._spent > self.budget:
            raise _Abuse(reason)

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        new = frame.stream_id not in self.streams
        frames, events = super()._receive_headers_frame(frame)
        if new and self._open_before >= self.max_streams:
            self.reset_stream(frame.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            events = [e for e in events if getattr(e, "stream_id", None) != frame.stream_id]
            self.spend("too_many_streams")
        return frames, events

    def _receive_rst_stream_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        self.spend("too_many_resets")  # a reset of a forgotten stream costs the budget too
        return super()._receive_rst_stream_frame(frame)

    def _receive_ping_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        if "ACK" not in frame.flags:
            self.pings += 1
        return super()._receive_ping_frame(frame)  # type: ignore[no-any-return]


class _ServerConnection(GRPCConnection):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's server protocol state, with a bad request confined to its own stream.

    purerpc raises out of the connection's reader, ending every call on it,
    when one request has unusable headers or a message over the size limit;
    here the first resets that stream, the second answers it
    RESOURCE_EXHAUSTED. A request with no body at all (HEADERS carrying
    END_STREAM: zero messages) is a request, not an error. purerpc ignores
    a client's RST_STREAM, leaving the handler waiting for requests that
    cannot come; here it cancels the handler.

    It also bounds what one connection costs (``settings``): streams over
    ``max_concurrent_streams`` are refused; flow-control windows hold one
    message per stream and ``max_connection_buffer`` per connection
    (purerpc opens 1 GiB); frames are at most 16 KiB (purerpc allows 16
    MiB, so 64 CONTINUATION frames could buffer 1 GiB of headers); and a
    client resetting streams too fast, or pinging too often, is cut off
    (:class:`_Abuse`).
    """

    #: Set when a response was written since the client's last ping.
    wrote = False

    #: Set when this server sent its final GOAWAY: streams the client opens
    #: above it are refused (REFUSED_STREAM, so the client may safely retry
    #: them elsewhere), never run.
    last_stream_id: int | None = None

    def __init__(self, config: GRPCConfiguration, settings: GrpcSettings) -> None:
        self.settings = settings
        super().__init__(config)
        # purerpc's h2 connection, replaced by ours with the same configuration.
        self.h2_connection = _ServerH2(vars(self)["h2_connection"].config)
        self.h2_connection.max_streams = settings.max_concurrent_streams
        # A server sends only header blocks it builds itself (":status",
        # content-type, grpc-status, a percent-encoded grpc-message; handlers
        # cannot add metadata): h2's chains of per-header generators that
        # lower-case and re-validate them on every response found nothing to
        # do. What clients send is validated as before.
        config = self.h2_connection.config
        config.normalize_outbound_headers = False
        config.validate_outbound_headers = False
        self.h2_connection.budget = settings.max_resets_per_second
        self.h2_connection.clear_outbound_data_buffer()
        self._set_h2_connection_local_settings()
        #: Handlers running on this connection (counted by the server).
        self.in_flight = 0
        self._strikes = 0
        self._last_ping: float | None = None

    def _set_h2_connection_local_settings(self) -> None:
        settings = getattr(self, "settings", None)
        if settings is None:  # purerpc's __init__: replaced right after
            super()._set_h2_connection_local_settings()
            return
        self.h2_connection.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                # One whole message per stream (purerpc acknowledges data a
                # message at a time): less would stall a max-size message.
                SettingCodes.INITIAL_WINDOW_SIZE: self.stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.MAX_HEADER_LIST_SIZE,
            },
        )

    @property
    def stream_window(self) -> int:
        return min(self.settings.max_message_size + 5, MAX_WINDOW)  # + the 5-byte prefix

    def initiate_connection(self) -> None:
        self.h2_connection.initiate_connection()
        window = max(self.settings.max_connection_buffer, self.stream_window)
        self.h2_connection.increment_flow_control_window(window - 65535)  # RFC 9113's initial

    def receive_data(self, data: bytes) -> list[Any]:
        events: list[Any] = super().receive_data(data)
        h2_connection = self.h2_connection
        if h2_connection.pings:
            pings, h2_connection.pings = h2_connection.pings, 0
            for _ in range(pings):
                if self._ping_too_soon():
                    raise _Abuse("too_many_pings")
        return events

    def _ping_too_soon(self) -> bool:
        """grpc-go's ping enforcement: pings closer than the policy allows are strikes."""
        settings = self.settings
        now = trio.current_time()
        if self.wrote:
            self.wrote = False
            self._strikes, self._last_ping = 0, now
            return False
        if self.in_flight == 0 and not settings.keepalive_permit_without_calls:
            interval = 2 * 3600.0  # grpc-go: an idle connection needs no pinging
        else:
            interval = settings.keepalive_min_time
        last, self._last_ping = self._last_ping, now
        if last is not None and now - last < interval:
            self._strikes += 1
        return self._strikes > settings.max_ping_strikes

    def rpc_started(self) -> None:
        """A handler begins (it will write: grpc-go forgives the client's pings then)."""
        self.in_flight += 1
        self.wrote = True

    def _request_received(self, event: h2.events.RequestReceived) -> list[Any]:
        event.stream_ended = None  # h2 also reports the StreamEnded on its own
        if self.last_stream_id is not None and event.stream_id > self.last_stream_id:
            self.refuse(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return []
        if self.in_flight >= self.settings.max_concurrent_streams:
            # Handlers of streams the client reset still ending (h2 refused
            # the streams over the limit already): refused, so retried.
            self.refuse(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.h2_connection.spend("too_many_streams")
            return []
        try:
            return list(super()._request_received(event))
        except (ProtocolError, KeyError, ValueError):  # what purerpc's header parsing raises
            self.refuse(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return []

    def refuse(self, stream_id: int, error_code: Any) -> None:
        """Reset a stream that will not run (or not go on); nothing of it is kept.

        h2 drops (and acknowledges, for flow control) what the client still
        sends on a stream it reset. The client may have reset or ended the
        stream already in the same read (h2 has then closed it): there is
        nothing left to reset, and h2's StreamClosedError must not end
        every other RPC on the connection.
        """
        self.message_read_buffers.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.ProtocolError):  # closed already
            self.h2_connection.reset_stream(stream_id, error_code)

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

    def _ping_acknowledged(self, event: h2.events.PingAckReceived) -> list[Any]:
        return [_PingAck(bytes(event.ping_data))]


class _Writer(SocketWrapper):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's socket writer, counting the bytes queued and in transit.

    purerpc's writer takes everything queued and sends it; what handlers
    queue meanwhile is unbounded when the client does not read its socket
    (its HTTP/2 windows, which it chooses, can be 2 GiB). Handlers wait for
    :meth:`room` above :data:`OUTBOUND_LIMIT`; the reader never waits, so
    PINGs and the client's own data are still read (and bounded elsewhere).
    """

    in_transit = 0
    _written: trio.Event | None = None
    _flush_event: anyio.Event

    def pending(self) -> int:
        """Bytes queued for the client and not yet written to the socket."""
        return len(self._grpc_connection.h2_connection._data_to_send) + self.in_transit

    async def room(self) -> None:
        """Return once what is pending drops to OUTBOUND_LIMIT."""
        while self.pending() > OUTBOUND_LIMIT and self._running:
            if self._written is None:
                self._written = trio.Event()
            await self._written.wait()

    async def _writer_thread(self) -> None:
        # purerpc's loop, plus in_transit and a wake-up for room().
        while True:
            data = self._grpc_connection.data_to_send()
            if data:
                self.in_transit = len(data)
                await self._stream.send(data)
                self.in_transit = 0
                written, self._written = self._written, None
                if written is not None:
                    written.set()
            elif self._running:
                await self._flush_event.wait()
                self._flush_event = anyio.Event()
            else:
                return


class _Reader(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's socket with our reader loop (:meth:`_listen`), for both sides."""

    StreamClass = _Stream
    #: Why the connection ended for abuse (GOAWAY ENHANCE_YOUR_CALM sent), or
    #: for a protocol error (h2's GOAWAY sent), if it did.
    calm: str | None = None
    broken: str | None = None
    last_read = 0.0
    _pings: dict[bytes, trio.Event]

    async def goaway(self, last_stream_id: int, error_code: int = 0, debug: bytes = b"") -> None:
        """Send GOAWAY as a bare frame.

        h2's ``close_connection()`` also moves its state machine to CLOSED,
        after which the streams still in flight could neither send their
        responses nor receive the rest of their requests.
        """
        frame = GoAwayFrame(
            stream_id=0,
            last_stream_id=last_stream_id,
            error_code=error_code,
            additional_data=debug,
        )
        self._grpc_connection.h2_connection._data_to_send += frame.serialize()
        await self._socket.flush()

    async def _listen(self) -> AsyncIterator[_Stream]:
        """purerpc's reader loop, yielding each new stream; events reach their stream in order.

        Unlike purerpc's, it skips events for a stream that is gone (reset,
        or closed both ways earlier in the same read) instead of failing
        the whole connection on them, acts on :class:`_Reset`, and ends
        the connection on :class:`_Abuse`.
        """
        while True:
            try:
                data = await self._socket.recv(self._receive_buffer_size)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            self.last_read = trio.current_time()
            try:
                events = self._grpc_connection.receive_data(data)
            except _Abuse as abuse:
                self.calm = abuse.reason
                await self.goaway(
                    self._grpc_connection.h2_connection.highest_inbound_stream_id,
                    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                    abuse.reason.encode(),
                )
                return
            except h2.exceptions.ProtocolError as error:
                # Not HTTP/2, or HTTP/2 broken (a CONTINUATION flood, a frame
                # over the size limit): h2 queued a GOAWAY naming the error;
                # returning (not raising) lets the writer send it.
                self.broken = repr(error)
                await self._socket.flush()
                return
            await self._socket.flush()
            for event in events:
                if isinstance(event, WindowUpdated) and event.stream_id == 0:
                    for each in list(self._streams.values()):
                        await each._set_flow_control_update()
                    continue
                if isinstance(event, _PingAck):
                    answered = self._pings.pop(event.data, None)
                    if answered is not None:
                        answered.set()
                    continue
                if isinstance(event, RequestReceived):
                    self._allocate_stream(event.stream_id)
                stream = self._streams.get(event.stream_id)
                if stream is None:
                    continue
                if isinstance(event, WindowUpdated):
                    await stream._set_flow_control_update()
                elif isinstance(event, _Reset):
                    stream.reset(event.error_code)
                else:
                    # Never blocks (the queue is unbounded; what one read can
                    # put in it is bounded by the windows). purerpc's awaited
                    # send checkpoints per event: three scheduler passes per
                    # unary call for nothing, the recv above is this loop's
                    # checkpoint.
                    stream._incoming_events[0].send_nowait(event)
                    if isinstance(event, RequestReceived):
                        yield stream
                    elif isinstance(event, RequestEnded | ResponseEnded):
                        stream._close_remote()


class ServerSocket(_Reader):
    """purerpc's server socket with :class:`_Stream` streams and :class:`_ServerConnection`.

    ``last_read`` is when the client last sent anything (keepalive);
    ``calm`` says why the connection ended for abuse, if it did.
    """

    StreamClass = _Stream

    def __init__(self, config: GRPCConfiguration, stream: Any, settings: GrpcSettings) -> None:
        # Reads of 64 KiB (purerpc: 1 MiB): h2 handles a whole read without
        # a checkpoint, so one read bounds how long a flood holds the loop.
        super().__init__(config, stream, receive_buffer_size=READ_SIZE)
        self.protocol = _ServerConnection(config, settings)
        self._grpc_connection = self.protocol
        self._socket = _Writer(self.protocol, stream)
        self.limits = settings
        self.last_read = trio.current_time()
        self._pings = {}

    def refuse(self, stream_id: int, error_code: Any) -> None:
        self.protocol.refuse(stream_id, error_code)

    @property
    def closed(self) -> bool:
        """True once h2 sends nothing more here (it ended the connection, or the client left)."""
        return bool(self.protocol.h2_connection.state_machine.state is ConnectionState.CLOSED)

    async def ping(self, data: bytes) -> trio.Event | None:
        """Send a PING; the event is set when the client answers it (None if h2 is closed).

        h2 raises for a PING on a closed connection; a drain or a keepalive
        timer reaching a connection h2 has just ended must not fail on it.
        """
        if self.closed:
            return None
        answered = self._pings[data] = trio.Event()
        self.protocol.h2_connection.ping(data)
        await self._socket.flush()
        return answered


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


class _ClientConnection(GRPCConnection):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's client protocol state; a stream the server resets is reported, not ignored.

    Its h2 connection is :class:`_H2`: a server's RST_STREAM that follows
    its trailers (grpcio and grpc-go send one when the client has not ended
    its side) must not end every other call once h2 has forgotten the stream.
    """

    def __init__(self, config: GRPCConfiguration) -> None:
        super().__init__(config)
        # purerpc's h2 connection, replaced by ours with the same configuration.
        self.h2_connection = _H2(vars(self)["h2_connection"].config)
        self.h2_connection.clear_outbound_data_buffer()
        self._set_h2_connection_local_settings()

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Any]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [_Reset(event.stream_id, event.error_code)]


class ClientSocket(_Reader):
    """purerpc's client socket, made to fail its streams when the connection ends.

    purerpc's reader just returns when the server closes the connection,
    leaving every stream waiting for a response that cannot come, and
    ignores RST_STREAM, leaving its call waiting too; here each caller
    gets an error instead of a hang.

    A GOAWAY from the server (it is draining) only retires the connection:
    h2 would move it to CLOSED and refuse the rest of the responses still
    in flight, which the server is finishing. Streams above its last stream
    id, like streams reset REFUSED_STREAM, were not processed: the call is
    started again once on a fresh connection (:meth:`_Stream._retried`).
    """

    def __init__(self, config: GRPCConfiguration, stream: Any, name: str, target: str) -> None:
        super().__init__(config, stream)
        self._grpc_connection = self._socket._grpc_connection = _ClientConnection(config)
        self.ended = trio.Event()
        #: Set when the server sent GOAWAY or refused a stream: no new streams here.
        self.retired = False
        self._name = name
        self._target = target
        self._pings = {}
        h2_connection = self._grpc_connection.h2_connection
        h2_connection._frame_dispatch_table[GoAwayFrame] = self._receive_goaway

    def _receive_goaway(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        self.retired = True
        for stream_id, stream in list(self._streams.items()):
            if stream_id > frame.last_stream_id:
                stream.refuse()
        return [], []

    async def start_request(self, *args: Any, **kwargs: Any) -> _Stream:
        stream: _Stream = await super().start_request(*args, **kwargs)
        stream._replay = []
        return stream

    def lost(self) -> RPCError:
        """The error of a call whose connection ended before its response did."""
        return RPCError(
            f"client {self._name!r}: the connection to {self._target} ended mid-call",
            destination=self._name,
        )

    def refused(self) -> RPCError:
        """The error of a refused call that cannot be retried (or was refused again)."""
        self.retired = True
        return RPCError(
            f"client {self._name!r}: {self._target} refused the call (not processed)",
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
