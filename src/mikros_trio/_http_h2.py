"""The HTTP kind's HTTP/2 (h2c and TLS+ALPN): hypercorn's protocol with bounds on one connection.

hypercorn 0.17.3 on h2 3.2 bounds the number of streams (h2 enforces the
``MAX_CONCURRENT_STREAMS`` we advertise, ``[runtime.http]
h2_max_concurrent_streams``: a client opening more loses the connection,
GOAWAY PROTOCOL_ERROR) and the header block (more than 64 CONTINUATION
frames, 64 frames of 16 KiB at the frame size we advertise, is a protocol
error), but leaves two costs to the client:

- A stream whose peer never opens its flow-control window parks the
  handler's response in memory forever (300 such streams cost +161 MB).
  A send waiting on flow control longer than ``send_timeout`` resets the
  stream (CANCEL) and frees what it held.
- Nothing limits resets: the 2023 "rapid reset" attack (CVE-2023-44487)
  opens and cancels streams in a loop, each one costing a handler start
  while never counting against the stream limit. More than
  :data:`MAX_RESETS_PER_SECOND` resets from the client in a second end the
  connection with GOAWAY ENHANCE_YOUR_CALM.

It also fixes an ordering race of hypercorn's: a response's end
(``EndBody``) returned once the send task had *taken* the last bytes from
the stream's buffer, before that task sent END_STREAM. The ``StreamClosed``
that follows could then, on a draining connection gone idle, send GOAWAY
and close the h2 connection first; h2 refused the END_STREAM after it, and
the client saw its stream never end (about half of the runs). Here the end
of a response returns only once the send task has sent END_STREAM and
dropped the stream's buffer.
"""

from __future__ import annotations

import contextlib
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, Data, EndBody, EndData
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError
from priority.priority import MissingStreamError

__all__ = ["MAX_RESETS_PER_SECOND", "Protocols"]

#: Stream resets a client may send per second on one connection before it
#: is closed. Browsers cancel a few streams per page; an attack needs thousands.
MAX_RESETS_PER_SECOND = 200

_BODY_EVENTS = (Body, Data, EndBody, EndData)
_END_EVENTS = (EndBody, EndData)


class BoundedH2Protocol(H2Protocol):
    """hypercorn's HTTP/2 protocol with a send timeout and a reset rate limit."""

    def __init__(self, *args: Any, send_timeout: float) -> None:
        super().__init__(*args)
        self._send_timeout = send_timeout
        self._resets = 0
        self._resets_since = trio.current_time()
        # Streams whose response's end waits for the send task to send
        # END_STREAM and drop the stream's buffer; set when it has.
        self._buffer_dropped: dict[int, trio.Event] = {}

    async def handle(self, event: Event) -> None:
        try:
            await super().handle(event)
        finally:
            if isinstance(event, Closed):
                # The send task stops at its next step without dropping the
                # buffers left: nothing is sent any more, so no end waits.
                for dropped in self._buffer_dropped.values():
                    dropped.set()
                self._buffer_dropped.clear()

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            reset = isinstance(event, h2.events.StreamReset) and event.remote_reset
            if reset and self._count_reset():
                await self._calm_down()
                return
        await super()._handle_events(events)

    def _count_reset(self) -> bool:
        """Count one reset; True once the connection went over the rate."""
        now = trio.current_time()
        if now - self._resets_since >= 1.0:
            self._resets, self._resets_since = 0, now
        self._resets += 1
        return self._resets > MAX_RESETS_PER_SECOND

    async def _calm_down(self) -> None:
        self.connection.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        await self._flush()
        await self.send(Closed())

    async def stream_send(self, event: StreamEvent) -> None:
        if not isinstance(event, _BODY_EVENTS):
            return await super().stream_send(event)
        # Body chunks wait for the peer's flow-control window (hypercorn's
        # stream buffer holds two frames, then the handler waits).
        with trio.move_on_after(self._send_timeout) as waiting:
            await super().stream_send(event)
            if isinstance(event, _END_EVENTS):
                # hypercorn's end returns when the last bytes leave the
                # buffer, not when END_STREAM is sent: the StreamClosed
                # that follows must not overtake it (see the module's
                # docstring). Bounded by the same send_timeout.
                await self._until_buffer_dropped(event.stream_id)
        if waiting.cancelled_caught:
            await self._give_up(event.stream_id)
        return None

    async def _until_buffer_dropped(self, stream_id: int) -> None:
        """Wait until the send task has ended ``stream_id`` and dropped its buffer."""
        if self.closed or stream_id not in self.stream_buffers:
            return
        dropped = self._buffer_dropped.setdefault(stream_id, trio.Event())
        await dropped.wait()

    async def _send_data(self, stream_id: int) -> None:
        # The send task's one step for a stream: it drops the buffer after
        # END_STREAM is flushed (or once the stream is found closed).
        try:
            await super()._send_data(stream_id)
        finally:
            if stream_id not in self.stream_buffers:
                dropped = self._buffer_dropped.pop(stream_id, None)
                if dropped is not None:
                    dropped.set()

    async def _give_up(self, stream_id: int) -> None:
        """Reset a stream whose peer stopped reading, and free what it buffered."""
        with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed
            self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        await self._flush()
        buffer = self.stream_buffers.get(stream_id)
        if buffer is not None:
            # Leave the entry: the send task removes it (and its place in
            # the priority tree) once it finds the buffer closed.
            await buffer.close()
            with contextlib.suppress(MissingStreamError):
                self.priority.unblock(stream_id)
            await self.has_data.set()
        await self._close_stream(stream_id)


class Protocols(ProtocolWrapper):
    """hypercorn's choice of protocol per connection, its HTTP/2 one :class:`BoundedH2Protocol`."""

    def __init__(self, *args: Any, alpn_protocol: str | None, send_timeout: float) -> None:
        # Without a protocol name hypercorn's wrapper starts HTTP/1.1 (its
        # own HTTP/2 would be unbounded); HTTP/2 by ALPN is replaced here.
        super().__init__(*args)
        self._send_timeout = send_timeout
        if alpn_protocol == "h2":
            self.protocol = self._h2()

    def _h2(self) -> BoundedH2Protocol:
        return BoundedH2Protocol(
            self.app,
            self.config,
            self.context,
            self.task_group,
            self.state,
            self.ssl,
            self.client,
            self.server,
            self.send,
            send_timeout=self._send_timeout,
        )

    async def handle(self, event: Event) -> None:
        # As hypercorn's, with its HTTP/2 protocol replaced by ours.
        try:
            return await self.protocol.handle(event)
        except H2ProtocolAssumedError as error:
            self.protocol = self._h2()
            await self.protocol.initiate()
            data = error.data
        except H2CProtocolRequiredError as error:
            self.protocol = self._h2()
            await self.protocol.initiate(error.headers, error.settings)
            data = error.data
        if data:
            await self.protocol.handle(RawData(data=data))
        return None
