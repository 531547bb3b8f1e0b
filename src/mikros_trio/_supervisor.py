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
signal) or cut a script short.
"""

from __future__ import annotations

import logging
import signal as _signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ._component import Component, Lifetime, ShutdownTrigger, _SupervisorView
from ._graph import NodeSpec, Plan, plan
from ._health import ComponentState, Health, Phase
from .errors import ComponentError

__all__ = ["LifecycleEvent", "Supervisor", "Timeouts"]

log = logging.getLogger("mikros_trio")

#: Name used in the event log for service-wide events.
SERVICE = "service"


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


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines, in seconds, that bound each phase (``[lifecycle]`` in service.toml)."""

    start_timeout: float = 15.0
    drain_timeout: float = 10.0
    shutdown_timeout: float = 20.0
    readiness_delay: float = 0.0


# Per-component run states, kept as small ints in a list: the supervisor
# walks them for every component on every start and stop.
_PENDING, _STARTING, _SERVING, _STOPPING, _DONE = range(5)


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
    """

    def __init__(
        self,
        components: Sequence[Component],
        *,
        timeouts: Timeouts = Timeouts(),
        nodes: Sequence[NodeSpec] | None = None,
        handle_signals: bool = False,
        on_event: Callable[[LifecycleEvent], None] | None = None,
    ) -> None:
        self.components = tuple(components)
        if nodes is None:
            nodes = [
                NodeSpec(c.name, c.role, c.depends_on, c.enhanced_by, path=c.name)
                for c in self.components
            ]
        self.plan: Plan = plan(nodes)
        self.timeouts = timeouts
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
        if self._root is not None:
            self._root.cancel()

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> int:
        """Start everything, serve until a trigger, shut down; return the exit code."""
        if self._root is not None:
            raise RuntimeError("a Supervisor runs once")
        with trio.CancelScope() as root:
            self._root = root
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._handle_signals:
                    await nursery.start(self._watch_signals)
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
                nursery.cancel_scope.cancel()  # the signal watcher
        self._health._set_phase(Phase.STOPPED)
        self._event(SERVICE, "stopped", f"exit code {self.exit_code}")
        return self.exit_code

    # -- start ----------------------------------------------------------------

    def _begin_start(self, i: int) -> None:
        component = self.components[i]
        self._state[i] = _STARTING
        self._health._set_component(component.name, ComponentState.STARTING)
        self._event(component.name, "starting")
        scope = trio.CancelScope(deadline=trio.current_time() + self.timeouts.start_timeout)
        self._scopes[i] = scope
        assert self._nursery is not None
        self._nursery.start_soon(self._run_component, i, scope, name=component.name)

    async def _run_component(self, i: int, scope: trio.CancelScope) -> None:
        component = self.components[i]
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
        self._state[i] = _SERVING
        name = self.components[i].name
        scope = self._scopes[i]
        assert scope is not None
        scope.deadline = float("inf")
        self._health._set_component(name, ComponentState.SERVING)
        self._event(name, "started")
        self._ready_count += 1
        if self._trigger is None:
            self._open_ready(i)
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
        warm = [c for c in self.components if type(c).warmup is not Component.warmup]
        if warm and self._trigger is None:
            with trio.CancelScope(
                deadline=trio.current_time() + self.timeouts.start_timeout
            ) as scope:
                self._warmup_scope = scope
                async with trio.open_nursery() as nursery:
                    for component in warm:
                        nursery.start_soon(self._warm_one, component)
            if scope.cancelled_caught and self._trigger is None:
                self._fail(
                    ComponentError(
                        SERVICE, f"warmup did not finish within {self.timeouts.start_timeout:g} s"
                    ),
                    None,
                )
        if self._trigger is None:
            self._health._set_phase(Phase.SERVING)
            self._event(SERVICE, "ready")
        self._settled.set()

    async def _warm_one(self, component: Component) -> None:
        self._event(component.name, "warmup")
        try:
            await component.warmup()
        except Exception as exc:
            self._fail(ComponentError(component.name, f"warmup failed: {exc!r}"), exc)

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
            self._root.deadline = now + self.timeouts.shutdown_timeout
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
        if self.timeouts.readiness_delay > 0:
            await trio.sleep(self.timeouts.readiness_delay)
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
        deadline = trio.current_time() + self.timeouts.drain_timeout
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
            if cut:
                message = f"did not report ready within {self.timeouts.start_timeout:g} s"
            else:
                message = "returned before reporting ready (task_status.started() not called)"
            self._fail(ComponentError(name, message), None)
        elif cut and self._root is not None and self._root.cancel_called:
            why = "forced exit" if self._forced is not None else "shutdown timeout"
            self._event(name, "cut", why)
            log.warning("%s was cancelled by the %s", name, why)
        elif cut and started:
            self._event(name, "cut", f"drain timeout {self.timeouts.drain_timeout:g} s")
            log.warning(
                "%s did not finish draining within %g s and was cancelled",
                name,
                self.timeouts.drain_timeout,
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

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(_signal.SIGTERM, _signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                if self._trigger is None:
                    self._stop_from(_signal_name(signum), None, signum)
                else:
                    # Second signal: the operator wants out now.
                    self.force(signum)

    def _event(self, component: str, phase: str, detail: str = "") -> None:
        event = LifecycleEvent(trio.current_time(), component, phase, detail)
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)


def _root_exception(error: Exception) -> Exception:
    """The one real error inside nested single-member exception groups.

    Components open nurseries, so their errors arrive wrapped; the user
    must read the root cause, not "Exceptions from Trio nursery".
    """
    while isinstance(error, ExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
