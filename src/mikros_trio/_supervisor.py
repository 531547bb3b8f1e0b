"""The supervisor: runs every component in one nursery, in graph order.

The only module that knows about tasks, deadlines, signals and exit codes.

How it works, in one paragraph: every component gets one task, inside its
own cancel scope. Starting walks the graph forwards (a component's task is
spawned when all it requires is ready, so independent components start
together and the total is the critical path); stopping walks it backwards
(a component is asked to stop when everything that requires it has
finished). Each phase is bounded by moving the component's cancel-scope
deadline (start timeout, then drain timeout) — never by sleeping — and the
whole shutdown by the root scope's deadline. Bookkeeping is counters over
the :class:`~mikros_trio._graph.Plan` tables, so start and stop cost
O(components + edges).

Exit codes: 0 clean; the code a component proposed (a script's result);
1 if any component failed; 128 + N when signal N forced an exit (second
signal) or cut a script short; 124 when the watchdog ended a process stuck
past a deadline (see :mod:`._watchdog`).

Signals (``handle_signals``): SIGTERM, SIGINT and SIGHUP begin a graceful
shutdown; any of them once shutdown has begun forces the exit. The handler
is a plain Python signal handler, not Trio's signal receiver: it runs even
while a hook blocks the thread (Python runs handlers between bytecodes,
and blocking calls such as ``time.sleep`` are interrupted for them), so
with a watchdog it can still end the process; and it is never closed with
signals pending, which Trio's receiver redelivers under the default
action, killing the process with no word said.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal as _signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import trio

from ._component import Component, Lifetime, ShutdownTrigger, _SupervisorView
from ._definition import LifecycleSettings
from ._graph import NodeSpec, Plan, plan
from ._health import ComponentState, Health, Phase
from ._watchdog import EXIT_CODE, Watchdog
from .errors import ComponentError

__all__ = ["LifecycleEvent", "Supervisor"]

log = logging.getLogger("mikros_trio")

#: Name used in the event log for service-wide events.
SERVICE = "service"

#: Signals that begin a graceful shutdown, and force the exit once it has begun.
#: SIGHUP drains too: a process manager or a closed terminal sends it, and
#: neither means "lose the work in flight".
SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """One step of the lifecycle: ``component`` reached ``phase`` at Trio ``time``.

    Phases of a component: ``starting``, ``started``, ``warmup``,
    ``stopping``, ``stopped``, ``failed``, ``cut`` (its deadline cancelled
    it). Phases of ``"service"``: ``ready``, ``shutdown`` (``detail`` is the
    trigger), ``forced``, ``stopped`` (``detail`` is the exit code).
    """

    time: float
    component: str
    phase: str
    detail: str = ""

    def __str__(self) -> str:
        tail = f" ({self.detail})" if self.detail else ""
        return f"[{self.time:10.3f}] {self.component}: {self.phase}{tail}"


#: ``[lifecycle]``'s defaults: a supervisor built without a definition (tests, tools).
_DEFAULT_LIFECYCLE = LifecycleSettings()

# Per-component run states, kept as small ints in a list: the supervisor
# walks them for every component on every start and stop.
_PENDING, _STARTING, _SERVING, _STOPPING, _DONE = range(5)
_STATE_NAMES = ("pending", "starting", "serving", "stopping", "stopped")


class _Readiness:
    """The ``task_status`` a component receives; ``started()`` marks it ready."""

    __slots__ = ("_index", "_supervisor")

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self._supervisor = supervisor
        self._index = index

    def started(self, value: Any = None) -> None:
        self._supervisor._on_started(self._index)


class Supervisor(_SupervisorView):
    """Runs components: graph-ordered start, health, signals, two-phase shutdown.

    ``components`` are checked into a plan at construction (``ConfigError``
    on cycles or unknown names), so nothing starts on a bad graph. Run it
    with ``await supervisor.run()``, which returns the exit code; with
    ``nursery.start(supervisor.run)`` the caller resumes once the service
    is ready (if it never gets ready, Trio raises ``RuntimeError`` there:
    use :class:`~mikros_trio.Service`, whose ``run`` always resumes the
    caller).

    ``lifecycle`` gives the deadlines that bound each phase (the
    definition's ``[lifecycle]``; its defaults when not given).
    ``handle_signals`` installs the SIGTERM/SIGINT/SIGHUP handler for the
    run. ``watchdog`` is for a process the service owns
    (:func:`mikros_trio.run`): the supervisor arms it at every start and
    shutdown deadline, and it ends the process (exit 124, or 128 + N after
    a second signal) when the loop cannot; the signal handler then stays
    installed after the run, until the process exits. Never give one
    in-process.
    """

    def __init__(
        self,
        components: Sequence[Component],
        *,
        lifecycle: LifecycleSettings = _DEFAULT_LIFECYCLE,
        nodes: Sequence[NodeSpec] | None = None,
        handle_signals: bool = False,
        on_event: Callable[[LifecycleEvent], None] | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.components = tuple(components)
        if nodes is None:
            nodes = [
                NodeSpec(c.name, c.role, c.depends_on, c.enhanced_by, path=c.name)
                for c in self.components
            ]
        self.plan: Plan = plan(nodes)
        self.lifecycle = lifecycle
        self.events: list[LifecycleEvent] = []
        self.failures: list[ComponentError] = []
        #: Addresses components listen on, by name (see ``Lifetime.publish_address``).
        self.addresses: dict[str, tuple[str, int]] = {}
        self._health = Health()
        self._handle_signals = handle_signals
        self._on_event = on_event
        self._trigger: ShutdownTrigger | None = None
        self._proposed_code: int | None = None
        self._forced: int | None = None
        count = len(self.components)
        self._count = count
        self._state = [_PENDING] * (count + 1)
        self._waiting = [len(r) for r in self.plan.requires]  # requirements not yet ready
        self._holding = [len(d) for d in self.plan.dependents]  # dependents not yet finished
        self._aborted = [False] * count
        self._scopes: list[trio.CancelScope | None] = [None] * count
        self._lifetimes = [Lifetime(c.name, self._stop_from, self) for c in self.components]
        self._ready_count = 0
        self._done_count = 0
        self._stops_open = False
        self._settled = trio.Event()  # ready, or gave up on being ready
        self._all_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._root: trio.CancelScope | None = None
        self._warmup_scope: trio.CancelScope | None = None
        # For the watchdog, which reads them from its own thread: each
        # component's task, the components warming up, the loop's thread.
        self._watchdog = watchdog
        self._tasks: list[trio.lowlevel.Task | None] = [None] * count
        self._warming: dict[str, trio.lowlevel.Task] = {}
        self._loop_thread = 0
        # Components in the order they began starting: their start deadlines
        # come in the same order, so the earliest one pending is at the left.
        self._start_order: deque[int] = deque()
        self._signals_seen = 0
        if watchdog is not None:
            watchdog.report = self._stuck
        for c in self.components:
            self._health._set_component(c.name, ComponentState.PENDING)

    # -- read side ----------------------------------------------------------

    @property
    def health(self) -> Health:
        """The health state probes read."""
        return self._health

    @property
    def trigger(self) -> ShutdownTrigger | None:
        """Why shutdown began, once it has."""
        return self._trigger

    @property
    def exit_code(self) -> int:
        """The process exit code this run earns (meaningful once ``run`` returned)."""
        if self._forced is not None:
            return 128 + self._forced if self._forced else 1
        if self.failures:
            return 1
        return self._proposed_code if self._proposed_code is not None else 0

    # -- control ------------------------------------------------------------

    def stop(self, reason: str = "stop requested", *, exit_code: int | None = None) -> None:
        """Begin graceful shutdown (programmatic trigger). Idempotent."""
        self._stop_from(reason, exit_code)

    def force(self, signum: int | None = None) -> None:
        """Abandon graceful shutdown: cancel everything now, run no more hooks."""
        if self._forced is None:
            # Forcing is a trigger too: readiness goes off and the trigger
            # is recorded even when no graceful shutdown was under way.
            self._stop_from(_signal_name(signum) if signum else "forced exit", None, signum)
            self._forced = signum if signum is not None else 0
            self._event(SERVICE, "forced", _signal_name(signum) if signum else "")
            if signum is not None:
                why = f"forced exit by {_signal_name(signum)}"
                log.warning("%s: cancelling everything now; no more hooks run", why)
                if self._watchdog is not None:
                    # A shielded or blocking task would hold the exit: the
                    # watchdog ends the process if the loop cannot at once.
                    self._watchdog.arm(0.0, 128 + signum, why, sooner=True)
        if self._root is not None:
            self._root.cancel()

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> int:
        """Start everything, serve until a trigger, shut down; return the exit code."""
        if self._root is not None:
            raise RuntimeError("a Supervisor runs once")
        self._loop_thread = threading.get_ident()
        if self._watchdog is not None:
            self._watchdog.start()
        with self._signal_handlers(), trio.CancelScope() as root:
            self._root = root
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._trigger is not None:
                    # stop() came before run(): start nothing, only finish.
                    nursery.start_soon(self._open_stops)
                else:
                    # Roots first, then the barrier if nothing processes work:
                    # the state check keeps a component from starting twice.
                    for i in range(self._count):
                        if self._waiting[i] == 0 and self._state[i] == _PENDING:
                            self._begin_start(i)
                    barrier = self.plan.barrier
                    if self._waiting[barrier] == 0 and self._state[barrier] == _PENDING:
                        self._state[barrier] = _SERVING
                        self._open_ready(barrier)
                    if self._count == 0:
                        self._on_all_started()
                await self._settled.wait()
                if self._health.phase is Phase.SERVING:
                    task_status.started(self)
                await self._all_done.wait()
        self._health._set_phase(Phase.STOPPED)
        self._event(SERVICE, "stopped", f"exit code {self.exit_code}")
        return self.exit_code

    # -- start ----------------------------------------------------------------

    def _begin_start(self, i: int) -> None:
        component = self.components[i]
        self._state[i] = _STARTING
        self._health._set_component(component.name, ComponentState.STARTING)
        self._event(component.name, "starting")
        scope = trio.CancelScope(deadline=trio.current_time() + self.lifecycle.start_timeout)
        self._scopes[i] = scope
        self._start_order.append(i)
        if len(self._start_order) == 1:
            self._arm_start()
        assert self._nursery is not None
        self._nursery.start_soon(self._run_component, i, scope, name=component.name)

    def _arm_start(self) -> None:
        """Arm the watchdog at the earliest start deadline still pending (none: disarm)."""
        watchdog = self._watchdog
        if watchdog is None or self._trigger is not None:
            return
        order = self._start_order
        while order and self._state[order[0]] != _STARTING:
            order.popleft()
        if not order:
            watchdog.disarm()
            return
        first = order[0]
        scope = self._scopes[first]
        assert scope is not None
        limit = self.lifecycle.start_timeout
        watchdog.arm(
            scope.deadline - trio.current_time(),
            EXIT_CODE,
            f"start_timeout ({limit:g} s) passed: {self.components[first].name} "
            "did not report ready",
        )

    async def _run_component(self, i: int, scope: trio.CancelScope) -> None:
        component = self.components[i]
        self._tasks[i] = trio.lowlevel.current_task()
        error: BaseException | None = None
        escaped = True  # a BaseException (Cancelled from outside) is leaving
        try:
            with scope:
                await component.run(self._lifetimes[i], task_status=_Readiness(self, i))
            escaped = False
        except Exception as exc:  # a component's failure is data, not a crash of the supervisor
            escaped = False
            error = _root_exception(exc)
        except BaseExceptionGroup as group:
            # The root scope's cancellation (shutdown timeout, force) mixed
            # with errors raised while unwinding: keep the errors as data,
            # let the cancellation go on.
            errors, rest = group.split(Exception)
            if errors is not None:
                error = _root_exception(errors)
            if rest is not None:
                raise rest from None
            escaped = False  # an odd BaseExceptionGroup subclass holding only Exceptions
        finally:
            # The root scope's cancellation is not caught by ``scope`` but
            # passes through it: that cuts the component as well.
            root = self._root
            cut = scope.cancelled_caught or (escaped and root is not None and root.cancel_called)
            self._on_finished(i, error, cut)

    def _on_started(self, i: int) -> None:
        if self._aborted[i]:
            return  # shutdown began while it was starting: it is being cancelled
        state = self._state[i]
        if state != _STARTING:
            name = self.components[i].name
            raise RuntimeError(f"{name}: task_status.started() called twice or too late")
        scope = self._scopes[i]
        assert scope is not None
        if scope.cancel_called or trio.current_time() >= scope.deadline:
            # Ready too late (its start shielded itself or blocked the
            # thread past start_timeout): a failed start, not a late
            # "ready". Cancelled, it fails when it next checkpoints.
            scope.cancel()
            return
        self._state[i] = _SERVING
        name = self.components[i].name
        scope.deadline = float("inf")
        self._health._set_component(name, ComponentState.SERVING)
        self._event(name, "started")
        self._ready_count += 1
        if self._trigger is None:
            self._open_ready(i)
            self._arm_start()
        if self._ready_count == self._count:
            self._on_all_started()

    def _open_ready(self, first: int) -> None:
        """``first`` is ready: start whatever now has all its requirements ready."""
        stack = [first]
        barrier = self.plan.barrier
        while stack:
            i = stack.pop()
            for d in self.plan.dependents[i]:
                self._waiting[d] -= 1
                if self._waiting[d] == 0:
                    if d == barrier:
                        self._state[d] = _SERVING
                        stack.append(d)
                    else:
                        self._begin_start(d)

    def _on_all_started(self) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._warmup)

    async def _warmup(self) -> None:
        # A resource knows whether it has a warmup only once its value exists.
        warm = [
            c
            for c in self.components
            if type(c).warmup is not Component.warmup and getattr(c, "wants_warmup", True)
        ]
        if warm and self._trigger is None:
            limit = self.lifecycle.start_timeout
            if self._watchdog is not None:
                self._watchdog.arm(
                    limit, EXIT_CODE, f"start_timeout ({limit:g} s) passed: warmup did not finish"
                )
            with trio.CancelScope(deadline=trio.current_time() + limit) as scope:
                self._warmup_scope = scope
                async with trio.open_nursery() as nursery:
                    for component in warm:
                        nursery.start_soon(self._warm_one, component)
            late = scope.cancelled_caught or trio.current_time() >= scope.deadline
            if late and self._trigger is None:
                self._fail(
                    ComponentError(
                        SERVICE, f"warmup did not finish within {self.lifecycle.start_timeout:g} s"
                    ),
                    None,
                )
        if self._trigger is None:
            if self._watchdog is not None:
                self._watchdog.disarm()  # serving has no deadline
            self._health._set_phase(Phase.SERVING)
            self._event(SERVICE, "ready")
        self._settled.set()

    async def _warm_one(self, component: Component) -> None:
        self._event(component.name, "warmup")
        self._warming[component.name] = trio.lowlevel.current_task()
        try:
            await component.warmup()
        except Exception as exc:
            cause = _root_exception(exc)
            self._fail(ComponentError(component.name, f"warmup failed: {_describe(cause)}"), cause)
        finally:
            del self._warming[component.name]

    # -- stop -----------------------------------------------------------------

    def _stop_from(self, reason: str, exit_code: int | None, signum: int | None = None) -> None:
        if exit_code is not None and self._proposed_code is None:
            self._proposed_code = exit_code
        if self._trigger is not None:
            return  # idempotent: the first trigger owns the shutdown
        now = trio.current_time()
        self._trigger = ShutdownTrigger(reason, signum, now)
        self._health._set_phase(Phase.DRAINING)
        self._event(SERVICE, "shutdown", reason)
        self._settled.set()
        if self._root is not None:
            self._root.deadline = now + self.lifecycle.shutdown_timeout
        if self._watchdog is not None:
            limit = self.lifecycle.shutdown_timeout
            self._watchdog.arm(
                limit, EXIT_CODE, f"shutdown_timeout ({limit:g} s) passed since {reason}"
            )
        if self._warmup_scope is not None:
            self._warmup_scope.cancel()
        # Starts in flight are abandoned: nothing that has not reported ready
        # gets stop hooks. Components never begun are finished right away.
        for i in range(self._count):
            state = self._state[i]
            if state == _STARTING:
                self._aborted[i] = True
                scope = self._scopes[i]
                assert scope is not None
                scope.cancel()
            elif state == _PENDING:
                self._finish(i)
        if self._nursery is not None:
            self._nursery.start_soon(self._open_stops)

    async def _open_stops(self) -> None:
        # Readiness is already off; the delay lets load balancers notice
        # before anything stops accepting work.
        if self.lifecycle.readiness_delay > 0:
            await trio.sleep(self.lifecycle.readiness_delay)
        self._stops_open = True
        for i in range(self._count + 1):
            if self._holding[i] == 0 and self._state[i] != _DONE:
                self._begin_stop(i)

    def _begin_stop(self, i: int) -> None:
        if i == self.plan.barrier:
            self._finish(i)
            return
        if self._state[i] != _SERVING or self._forced is not None:
            return  # starting (aborted above), already finished, or forced: no more hooks
        self._state[i] = _STOPPING
        component = self.components[i]
        self._health._set_component(component.name, ComponentState.DRAINING)
        self._event(component.name, "stopping")
        deadline = trio.current_time() + self.lifecycle.drain_timeout
        self._lifetimes[i]._begin_stopping(deadline)
        scope = self._scopes[i]
        assert scope is not None
        scope.deadline = min(scope.deadline, deadline)

    def _on_finished(self, i: int, error: BaseException | None, cut: bool) -> None:
        component = self.components[i]
        name = component.name
        state = self._state[i]
        started = state in (_SERVING, _STOPPING)
        failed = error is not None or (state == _STARTING and not self._aborted[i])
        if error is not None:
            what = {
                _STARTING: "failed to start",
                _SERVING: "crashed",
                _STOPPING: "failed while stopping",
            }[state]
            self._fail(ComponentError(name, f"{what}: {_describe(error)}"), error)
        elif state == _STARTING and not self._aborted[i]:
            scope = self._scopes[i]
            if cut or (scope is not None and scope.cancel_called):
                message = f"did not report ready within {self.lifecycle.start_timeout:g} s"
            else:
                message = "returned before reporting ready (task_status.started() not called)"
            self._fail(ComponentError(name, message), None)
        elif cut and self._root is not None and self._root.cancel_called:
            why = "forced exit" if self._forced is not None else "shutdown timeout"
            self._event(name, "cut", why)
            log.warning("%s was cancelled by the %s", name, why)
        elif cut and started:
            self._event(name, "cut", f"drain timeout {self.lifecycle.drain_timeout:g} s")
            log.warning(
                "%s did not finish draining within %g s and was cancelled",
                name,
                self.lifecycle.drain_timeout,
            )
        elif state == _SERVING:
            # Returned on its own while serving: the service has nothing
            # left to do (a script finished, a worker ended).
            self._stop_from(f"{name} finished", None)
        if not failed:
            self._health._set_component(name, ComponentState.STOPPED)
        self._event(name, "failed" if failed else "stopped")
        self._finish(i)

    def _finish(self, first: int) -> None:
        """Mark ``first`` finished and begin stopping what it was holding up."""
        stack = [first]
        while stack:
            i = stack.pop()
            if self._state[i] == _DONE:
                continue
            self._state[i] = _DONE
            if i < self._count:
                self._done_count += 1
                if self._done_count == self._count:
                    self._all_done.set()
            for j in self.plan.requires[i]:
                self._holding[j] -= 1
                if self._holding[j] == 0 and self._stops_open:
                    if j == self.plan.barrier:
                        stack.append(j)
                    else:
                        self._begin_stop(j)
        if self._count == 0:
            self._all_done.set()

    def _fail(self, failure: ComponentError, cause: BaseException | None) -> None:
        failure.__cause__ = cause
        self.failures.append(failure)
        if failure.component in self._health.components:
            self._health._set_component(failure.component, ComponentState.FAILED)
        # The first failure is the root cause and is logged first, alone;
        # everything it sets off comes after it.
        log.error("%s", failure, exc_info=cause)
        self._stop_from(f"{failure.component} failed", None)

    # -- signals ------------------------------------------------------------

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if not self._handle_signals:
            yield
            return
        token = trio.lowlevel.current_trio_token()

        def handler(signum: int, frame: FrameType | None) -> None:
            # Runs in the main thread between two bytecodes, perhaps in the
            # middle of the loop's own code: no locks, no I/O, no logging
            # here. The loop does the work; the watchdog backs it up.
            self._signals_seen += 1
            graceful = self._signals_seen == 1 and self._trigger is None
            watchdog = self._watchdog
            if watchdog is not None:
                # Armed from here, the watchdog acts even if the loop never
                # gets to this signal (a blocked thread, a shielded task).
                if graceful:
                    limit = self.lifecycle.shutdown_timeout
                    why = f"shutdown_timeout ({limit:g} s) passed since {_signal_name(signum)}"
                    watchdog.arm(limit, EXIT_CODE, why, sooner=True)
                else:
                    why = f"forced exit by {_signal_name(signum)}"
                    watchdog.arm(0.0, 128 + signum, why, sooner=True)
            # The run may be over (the handler outlives it under a
            # watchdog, which was armed above).
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._on_signal, signum, graceful)

        previous = {signum: _signal.signal(signum, handler) for signum in SIGNALS}
        try:
            yield
        finally:
            # Without a watchdog the process goes on (tests): give the
            # signals back. With one, the process is ending: a signal from
            # now until the exit still forces it, with the framework's word.
            if self._watchdog is None:
                for signum, old in previous.items():
                    _signal.signal(signum, old)

    def _on_signal(self, signum: int, graceful: bool) -> None:
        if graceful:
            self._stop_from(_signal_name(signum), None, signum)
        else:
            # A signal once shutdown began: the operator wants out now.
            self.force(signum)

    def _stuck(self) -> list[str]:
        """What still runs and where: one line per unfinished component (the watchdog's report).

        Called from the watchdog's thread while the loop is stuck: it only
        reads, and tolerates what it reads changing under it.
        """
        # The thread's innermost frame: Trio's own when the loop is idle
        # (waiting for I/O), the user's when something blocks it.
        loop_frame = sys._current_frames().get(self._loop_thread)
        loop_where = None if loop_frame is None or _in_trio(loop_frame) else _at(loop_frame)
        lines: list[str] = []
        running: list[tuple[str, str, trio.lowlevel.Task | None]] = [
            (self.components[i].name, _STATE_NAMES[state], self._tasks[i])
            for i, state in enumerate(list(self._state[: self._count]))
            if state in (_STARTING, _STOPPING)
        ]
        running += [(name, "warmup", task) for name, task in list(self._warming.items())]
        for name, phase, task in running:
            where = None
            if task is not None:
                coro: Any = task.coro
                # A task running now is the one blocking the thread: the
                # thread's stack says where; a suspended one, its await chain.
                if getattr(coro, "cr_running", False):
                    where, loop_where = loop_where, None
                else:
                    where = _where(frame for frame, _ in task.iter_await_frames())
            lines.append(f"{name} ({phase})" + (f" at {where}" if where else ""))
        if loop_where is not None:
            lines.append(f"the Trio thread is at {loop_where}")
        if not running:
            # Past the components: the flush, or the interpreter's exit
            # waiting for the threads it must join.
            lines.append("no component is starting or stopping; non-daemon threads: " + _threads())
        return lines

    def _event(self, component: str, phase: str, detail: str = "") -> None:
        event = LifecycleEvent(trio.current_time(), component, phase, detail)
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)


def _root_exception(error: Exception) -> Exception:
    """The one real error inside nested single-member exception groups.

    Components open nurseries, so their errors arrive wrapped; the user
    must read the root cause, not "Exceptions from Trio nursery". A group
    of several errors stays a group, so the log keeps every traceback;
    :func:`_describe` names its first error.
    """
    while isinstance(error, ExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _describe(error: BaseException) -> str:
    """``Type: message`` of ``error``; of a group, its first error's, then how many more.

    The first line of a failure names the user's own exception, never
    "ExceptionGroup: Exceptions from Trio nursery".
    """
    leaves = list(_leaves(error))
    first = leaves[0]
    text = str(first)
    head = f"{type(first).__name__}: {text}" if text else type(first).__name__
    if len(leaves) == 1:
        return head
    more = len(leaves) - 1
    return f"{head} (and {more} more error{'s' if more > 1 else ''} at once)"


def _leaves(error: BaseException) -> Iterator[BaseException]:
    """The errors inside ``error``'s (nested) groups, depth first; ``error`` if no group."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


#: Frames in Trio's own code say nothing about where a task is stuck.
_TRIO_DIR = os.path.dirname(trio.__file__) + os.sep


def _in_trio(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(_TRIO_DIR)


def _at(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


def _where(frames: Iterable[FrameType]) -> str | None:
    """Where the innermost frame outside Trio is (None if all are Trio's)."""
    found = None
    for frame in frames:
        if not _in_trio(frame):
            found = frame
    return None if found is None else _at(found)


def _threads() -> str:
    main = threading.main_thread()
    names = [t.name for t in threading.enumerate() if not t.daemon and t is not main]
    return ", ".join(names) or "none"


def _signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
