"""hypercorn's protocol layer, for what the HTTP/1.1 path hands over: TLS, HTTP/2, upgrades.

Imported on the first such connection (or at start with TLS configured), so
a service whose clients speak plain HTTP/1.1 never loads hypercorn, h2 or
wsproto.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr

from ._http_h2 import Protocols
from ._http_h11 import SEND_SLICE, Endpoint, socket_has_bytes
from ._runtime_settings import HttpSettings

__all__ = ["HyperConnection", "Hypercorn", "hypercorn_config"]

log = logging.getLogger("mikros_trio.http")


class Hypercorn:
    """One endpoint's share of hypercorn: its config, the app as hypercorn calls it, a context."""

    def __init__(self, app: Any, settings: HttpSettings) -> None:
        self.app = ASGIWrapper(app)
        self.config = hypercorn_config(settings)
        self.context = WorkerContext(None)

    async def drain(self) -> None:
        """Every response still to come says ``Connection: close``; keep-alive ends."""
        # hypercorn adds ``Connection: close`` to an HTTP/1.1 response only
        # past keep_alive_max_requests; zero makes every response still to
        # come say so, so clients do not reuse a connection about to close.
        self.config.keep_alive_max_requests = 0
        await self.context.terminated.set()


def hypercorn_config(settings: HttpSettings) -> Config:
    config = Config()
    config.keep_alive_timeout = settings.keep_alive_timeout
    config.read_timeout = math.ceil(settings.read_timeout)
    config.h11_max_incomplete_size = settings.max_header_bytes  # request line + headers
    # Advertised (SETTINGS_MAX_HEADER_LIST_SIZE) and enforced by h2's HPACK
    # decoder: a larger header block ends the connection (GOAWAY).
    config.h2_max_header_list_size = settings.max_header_bytes
    # Advertised and enforced by h2: more streams end the connection.
    config.h2_max_concurrent_streams = settings.h2_max_concurrent_streams
    config.certfile = settings.certfile
    config.keyfile = settings.keyfile
    # The supervisor owns every deadline; hypercorn's own must not fire first.
    config.graceful_timeout = 0
    config.accesslog = None
    config.errorlog = log
    return config


class HyperConnection(TCPServer):
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

    def __init__(
        self, endpoint: Endpoint, hyper: Hypercorn, stream: trio.abc.Stream, initial: bytes = b""
    ) -> None:
        super().__init__(
            hyper.app, hyper.config, hyper.context, ConnectionState(endpoint.state), stream
        )
        self._endpoint = endpoint
        # Bytes the HTTP/1.1 path read before handing the connection over.
        self._initial = initial
        self._send_timeout = endpoint.send_timeout
        self.idle = True  # no request yet
        self.scope = trio.CancelScope()
        self._reading = trio.CancelScope()
        # The reader's current wait for bytes, while there is one (see close_idle).
        self._wait: trio.CancelScope | None = None
        self._read_loop = False  # True once the TLS handshake and protocol setup are done
        # One keep-alive timer for the connection's whole life, re-armed by
        # moving its deadline, where hypercorn spawns a timer task after
        # every response.
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
                        for start in range(0, len(data), SEND_SLICE):
                            sending.deadline = trio.current_time() + self._send_timeout
                            await self.stream.send_all(data[start : start + SEND_SLICE])
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
        return isinstance(stream, trio.SocketStream) and socket_has_bytes(stream.socket)

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
        read_timeout = self._endpoint.read_timeout
        endpoint = self._endpoint
        self._read_loop = True
        with self._reading:
            if self._initial:
                await self.protocol.handle(RawData(self._initial))
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
