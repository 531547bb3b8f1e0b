"""coredis's connection pool, with its slot accounting made safe under cancellation.

coredis 6.9's ``ConnectionPool`` keeps ``max_connections`` slots in a
stack: each is ``None`` (no connection yet) or an idle connection, and a
leased connection holds its slot until released. Trio code cancels all
the time (a deadline, a client gone, a shutdown), and several of the
pool's paths go wrong when it does; the first and the last were seen here
to leave a one-connection pool that never served again, or served only
after its timeout:

- **A cancelled blocking command** (``BLPOP``…) invalidates its
  connection, as it must (its reply would come later, out of turn), and
  ``release`` drops an unusable connection without giving its slot back.
  The same happens to a leased connection the server closes. Each time
  the pool shrinks by one, for good.
- **A cancelled or timed-out connect** (``get_connection`` took a ``None``
  slot, then is cancelled while connecting) never gives the slot back
  either; and connecting plus the handshake are bounded only by the
  pool's wait timeout, so a server that accepts but never answers holds a
  caller until then.
- **A cancelled connect** (a deadline, a caller's cancel scope) comes out
  of the connection as a ``ConnectionError``: the ``Cancelled`` is lost,
  and the cancel scope never learns it was hit.
- **A cancelled handshake** is also logged by coredis as an ERROR with a
  traceback; that line is dropped (a filter on the ``coredis`` logger).
- **A refused connect** leaves the connection's six in-memory buffers
  open, and the garbage collector warns about each.
- **A cancelled waiter** leaves its wake-up event in the stack's list of
  getters; the next release sets that stale event instead of waking the
  task really waiting, which then waits out its timeout beside an idle
  connection.

:class:`Pool` keeps coredis's connections, handshake and multiplexing and
replaces those paths: slots live in a :class:`_Slots` stack whose
waiters park on a Trio ``ParkingLot`` (a cancelled waiter simply leaves
it) and are served in turn, every path that took a slot gives it back on any failure, releasing
an unusable connection returns a free slot, and connecting plus the
handshake are bounded by ``connect_timeout``.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import trio
from coredis.connection import BaseConnection
from coredis.exceptions import RedisError
from coredis.pool import ConnectionPool

__all__ = ["Pool"]

#: What coredis logs at ERROR, with a traceback, when a connection's
#: handshake is cancelled (its Cancelled is not a RedisError).
_FAILED_CONNECT = "Connection attempt failed unexpectedly!"


class _NoFailedConnectTraceback(logging.Filter):
    """Drops coredis's ERROR traceback for a handshake that was cancelled.

    Under Trio that is a deadline or a caller's cancel scope doing its job
    (the caller gets its Cancelled back, see the pool), not an error: one
    traceback per command that hit its deadline while connecting.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _FAILED_CONNECT


logging.getLogger("coredis").addFilter(_NoFailedConnectTraceback())


class _Slots:
    """A bounded LIFO stack of idle connections and ``None`` (free) slots, handed out in turn.

    It replaces coredis's ``Queue`` inside the pool. Waiters park on a Trio
    parking lot, so a cancelled waiter takes no wake-up with it; a slot
    given back while tasks wait is reserved for the first of them (woken
    tasks cannot be overtaken by one arriving later), so they are served
    in the order they came.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: deque[BaseConnection | None] = deque([None] * size)
        #: Items promised to woken waiters that have not run yet.
        self._reserved = 0
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def waiting(self) -> int:
        """How many tasks wait for a slot."""
        return len(self._lot)

    @property
    def idle(self) -> int:
        """How many idle connections the stack holds."""
        return sum(item is not None for item in self._items)

    @property
    def free(self) -> bool:
        """Whether a slot can be taken now, without waiting."""
        return len(self._items) > self._reserved

    def get_nowait(self) -> BaseConnection | None:
        """The most recently released connection, or a free slot (only when :attr:`free`)."""
        return self._items.pop()

    async def get(self) -> BaseConnection | None:
        """The most recently released connection, or a free slot; waits for one in turn."""
        if self.free:
            return self._items.pop()
        await self._lot.park()
        # Woken by _add, which reserved an item for this task; no checkpoint
        # since, so none can have been taken from under it.
        self._reserved -= 1
        return self._items.pop()

    def _add(self, item: BaseConnection | None, *, top: bool) -> None:
        if len(self._items) >= self._size:
            raise RuntimeError("redis pool: more slots released than taken")  # a bug here
        if top:
            self._items.append(item)
        else:
            self._items.appendleft(item)
        if self.free and self._lot:
            self._reserved += 1
            self._lot.unpark()

    def put_nowait(self, item: BaseConnection) -> None:
        """Return an idle connection, on top (reused first)."""
        self._add(item, top=True)

    def append_nowait(self, item: None) -> None:
        """Return a free slot, at the bottom (idle connections are used before new ones)."""
        self._add(item, top=False)

    def free_slot_of(self, connection: BaseConnection) -> None:
        """If ``connection`` sits idle here, turn its place into a free slot (it has closed)."""
        for index, item in enumerate(self._items):
            if item is connection:
                self._items[index] = None
                return


class Pool(ConnectionPool[Any]):
    """coredis's pool with cancellation-safe slots (see the module), a name and its figures."""

    name = "redis"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slots = _Slots(self.max_connections)
        self._available_connections = self._slots  # type: ignore[assignment]

    def figures(self) -> dict[str, int]:
        """Connections open, idle and in use, tasks waiting for one, and the most it opens."""
        return {
            "connections": len(self._online_connections),
            "idle": self._slots.idle,
            "in_use": self.statistics.in_use_connections,
            "waiting": self._slots.waiting,
            "max_connections": self.max_connections,
        }

    async def get_connection(self, **_: Any) -> Any:
        """A connection: an idle one, or a new one in a free slot; ``TimeoutError`` saying why."""
        if not self._slots.free:
            with trio.move_on_after(_seconds(self.timeout)) as waited:
                connection = await self._slots.get()
            if waited.cancelled_caught:
                message = (
                    f"redis {self.name!r}: no connection free within {self.timeout:g} s "
                    f"(max_connections={self.max_connections}, all in use)"
                )
                raise TimeoutError(message)
        else:
            # The usual case, as coredis multiplexes: no wait, so no cancel
            # scope (entering and leaving one costs more than the rest of this).
            connection = self._slots.get_nowait()
        try:
            if connection is None or not connection.reusable:
                if connection is not None:
                    connection.invalidate()
                connection = await self._connect()
        except BaseException:
            self._slots.append_nowait(None)
            raise
        self.statistics.connection_leased(connection)
        return connection

    async def _connect(self) -> BaseConnection:
        connection: BaseConnection = await self._construct_connection()
        with trio.move_on_after(_seconds(self.connect_timeout)) as bounded:
            error = await self.task_group.start(self._run_connection, connection)
        if bounded.cancelled_caught:
            raise TimeoutError(
                f"redis {self.name!r}: connecting to {self.location} (connect and handshake) "
                f"took longer than {self.connect_timeout:g} s"
            )
        if error is not None:
            raise error
        self.statistics.connection_created(connection)
        self._online_connections.add(connection)
        return connection

    async def _run_connection(
        self,
        connection: BaseConnection,
        *,
        task_status: trio.TaskStatus[RedisError | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``connection`` until it closes; its slot becomes free if it was idle then."""
        status = _Started(task_status)
        try:
            await connection.run(task_status=status)
        except RedisError as error:
            # Before the handshake ended (refused, bad password): the caller
            # raises it. After, coredis ends a connection quietly; should one
            # raise, the connection is gone all the same, and the pool stays.
            if not status.done:
                # coredis turns a cancellation during the connect or the
                # handshake into this ConnectionError; give it back, so the
                # deadline or the caller's cancel scope sees its Cancelled.
                await trio.lowlevel.checkpoint_if_cancelled()
                task_status.started(error)
        finally:
            if not status.done:
                _close_buffers(connection)
            self._online_connections.discard(connection)
            self._slots.free_slot_of(connection)

    def release(self, connection: Any) -> None:
        """Return a leased connection; an unusable one is closed and its slot freed."""
        self.statistics.connection_released(connection)
        if connection.usable:
            self._slots.put_nowait(connection)
        else:
            connection.invalidate()
            self._slots.append_nowait(None)


# A connection's in-memory buffers: run() closes them, but only once it has
# connected; a refused connect leaves them to the garbage collector, which
# warns (ResourceWarning) about each.
_BUFFERS = (
    "_write_buffer_in",
    "_write_buffer_out",
    "_push_message_buffer_in",
    "_push_message_buffer_out",
    "_streamed_message_buffer_in",
    "_streamed_message_buffer_out",
)


def _close_buffers(connection: BaseConnection) -> None:
    for name in _BUFFERS:
        buffer = getattr(connection, name, None)
        if buffer is not None:
            buffer.close()


class _Started:
    """A task status that remembers whether ``started`` was called."""

    def __init__(self, status: trio.TaskStatus[RedisError | None]) -> None:
        self._status = status
        self.done = False

    def started(self, value: None = None) -> None:
        self.done = True
        self._status.started(value)


def _seconds(value: float | None) -> float:
    return float("inf") if value is None else value
