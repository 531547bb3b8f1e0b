"""psycopg's async connection, driven by Trio instead of asyncio.

psycopg 3 keeps its protocol in sans-io generators (``psycopg.generators``):
each yields what it waits for (the socket readable, writable, or either)
and is resumed with what became ready. ``AsyncConnection`` feeds them
through ``psycopg.waiting.wait_async`` (asyncio's ``add_reader``) and guards
them with an ``asyncio.Lock``; everything else in its async layer (cursors,
transactions, server cursors, COPY with the default writer) only awaits
``conn.wait(...)`` and ``conn.lock``. So :class:`TrioConnection` replaces
exactly those seams, checked against psycopg 3.3's ``AsyncConnection``,
``AsyncCursor`` and ``_acompat``:

- ``wait``: the generator is driven with ``trio.lowlevel.wait_readable`` /
  ``wait_writable`` on the connection's socket (no thread hop per query);
- ``lock``: a ``trio.Lock``;
- ``connect``: the same attempts psycopg makes (one per host and address),
  with names resolved by Trio and each attempt bounded by the timeout;
- ``cancel_safe``: libpq's non-blocking cancel connection, driven the same
  way (a thread running the blocking ``PQcancel`` on a libpq older than 17).

So cursors, transactions, pipeline mode, COPY, ``notifies()`` and
parameters larger than the socket's buffer work (tests/test_postgres.py
runs each). What stays unsupported: ``AsyncQueuedLibpqWriter`` for COPY (it
spawns an asyncio task) and anything that calls ``asyncio`` directly.

Cancellation: a Trio cancel that lands while a query runs on the server
sends the server a cancel request and waits, shielded and bounded by
:data:`CANCEL_TIMEOUT`, for the query to end (``QueryCanceled``), so the
connection is usable again (rolled back by whoever returns it) instead of
stuck ACTIVE; past the bound the connection is closed. Then ``Cancelled``
propagates, as it must.
"""

from __future__ import annotations

import select
import socket
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import trio
from psycopg import errors, pq
from psycopg._capabilities import capabilities
from psycopg._conninfo_utils import get_param, get_param_def, is_ip_address, split_attempts
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.waiting import Ready, Wait

if TYPE_CHECKING:
    from collections.abc import Generator

__all__ = ["CANCEL_TIMEOUT", "TrioConnection", "wait_conn", "wait_fd"]

RV = TypeVar("RV")

#: Seconds a cancelled query gets to end on the server before its connection is closed.
CANCEL_TIMEOUT = 5.0

_WAIT_R = Wait.R
_WAIT_W = Wait.W
_READY_R = Ready.R
_READY_W = Ready.W
_ACTIVE = pq.TransactionStatus.ACTIVE


def _ready_now(fileno: int, state: int) -> int:
    """What of ``state`` (R, W) ``fileno`` is ready for right now (a zero-timeout poll)."""
    poller = select.poll()
    poller.register(
        fileno,
        (select.POLLIN if state & _WAIT_R else 0) | (select.POLLOUT if state & _WAIT_W else 0),
    )
    ready = 0
    for _, events in poller.poll(0):
        if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
            ready |= _READY_R
        if events & select.POLLOUT:
            ready |= _READY_W
    return ready


async def _wait_either(fileno: int) -> int:
    """Wait until ``fileno`` is readable or writable; which one(s) it was.

    psycopg asks for both while it flushes a large message (so it keeps
    reading what the server sends meanwhile); Trio waits for one thing per
    call, so two tasks race. Rare: a query larger than the socket buffer.
    """
    ready = 0

    async def side(wait: Any, flag: int, scope: trio.CancelScope) -> None:
        nonlocal ready
        await wait(fileno)
        ready |= flag
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, trio.lowlevel.wait_readable, _READY_R, nursery.cancel_scope)
        nursery.start_soon(side, trio.lowlevel.wait_writable, _READY_W, nursery.cancel_scope)
    return ready or _ready_now(fileno, Wait.RW)


async def wait_fd(gen: Generator[Wait, Ready | int, RV], fileno: int) -> RV:
    """Drive a psycopg protocol generator on ``fileno`` until it returns its value.

    No timeout here: callers bound it with a Trio cancel scope.
    """
    try:
        state = next(gen)
        while True:
            if state == _WAIT_R:
                await trio.lowlevel.wait_readable(fileno)
                state = gen.send(_READY_R)
            elif state == _WAIT_W:
                await trio.lowlevel.wait_writable(fileno)
                state = gen.send(_READY_W)
            else:
                # Usually writable at once: a poll is cheaper than two tasks.
                state = gen.send(_ready_now(fileno, state) or await _wait_either(fileno))
    except StopIteration as done:
        value: RV = done.value
        return value
    except (OSError, trio.ClosedResourceError) as lost:
        raise errors.OperationalError("connection socket closed") from lost


async def wait_conn(gen: Generator[tuple[int, Wait], Ready | int, RV]) -> RV:
    """Drive a psycopg generator whose socket may change (connect, cancel)."""
    try:
        fileno, state = next(gen)
        while True:
            if state == _WAIT_R:
                await trio.lowlevel.wait_readable(fileno)
                fileno, state = gen.send(_READY_R)
            else:
                await trio.lowlevel.wait_writable(fileno)
                fileno, state = gen.send(_READY_W)
    except StopIteration as done:
        value: RV = done.value
        return value
    except (OSError, trio.ClosedResourceError) as lost:
        raise errors.OperationalError("connection socket closed") from lost


async def _attempts(params: dict[str, Any]) -> list[dict[str, Any]]:
    """psycopg's connection attempts (one per host and resolved address), resolved by Trio."""
    attempts: list[dict[str, Any]] = []
    failure: Exception | None = None
    for attempt in split_attempts(params):
        host = get_param(attempt, "host")
        if not host or host.startswith("/") or host[1:2] == ":" or get_param(attempt, "hostaddr"):
            attempts.append(attempt)
            continue
        if is_ip_address(host):
            attempts.append({**attempt, "hostaddr": host})
            continue
        port = get_param(attempt, "port")
        if not port:
            default = get_param_def("port")
            port = (default and default.compiled) or "5432"
        try:
            found = await trio.socket.getaddrinfo(
                host, port, proto=socket.IPPROTO_TCP, type=socket.SOCK_STREAM
            )
        except OSError as error:
            failure = errors.OperationalError(f"failed to resolve host {host!r}: {error}")
            continue
        attempts.extend({**attempt, "hostaddr": str(item[4][0])} for item in found)
    if not attempts:
        raise failure or errors.OperationalError("no host to connect to")
    return attempts


class TrioConnection(psycopg.AsyncConnection[Any]):
    """A psycopg ``AsyncConnection`` whose waits, lock and cancel are Trio's.

    Use it as psycopg documents ``AsyncConnection`` (``execute``, ``cursor``,
    ``transaction``, ``commit``/``rollback``, ``set_autocommit``,
    ``pipeline``, ``copy``, ``notifies``…), under ``trio.run``.
    """

    def __init__(self, pgconn: Any, row_factory: Any = psycopg.rows.tuple_row) -> None:
        super().__init__(pgconn, row_factory)
        self.lock: Any = trio.Lock()

    @classmethod
    async def connect(  # type: ignore[override]
        cls,
        conninfo: str = "",
        *,
        timeout: float = 10.0,  # noqa: ASYNC109 (per attempt, as libpq's connect_timeout)
        autocommit: bool = False,
        prepare_threshold: int | None = 5,
        **kwargs: Any,
    ) -> TrioConnection:
        """Connect, trying each host and address in turn, each within ``timeout`` seconds."""
        params = conninfo_to_dict(conninfo, **kwargs)
        failures: list[Exception] = []
        for attempt in await _attempts(params):
            try:
                with trio.fail_after(timeout):
                    conn: TrioConnection = await wait_conn(
                        cls._connect_gen(make_conninfo("", **attempt))
                    )
            except trio.TooSlowError:
                failures.append(errors.ConnectionTimeout("connection timeout expired"))
            except errors.Error as error:
                failures.append(error)
            else:
                conn._autocommit = autocommit
                conn.prepare_threshold = prepare_threshold
                return conn
        if len(failures) == 1:
            raise failures[0].with_traceback(None)
        text = "\n".join(f"- {failure}" for failure in failures)
        raise type(failures[-1])(f"every connection attempt failed:\n{text}")

    async def wait(  # psycopg's signature, which notifies() calls with a timeout
        self,
        gen: Any,
        interval: float = 0.0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Drive ``gen`` on this connection's socket (psycopg's seam for every query)."""
        fileno = self.pgconn.socket
        try:
            if timeout is None:
                return await wait_fd(gen, fileno)
            with trio.move_on_after(timeout):
                return await wait_fd(gen, fileno)
            raise errors._WaitTimeout("wait timeout expired")  # only notifies() times out
        except trio.Cancelled:
            if self.pgconn.transaction_status == _ACTIVE:
                await self._abandon(gen, fileno)
            raise

    async def _abandon(self, gen: Any, fileno: int) -> None:
        """The query was cancelled on our side: cancel it on the server, wait for it to end.

        Shielded (the caller's scope is cancelled already) and bounded; the
        connection is closed when the server does not end the query in time.
        """
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CANCEL_TIMEOUT
            try:
                await self._cancel_on_server()
                await wait_fd(gen, fileno)
            except errors.QueryCanceled:
                return  # as expected: the connection is idle (or in a failed transaction)
            except errors.Error:
                pass
            else:
                return  # the query ended before the cancel reached it: as good
        # Not ended in time, or something else failed: its state is unknown.
        self.close_now()

    async def _cancel_on_server(self) -> None:
        if not self._should_cancel():
            return
        if capabilities.has_cancel_safe():
            await wait_conn(self._cancel_gen())
        else:
            # PQcancel blocks (it connects); keep it off the Trio thread.
            await trio.to_thread.run_sync(self.cancel, abandon_on_cancel=True)

    async def cancel_safe(self, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (psycopg's)
        """Ask the server to cancel the running query, within ``timeout`` seconds."""
        try:
            with trio.fail_after(timeout):
                await self._cancel_on_server()
        except trio.TooSlowError:
            raise errors.CancellationTimeout("cancellation timeout expired") from None

    def close_now(self) -> None:
        """Close at once, waking any task waiting on the socket (Trio needs to be told)."""
        if self.closed:
            return
        fileno = self.pgconn.socket if self.pgconn.status == pq.ConnStatus.OK else -1
        if fileno >= 0:
            trio.lowlevel.notify_closing(fileno)
        self._closed = True
        self.pgconn.finish()
