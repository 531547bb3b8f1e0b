"""The PostgreSQL pool: Trio-native psycopg connections, leased one task at a time.

Shape of the pool, and why:

- **A semaphore of ``max_size`` units** is the only queue: a lease takes a
  unit (waiting FIFO, bounded by ``timeout`` and ``max_waiting``), then
  reuses the most recently returned idle connection or opens one. Idle
  connections hold no unit, so the connections alive never exceed the
  units held plus the idle ones, and a new one opens only when none is
  idle: never more than ``max_size``.
- **No nursery of its own.** The pool is yielded from an async generator
  (``providers.Resource``), and a nursery must not stay open across a
  ``yield``; its housekeeping (closing connections idle or old past their
  limits, noticing a server gone, topping up to ``min_size`` with bounded
  backoff) runs as a Trio system task started by the first lease or by
  :meth:`Pool.warmup`, and cancelled by :meth:`Pool.close`.
- **A returned connection is checked, never trusted**: one still in a
  transaction is committed (the block succeeded) or rolled back (it
  failed or was cancelled, shielded and bounded); one whose state is
  unknown (a query still running, the socket gone) is closed. A connection
  handed out is polled for a closed socket first (no I/O), and pinged when
  it sat idle longer than ``check_interval``.
- **Telemetry only when a service runs**: the hub current when the pool is
  made (:func:`~mikros_trio.ext.current_telemetry`) sees one client call per
  ``execute`` (system ``postgresql``, the SQL verb, the database name; never
  the query's text or parameters); outside a service the cursors are
  psycopg's own and cost nothing extra.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import psycopg
import trio
from psycopg import generators, pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._pgconn import CANCEL_TIMEOUT, TrioConnection, _ready_now, wait_fd
from ._telemetry import Telemetry, current_telemetry

if TYPE_CHECKING:
    from .features.env import Secret

__all__ = ["Pool", "PoolClosed", "PoolTimeout", "pool"]

log = logging.getLogger("mikros_trio.postgres")

_OK = pq.ConnStatus.OK
_IDLE = pq.TransactionStatus.IDLE
_INTRANS = pq.TransactionStatus.INTRANS
_INERROR = pq.TransactionStatus.INERROR
_EMPTY_QUERY = pq.ExecStatus.EMPTY_QUERY
_WAIT_R = psycopg.waiting.Wait.R

#: How often housekeeping looks at idle connections (a poll, no I/O) and tops up.
_TICK = 1.0
#: Reconnect backoff after a failed connection attempt: first wait, doubling, cap.
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0

#: SQL verbs a call is named by; anything else is OTHER, so labels stay bounded.
_VERB_WORDS = (
    "ABORT ALTER ANALYZE BEGIN CALL CHECKPOINT CLOSE CLUSTER COMMENT COMMIT COPY CREATE "
    "DEALLOCATE DECLARE DELETE DISCARD DO DROP END EXECUTE EXPLAIN FETCH GRANT IMPORT INSERT "
    "LISTEN LOCK MERGE MOVE NOTIFY PREPARE REFRESH REINDEX RELEASE RESET REVOKE ROLLBACK "
    "SAVEPOINT SELECT SET SHOW START TABLE TRUNCATE UNLISTEN UPDATE VACUUM VALUES WITH"
)
_VERBS = frozenset(_VERB_WORDS.split())
_OPERATIONS: dict[object, str] = {}
_OPERATIONS_LIMIT = 4096


def _operation(query: object) -> str:
    """The SQL verb of ``query`` (``SELECT``…), ``OTHER`` if not a known one; cached."""
    found = _OPERATIONS.get(query)
    if found is not None:
        return found
    text = query.decode("utf-8", "replace") if isinstance(query, bytes) else query
    verb = "OTHER"
    if isinstance(text, str):
        words = text.lstrip(" \t\r\n(").split(None, 1)
        if words and words[0].upper() in _VERBS:
            verb = words[0].upper()
    if isinstance(query, str | bytes) and len(_OPERATIONS) < _OPERATIONS_LIMIT:
        _OPERATIONS[query] = verb
    return verb


class PoolTimeout(psycopg.OperationalError):
    """No connection could be leased in time: all in use (or too many waiting), or none opens.

    The message says which, with the pool's size and waiters; it never
    shows the DSN.
    """


class PoolClosed(psycopg.OperationalError):
    """A lease was asked of a pool that is closing or closed."""


class _Observed:
    """What a pool tells the service's telemetry: its hub, names and gauges."""

    __slots__ = ("dbname", "gauges", "peer", "telemetry")

    def __init__(self, telemetry: Telemetry, dbname: str, peer: tuple[str, int]) -> None:
        self.telemetry = telemetry
        self.dbname = dbname
        self.peer = peer
        self.gauges: Any = None


class TracedCursor(psycopg.AsyncCursor[Any]):
    """A cursor reporting each ``execute``/``executemany`` as a client call of the service."""

    _observed: _Observed

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        observed = self._observed
        telemetry = observed.telemetry
        call = telemetry.begin("postgresql", "client", _operation(query), target=observed.dbname)
        call.state["peer"] = observed.peer
        try:
            result = await super().execute(query, params, **kwargs)
        except BaseException as error:
            _end(telemetry, call, error)
            raise
        telemetry.end(call, "ok")
        return result

    async def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        observed = self._observed
        telemetry = observed.telemetry
        call = telemetry.begin("postgresql", "client", _operation(query), target=observed.dbname)
        call.state["peer"] = observed.peer
        try:
            await super().executemany(query, params_seq, **kwargs)
        except BaseException as error:
            _end(telemetry, call, error)
            raise
        telemetry.end(call, "ok")


def _end(telemetry: Telemetry, call: Any, error: BaseException) -> None:
    if isinstance(error, trio.Cancelled):
        telemetry.end(call, "cancelled")
        return
    # The message can quote values (an invalid input, a duplicate key's
    # DETAIL): observers get the type and the SQLSTATE only.
    sqlstate = getattr(error, "sqlstate", None)
    text = f"SQLSTATE {sqlstate}" if sqlstate else "(message not shown)"
    try:
        shown: BaseException = type(error)(text)
    except Exception:  # a type that wants other arguments: its name says enough
        shown = RuntimeError(f"{type(error).__name__}: {text}")
    telemetry.end(call, "error", failed=True, error=shown)


def _safe_dsn(params: Mapping[str, Any]) -> str:
    """Where a DSN points, for messages: ``user@host:port/dbname``, never the password."""
    user = params.get("user") or ""
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    return f"{user + '@' if user else ''}{host}:{port}/{params.get('dbname') or user}"


def _positive(name: str, value: float, upper: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"postgres pool: {name} must be a finite number of seconds, got {value!r}")
    if not 0 < value <= upper:
        raise ValueError(f"postgres pool: {name} must be > 0 and <= {upper:g}, got {value!r}")
    return float(value)


def _count(name: str, value: int, lower: int, upper: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lower <= value <= upper:
        raise ValueError(
            f"postgres pool: {name} must be an integer from {lower} to {upper}, got {value!r}"
        )
    return value


class _Slot:
    """One connection of the pool and its times (Trio clock)."""

    __slots__ = ("conn", "created", "used")

    def __init__(self, conn: TrioConnection, now: float) -> None:
        self.conn = conn
        self.created = now
        self.used = now


class Pool:
    """A pool of Trio-native PostgreSQL connections (psycopg 3 ``AsyncConnection`` API).

    ``dsn`` is a libpq URL or ``key=value`` string (a
    :class:`~mikros_trio.Secret` is revealed here and nowhere else).
    Sizes: ``min_size`` connections are opened by :meth:`warmup` and kept,
    at most ``max_size`` exist. Times, in seconds: ``timeout`` to lease a
    connection (then :class:`PoolTimeout`), ``connect_timeout`` per
    connection attempt, ``max_idle`` before an idle connection beyond
    ``min_size`` is closed, ``max_lifetime`` before any connection is
    replaced, ``check_interval`` of idleness after which a connection is
    pinged before being handed out. ``max_waiting`` bounds the tasks queued
    for a connection (more get :class:`PoolTimeout` at once). ``name``
    labels its metrics; ``autocommit`` and ``prepare_threshold`` are
    psycopg's connection settings.

    Leases::

        async with pool.connection() as conn:       # committed if the block succeeds
            cur = await conn.execute("SELECT name FROM users WHERE id = %s", (7,))
            row = await cur.fetchone()

        async with pool.transaction() as conn:      # rolled back on error or cancel
            await conn.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")

        rows = await pool.fetchall("SELECT id FROM orders WHERE state = %s", ("new",))

    Failure contract: a lease that fails or is cancelled rolls its
    transaction back (shielded, within a few seconds) or closes its
    connection; a query cancelled by Trio is cancelled on the server too.
    :meth:`close` waits for leases to end until it is cancelled, then
    cancels their queries, closes every connection, and lets the
    cancellation propagate.
    """

    def __init__(
        self,
        dsn: str | Secret,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_idle: float = 600.0,
        max_lifetime: float = 3600.0,
        check_interval: float = 30.0,
        max_waiting: int = 1000,
        name: str = "postgres",
        autocommit: bool = False,
        prepare_threshold: int | None = 5,
    ) -> None:
        revealed = dsn.reveal() if hasattr(dsn, "reveal") else dsn
        if not isinstance(revealed, str) or not revealed.strip():
            raise ValueError("postgres pool: dsn must be a non-empty connection string or URL")
        try:
            params = conninfo_to_dict(revealed)
        except psycopg.Error:
            # libpq's message quotes the string, which may hold a password.
            raise ValueError(
                "postgres pool: dsn is not a valid libpq URL or key=value string "
                "(not shown: it may hold a password)"
            ) from None
        self.max_size = _count("max_size", max_size, 1, 10_000)
        self.min_size = _count("min_size", min_size, 0, self.max_size)
        self.max_waiting = _count("max_waiting", max_waiting, 0, 1_000_000)
        self.timeout = _positive("timeout", timeout, 86_400)
        self.connect_timeout = _positive("connect_timeout", connect_timeout, 3600)
        self.max_idle = _positive("max_idle", max_idle, 86_400 * 7)
        self.max_lifetime = _positive("max_lifetime", max_lifetime, 86_400 * 30)
        self.check_interval = _positive("check_interval", check_interval, 86_400)
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise ValueError(f"postgres pool: name must be 1 to 64 characters, got {name!r}")
        self.name = name
        self._params = params
        self._conninfo = make_conninfo("", **params)
        self._where = _safe_dsn(params)
        self._password = str(params.get("password") or "")
        self._autocommit = autocommit
        self._prepare_threshold = prepare_threshold
        self._capacity = trio.Semaphore(self.max_size)
        self._idle: deque[_Slot] = deque()
        self._leased: dict[TrioConnection, _Slot] = {}
        self._opening = 0
        self._closed = False
        self._drained = trio.Event()
        self._housekeeper: trio.CancelScope | None = None
        self._last_error: str | None = None
        self._counts = {"opened": 0, "closed": 0, "failed_connects": 0, "timeouts": 0}
        self._telemetry = current_telemetry()
        self._observed: _Observed | None = None
        self._cursor: type[TracedCursor] = TracedCursor
        if self._telemetry is not None and self._password:
            self._telemetry.add_secrets([self._password], name=f"the {name} pool's password")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"size={self.size} in_use={len(self._leased)}"
        return f"<postgres.Pool {self.name!r} {self._where} {state}>"

    # -- sizes and health ----------------------------------------------------

    @property
    def size(self) -> int:
        """Connections open or opening now."""
        return len(self._idle) + len(self._leased) + self._opening

    def stats(self) -> dict[str, Any]:
        """Sizes now and counts since the pool was made (a new dict each call)."""
        return {
            "name": self.name,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "size": self.size,
            "in_use": len(self._leased),
            "idle": len(self._idle),
            "opening": self._opening,
            "waiters": self._capacity.statistics().tasks_waiting,
            **self._counts,
        }

    def health(self) -> Mapping[str, Any]:
        """``ok`` is False once closed, or while the last connection attempt failed."""
        report: dict[str, Any] = {
            "ok": not self._closed and self._last_error is None,
            "size": self.size,
            "in_use": len(self._leased),
            "idle": len(self._idle),
            "waiters": self._capacity.statistics().tasks_waiting,
        }
        if self._closed:
            report["error"] = "closed"
        elif self._last_error is not None:
            report["error"] = self._last_error
        return report

    def _changed(self) -> None:
        """Refresh the pool gauges (only when the metrics feature is on).

        Sampled by housekeeping once a second, not at every lease: four
        gauge updates per lease were the largest cost the metrics feature
        added to a query (cProfile of bench/postgres.py's service side).
        """
        observed = self._observed
        if observed is not None and observed.gauges is not None:
            observed.gauges.set(
                len(self._idle),
                len(self._leased),
                self._capacity.statistics().tasks_waiting,
                self.max_size,
            )

    # -- opening and closing connections -------------------------------------

    async def _open(self) -> _Slot:
        """One new connection, within ``connect_timeout``; records the outcome for health."""
        self._opening += 1
        try:
            conn = await TrioConnection.connect(
                self._conninfo,
                timeout=self.connect_timeout,
                autocommit=self._autocommit,
                prepare_threshold=self._prepare_threshold,
            )
        except psycopg.Error as error:
            self._counts["failed_connects"] += 1
            self._last_error = self._scrub(f"{type(error).__name__}: {error}")
            raise
        finally:
            self._opening -= 1
        self._last_error = None
        self._counts["opened"] += 1
        if self._telemetry is not None:
            self._observe(conn)
        return _Slot(conn, trio.current_time())

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _observe(self, conn: TrioConnection) -> None:
        telemetry = self._telemetry
        assert telemetry is not None
        if self._observed is None:
            info = conn.info
            self._observed = _Observed(telemetry, info.dbname, (info.host, info.port))
            self._observed.gauges = _gauges(telemetry, self.name)
            # One cursor class per pool, carrying what its calls report.
            self._cursor = type("TracedCursor", (TracedCursor,), {"_observed": self._observed})
        conn.cursor_factory = self._cursor

    async def _open_until(self, deadline: float) -> _Slot:
        """Open a connection, retrying with bounded backoff until ``deadline`` (Trio time)."""
        backoff = _BACKOFF_FIRST
        while True:
            try:
                return await self._open()
            except psycopg.Error as error:
                if trio.current_time() + backoff >= deadline:
                    self._counts["timeouts"] += 1
                    raise PoolTimeout(
                        f"postgres pool {self.name!r}: could not connect to {self._where} "
                        f"within {self.timeout:g} s: {self._scrub(str(error))}"
                    ) from None
                log.warning(
                    "postgres pool %r: connecting to %s failed (%s), retrying in %.2f s",
                    self.name,
                    self._where,
                    type(error).__name__,
                    backoff,
                )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _discard(self, slot: _Slot) -> None:
        slot.conn.close_now()
        self._counts["closed"] += 1

    @staticmethod
    def _alive(slot: _Slot) -> bool | None:
        """Whether an idle connection still looks open: a poll, no I/O.

        ``None`` when the server sent something while it was idle: a
        notification, or the goodbye of a terminated backend, which libpq
        does not always turn into a bad status at once. Then only a ping
        tells.
        """
        conn = slot.conn
        if conn.closed or conn.pgconn.status != _OK:
            return False
        try:
            if not _ready_now(conn.pgconn.socket, _WAIT_R):
                return True
            conn.pgconn.consume_input()
        except (psycopg.Error, OSError):
            return False
        return None if conn.pgconn.status == _OK else False

    async def _check(self, slot: _Slot, now: float) -> bool:
        """Whether an idle connection may be handed out: alive, young enough, pinged if due."""
        if now - slot.created > self.max_lifetime:
            return False
        alive = self._alive(slot)
        if alive is None or (alive and now - slot.used > self.check_interval):
            return await self._ping(slot)
        return alive

    async def _ping(self, slot: _Slot) -> bool:
        """An empty query (no transaction) answered within ``connect_timeout``.

        Driven without the connection's cancel handling: a connection that
        does not answer a ping is closed, not cancelled and waited for.
        """
        pgconn = slot.conn.pgconn
        with trio.move_on_after(self.connect_timeout):
            try:
                pgconn.send_query(b"")
                results = await wait_fd(generators.execute(pgconn), pgconn.socket)
            except (psycopg.Error, OSError):
                return False
            return pgconn.transaction_status == _IDLE and all(
                result.status == _EMPTY_QUERY for result in results
            )
        return False

    # -- leases ----------------------------------------------------------------

    def connection(self) -> _Lease:
        """``async with pool.connection() as conn``: committed on success, rolled back else."""
        return _Lease(self, begin=False)

    def transaction(self) -> _Lease:
        """``async with pool.transaction() as conn``: one transaction, committed or rolled back.

        As :meth:`connection`, but the transaction is opened before the
        block even on an ``autocommit`` pool.
        """
        return _Lease(self, begin=True)

    async def _acquire(self) -> _Slot:
        if self._closed:
            raise PoolClosed(f"postgres pool {self.name!r} is closed")
        capacity = self._capacity
        if capacity.value == 0 and capacity.statistics().tasks_waiting >= self.max_waiting:
            self._counts["timeouts"] += 1
            raise PoolTimeout(
                f"postgres pool {self.name!r}: {self.max_waiting} tasks already wait for a "
                f"connection (all {self.max_size} in use)"
            )
        if self._housekeeper is None:
            self._start_housekeeping()
        if capacity.value:
            capacity.acquire_nowait()  # the common case: no cancel scope to build
        else:
            with trio.move_on_after(self.timeout) as waited:
                await capacity.acquire()
            # Cancelled while parked means no unit was handed over (trio.Semaphore).
            if waited.cancelled_caught:
                self._counts["timeouts"] += 1
                raise PoolTimeout(
                    f"postgres pool {self.name!r}: no connection free within {self.timeout:g} s "
                    f"({len(self._leased)} of {self.max_size} in use, "
                    f"{capacity.statistics().tasks_waiting} other tasks waiting)"
                )
        try:
            if self._closed:
                raise PoolClosed(f"postgres pool {self.name!r} is closed")
            slot = await self._take()
        except BaseException:
            capacity.release()
            raise
        self._leased[slot.conn] = slot
        return slot

    async def _take(self) -> _Slot:
        now = trio.current_time()
        while self._idle:
            slot = self._idle.pop()
            try:
                usable = await self._check(slot, now)
            except BaseException:  # cancelled mid-ping: its state is unknown
                self._discard(slot)
                raise
            if usable:
                return slot
            self._discard(slot)
        return await self._open_until(trio.current_time() + self.timeout)

    async def _release(self, slot: _Slot, *, commit: bool) -> None:
        """Put a leased connection back (committed or rolled back) or close it; frees its unit."""
        conn = slot.conn
        try:
            status = conn.pgconn.transaction_status if not conn.closed else None
            if status in (_INTRANS, _INERROR):
                if commit and status == _INTRANS:
                    await conn.commit()  # its failure is the block's failure
                else:
                    await self._rollback(conn)
            if conn.closed or conn.pgconn.transaction_status != _IDLE or self._closed:
                self._discard(slot)
            else:
                slot.used = trio.current_time()
                self._idle.append(slot)
        except BaseException:
            if not conn.closed and conn.pgconn.transaction_status != _IDLE:
                self._discard(slot)
            elif not conn.closed:
                slot.used = trio.current_time()
                self._idle.append(slot)
            raise
        finally:
            del self._leased[conn]
            self._capacity.release()
            if not self._leased:
                self._drained.set()

    async def _rollback(self, conn: TrioConnection) -> None:
        """Roll back, shielded and bounded: it runs while the lease is being cancelled."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CANCEL_TIMEOUT
            try:
                await conn.rollback()
            except psycopg.Error:
                conn.close_now()
        if scope.cancelled_caught:
            conn.close_now()

    # -- conveniences ----------------------------------------------------------

    async def execute(self, query: Any, params: Any = None) -> int:
        """Run one statement in its own lease; its row count (-1 when it has none)."""
        async with self.connection() as conn:
            cursor = await conn.execute(query, params)
            return cursor.rowcount

    async def fetchone(self, query: Any, params: Any = None, *, row_factory: Any = None) -> Any:
        """The first row of ``query`` (``None`` if none), in its own lease."""
        async with self.connection() as conn:
            cursor = conn.cursor(row_factory=row_factory) if row_factory else conn.cursor()
            await cursor.execute(query, params)
            return await cursor.fetchone()

    async def fetchall(self, query: Any, params: Any = None, *, row_factory: Any = None) -> Any:
        """Every row of ``query``, in its own lease."""
        async with self.connection() as conn:
            cursor = conn.cursor(row_factory=row_factory) if row_factory else conn.cursor()
            await cursor.execute(query, params)
            return await cursor.fetchall()

    # -- lifecycle -------------------------------------------------------------

    async def warmup(self) -> None:
        """Open ``min_size`` connections now; ``PoolTimeout`` if the server cannot be reached.

        The service awaits it before reporting ready.
        """
        if self._closed:
            raise PoolClosed(f"postgres pool {self.name!r} is closed")
        deadline = trio.current_time() + self.timeout
        while self.size < self.min_size:
            slot = await self._open_until(deadline)
            self._idle.appendleft(slot)
            self._changed()
        if self._housekeeper is None:
            self._start_housekeeping()

    def _start_housekeeping(self) -> None:
        self._housekeeper = trio.CancelScope()
        trio.lowlevel.spawn_system_task(
            self._housekeeping, self._housekeeper, name=f"postgres pool {self.name!r}"
        )

    async def _housekeeping(self, scope: trio.CancelScope) -> None:
        """Close what expired, notice a dead server, keep ``min_size`` open (a system task)."""
        backoff = _BACKOFF_FIRST
        with scope:
            while not self._closed:
                try:
                    await self._tidy()
                    backoff = _BACKOFF_FIRST
                    await trio.sleep(_TICK)
                except psycopg.Error:
                    await trio.sleep(backoff)  # _last_error tells health
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                except Exception:  # a system task must never raise
                    log.exception("postgres pool %r: housekeeping failed", self.name)
                    await trio.sleep(_TICK)

    async def _tidy(self) -> None:
        now = trio.current_time()
        kept: deque[_Slot] = deque()
        while self._idle:  # oldest first
            slot = self._idle.popleft()
            if (
                self._alive(slot) is False
                or now - slot.created > self.max_lifetime
                or (
                    now - slot.used > self.max_idle
                    and len(kept) + len(self._leased) >= self.min_size
                )
            ):
                self._discard(slot)
            else:
                kept.append(slot)
        self._idle.extendleft(reversed(kept))
        # Ping the longest idle one when it is due, or when the server spoke to
        # it: a dead server shows up in health without waiting for a lease.
        # The ping holds a unit, as a lease would: the connection is out of the
        # idle list meanwhile, and a lease must not open one more in its place.
        if (
            self._idle
            and self._capacity.value
            and (
                now - self._idle[0].used > self.check_interval or self._alive(self._idle[0]) is None
            )
        ):
            slot = self._idle.popleft()
            self._capacity.acquire_nowait()
            try:
                healthy = await self._ping(slot)
            except BaseException:  # cancelled mid-ping (the pool closing)
                self._discard(slot)
                raise
            finally:
                self._capacity.release()
            if healthy and not self._closed:
                slot.used = trio.current_time()
                self._idle.append(slot)
            else:
                self._discard(slot)
        while self.size < self.min_size and not self._closed and self._capacity.value:
            self._capacity.acquire_nowait()
            try:
                slot = await self._open()
            finally:
                self._capacity.release()
            self._idle.appendleft(slot)
        self._changed()

    async def close(self) -> None:
        """Stop leasing, wait for leases to end until cancelled, then cancel and close all.

        Idempotent. When cancelled while waiting (the supervisor's deadline),
        the queries still running are cancelled on the server and every
        connection is closed within a few seconds, then the cancellation
        propagates.
        """
        if not self._closed:
            self._closed = True
            if self._housekeeper is not None:
                self._housekeeper.cancel()
            self._close_idle()
        try:
            if self._leased:
                self._drained = trio.Event()
                await self._drained.wait()
        finally:
            if self._leased:
                await self._abort_leases()
            self._close_idle()
            self._changed()

    def _close_idle(self) -> None:
        while self._idle:
            self._discard(self._idle.pop())

    async def _abort_leases(self) -> None:
        """Cancel the leased connections' queries, give them a moment, then close them."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CANCEL_TIMEOUT
            async with trio.open_nursery() as nursery:
                for conn in list(self._leased):
                    nursery.start_soon(_cancel_quietly, conn)
            while self._leased and not scope.cancel_called:
                self._drained = trio.Event()
                await self._drained.wait()
        for conn in list(self._leased):
            conn.close_now()

    async def __aenter__(self) -> Pool:
        await self.warmup()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _cancel_quietly(conn: TrioConnection) -> None:
    try:
        await conn.cancel_safe(timeout=CANCEL_TIMEOUT)
    except (psycopg.Error, OSError) as error:
        log.warning("cancelling a query at pool close failed: %s", type(error).__name__)


class _Lease:
    """The context manager :meth:`Pool.connection` and :meth:`Pool.transaction` return."""

    __slots__ = ("_begin", "_pool", "_slot")

    def __init__(self, pool: Pool, *, begin: bool) -> None:
        self._pool = pool
        self._begin = begin
        self._slot: _Slot | None = None

    async def __aenter__(self) -> TrioConnection:
        slot = self._slot = await self._pool._acquire()
        if self._begin and slot.conn.autocommit:
            try:
                await slot.conn.execute("BEGIN")
            except BaseException:
                await self._pool._release(slot, commit=False)
                raise
        return slot.conn

    async def __aexit__(self, kind: type[BaseException] | None, *exc_info: object) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            await self._pool._release(slot, commit=kind is None)


def _gauges(telemetry: Telemetry, name: str) -> Any:
    """The pool gauges of the metrics feature, or None when it is off (or not installed)."""
    try:
        from .features.metrics import Metrics
    except ImportError:
        return None
    try:
        metrics = telemetry.get(Metrics)
    except LookupError:
        return None
    return metrics.pool_gauges("postgresql", name)


async def pool(dsn: str | Secret, **options: Any) -> AsyncIterator[Pool]:
    """A :class:`Pool` for ``providers.Resource``: made here, closed when the service stops.

    ``options`` are :class:`Pool`'s. The service warms it up (opens
    ``min_size`` connections) before it reports ready, shows its
    :meth:`~Pool.health` on ``/healthz``, and closes it after everything
    using it has drained (see :mod:`mikros_trio.postgres` for the
    declaration).
    """
    made = Pool(dsn, **options)
    try:
        yield made
    finally:
        await made.close()
