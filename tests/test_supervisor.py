"""The supervisor: concurrent graph-ordered start, shutdown sequence, failures, signals."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from mikros_trio._component import Component, Lifetime, Role
from mikros_trio._definition import LifecycleSettings
from mikros_trio._health import ComponentState, Phase
from mikros_trio._supervisor import SERVICE, LifecycleEvent, Supervisor
from mikros_trio._watchdog import EXIT_CODE, MARGIN, Watchdog

P = Role.PROCESSING
G = Role.GENERATING


class Boom(Exception):
    """What the test components raise."""


class Probe(Component):
    """A well-behaved component; subclasses override one step to misbehave.

    ``start`` and ``drain`` are Trio seconds spent before ``started()`` and
    after stopping was asked; ``stops`` counts how often its stop code ran.
    """

    def __init__(
        self,
        name: str,
        role: Role = P,
        depends_on: Sequence[str] = (),
        *,
        start: float = 0.0,
        drain: float = 0.0,
    ) -> None:
        self.name = name
        self.role = role
        self.depends_on = tuple(depends_on)
        self.start = start
        self.drain = drain
        self.runs = 0
        self.stops = 0

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.runs += 1
        await self.setup()
        task_status.started()
        await self.serve(lifetime)
        self.stops += 1
        await self.stop(lifetime)

    async def setup(self) -> None:
        await trio.sleep(self.start)

    async def serve(self, lifetime: Lifetime) -> None:
        await lifetime.wait_stopping()

    async def stop(self, lifetime: Lifetime) -> None:
        await trio.sleep(self.drain)


def chain(count: int, factory: type[Probe] = Probe, **kwargs: Any) -> list[Probe]:
    """c1 ← c2 ← … ← c<count>: each depends on the one before."""
    return [
        factory(f"c{i}", depends_on=[f"c{i - 1}"] if i > 1 else (), **kwargs)
        for i in range(1, count + 1)
    ]


def phases(supervisor: Supervisor, component: str) -> list[str]:
    return [e.phase for e in supervisor.events if e.component == component]


def event(supervisor: Supervisor, component: str, phase: str) -> LifecycleEvent:
    (found,) = [e for e in supervisor.events if e.component == component and e.phase == phase]
    return found


def order(supervisor: Supervisor, phase: str) -> list[str]:
    return [e.component for e in supervisor.events if e.phase == phase and e.component != SERVICE]


async def serve_then(supervisor: Supervisor, action: Any = None) -> int:
    """Run ``supervisor`` until ready, call ``action()``, wait for the exit code."""
    code = -1

    async def run(task_status: trio.TaskStatus[None]) -> None:
        nonlocal code
        code = await supervisor.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        if action is not None:
            action()
    assert code == supervisor.exit_code
    return code


async def run_to_end(supervisor: Supervisor) -> int:
    """Run ``supervisor`` to completion (for runs that never get ready)."""
    code = await supervisor.run()
    assert code == supervisor.exit_code
    return code


# -- start: concurrency and ordering ---------------------------------------------------


async def test_layers_start_concurrently(autojump_clock: trio.testing.MockClock) -> None:
    """3 layers x 10 components of 1 s each are ready after the critical path (3 s), not 30."""
    components: list[Component] = []
    for layer in range(3):
        previous = [f"l{layer - 1}n{n}" for n in range(10)] if layer else []
        components += [Probe(f"l{layer}n{n}", depends_on=previous, start=1) for n in range(10)]
    supervisor = Supervisor(components)
    t0 = trio.current_time()
    ready_at = -1.0

    def note_ready() -> None:
        nonlocal ready_at
        ready_at = trio.current_time() - t0
        supervisor.stop()

    assert await serve_then(supervisor, note_ready) == 0
    assert 3.0 <= ready_at < 3.5
    assert 3.0 <= event(supervisor, SERVICE, "ready").time - t0 < 3.5


async def test_component_gets_its_own_lifetime(autojump_clock: trio.testing.MockClock) -> None:
    """run() receives a Lifetime named after the component and health readable through it."""
    seen: list[tuple[str, bool]] = []

    class Peek(Probe):
        async def serve(self, lifetime: Lifetime) -> None:
            seen.append((lifetime.name, lifetime.health.ready))
            await lifetime.wait_stopping()
            assert lifetime.trigger is not None
            assert lifetime.trigger.reason == "test over"

    supervisor = Supervisor([Peek("one")])
    assert await serve_then(supervisor, lambda: supervisor.stop("test over")) == 0
    assert seen == [("one", False)]  # run() serves before the service is ready


async def test_run_twice_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    """A Supervisor runs once."""
    supervisor = Supervisor([Probe("a")])
    await serve_then(supervisor, supervisor.stop)
    with pytest.raises(RuntimeError, match="runs once"):
        await supervisor.run()


# -- shutdown -------------------------------------------------------------------


async def test_stop_is_reverse_order_and_idempotent(autojump_clock: trio.testing.MockClock) -> None:
    """stop() x5 plus a component's own lifetime.stop(): each stops once, in reverse, exit 0."""

    class AlsoStops(Probe):
        async def serve(self, lifetime: Lifetime) -> None:
            await lifetime.wait_stopping()
            lifetime.stop("me too")

    components = [*chain(3, drain=1), AlsoStops("c4", depends_on=["c3"], drain=1)]
    supervisor = Supervisor(components)

    def stop_five_times() -> None:
        for n in range(5):
            supervisor.stop(f"stop {n}")

    assert await serve_then(supervisor, stop_five_times) == 0
    supervisor.stop("after the end")
    assert order(supervisor, "stopping") == ["c4", "c3", "c2", "c1"]
    assert order(supervisor, "stopped") == ["c4", "c3", "c2", "c1"]
    assert [c.stops for c in components] == [1, 1, 1, 1]
    assert [c.runs for c in components] == [1, 1, 1, 1]
    assert [e.detail for e in supervisor.events if e.phase == "shutdown"] == ["stop 0"]
    assert supervisor.trigger is not None
    assert supervisor.trigger.reason == "stop 0"
    assert supervisor.trigger.signal is None
    last = supervisor.events[-1]
    assert last == LifecycleEvent(last.time, SERVICE, "stopped", "exit code 0")
    assert str(last) == f"[{last.time:10.3f}] service: stopped (exit code 0)"
    assert str(event(supervisor, "c1", "started")).endswith("] c1: started")


async def test_readiness_delay_holds_stops_back(autojump_clock: trio.testing.MockClock) -> None:
    """Readiness is off at once; nothing is asked to stop until the readiness delay elapsed."""
    probe = Probe("a")
    supervisor = Supervisor([probe], lifecycle=LifecycleSettings(readiness_delay=5))
    stop_at = -1.0

    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        stop_at = trio.current_time()
        supervisor.stop()
        assert supervisor.health.phase is Phase.DRAINING
        assert not supervisor.health.ready
        await trio.sleep(4.999)
        assert phases(supervisor, "a") == ["starting", "started"]
        assert supervisor.health.components["a"] is ComponentState.SERVING
    assert event(supervisor, "a", "stopping").time - stop_at == pytest.approx(5)
    assert supervisor.exit_code == 0


async def test_drain_deadline_cuts_a_component_ignoring_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A component that never returns is cancelled at the drain deadline; the service exits."""

    class Deaf(Probe):
        async def serve(self, lifetime: Lifetime) -> None:
            await trio.sleep_forever()

    supervisor = Supervisor(
        [Probe("db"), Deaf("server", G)],
        lifecycle=LifecycleSettings(drain_timeout=3, shutdown_timeout=20),
    )
    stop_at = -1.0

    def stop() -> None:
        nonlocal stop_at
        stop_at = trio.current_time()
        supervisor.stop()

    assert await serve_then(supervisor, stop) == 0
    cut = event(supervisor, "server", "cut")
    assert cut.time - stop_at == pytest.approx(3)
    assert cut.detail == "drain timeout 3 s"
    assert phases(supervisor, "server")[-1] == "stopped"
    # The processing side stops only after the cut generating side finished.
    assert event(supervisor, "db", "stopping").time - stop_at == pytest.approx(3)
    assert supervisor.failures == []


async def test_shutdown_timeout_cuts_whatever_is_still_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At shutdown_timeout every component still running is cancelled and logged as cut."""

    class Slow(Probe):
        async def stop(self, lifetime: Lifetime) -> None:
            await trio.sleep(100)

    supervisor = Supervisor(
        [Slow("db"), Probe("cache", depends_on=["db"], drain=4)],
        lifecycle=LifecycleSettings(drain_timeout=50, shutdown_timeout=10),
    )
    stop_at = -1.0

    def stop() -> None:
        nonlocal stop_at
        stop_at = trio.current_time()
        supervisor.stop()

    await serve_then(supervisor, stop)
    assert event(supervisor, "cache", "stopped").time - stop_at == pytest.approx(4)
    cut = event(supervisor, "db", "cut")
    assert cut.time - stop_at == pytest.approx(10)
    assert cut.detail == "shutdown timeout"
    assert event(supervisor, SERVICE, "stopped").time - stop_at == pytest.approx(10)


async def test_shielded_component_delays_exit_past_shutdown_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Trio cannot abandon a task: a shielded drain holds the exit; the rest is cut on time."""

    class Shielded(Probe):
        async def stop(self, lifetime: Lifetime) -> None:
            with trio.CancelScope(shield=True):
                for _ in range(30):  # bounded, so the test cannot hang
                    await trio.sleep(1)

    class Slow(Probe):
        async def stop(self, lifetime: Lifetime) -> None:
            await trio.sleep(100)

    supervisor = Supervisor(
        [Slow("db"), Shielded("server", G)],
        lifecycle=LifecycleSettings(drain_timeout=50, shutdown_timeout=10),
    )
    stop_at = -1.0

    def stop() -> None:
        nonlocal stop_at
        stop_at = trio.current_time()
        supervisor.stop()

    await serve_then(supervisor, stop)
    assert event(supervisor, "server", "stopped").time - stop_at == pytest.approx(30)
    # db never got to stop: it was still waiting for server when the deadline hit.
    assert "stopping" not in phases(supervisor, "db")
    assert event(supervisor, SERVICE, "stopped").time - stop_at == pytest.approx(30)


async def test_force_cancels_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """force(signum) during a slow drain cancels everything now; exit code is 128 + signum."""
    components = chain(3, drain=100)
    supervisor = Supervisor(
        components, lifecycle=LifecycleSettings(drain_timeout=500, shutdown_timeout=900)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        supervisor.stop()
        await trio.sleep(10)  # c3 is draining; c2 and c1 wait for it
        force_at = trio.current_time()
        supervisor.force(signal.SIGTERM)
        supervisor.force(signal.SIGINT)  # idempotent: the first force picks the code
    assert supervisor.exit_code == 128 + signal.SIGTERM
    assert event(supervisor, SERVICE, "forced").detail == "SIGTERM"
    assert event(supervisor, SERVICE, "stopped").time == force_at
    assert event(supervisor, "c3", "cut").detail == "forced exit"
    assert "stopping" not in phases(supervisor, "c2")


async def test_force_while_serving(autojump_clock: trio.testing.MockClock) -> None:
    """force() with no shutdown under way is itself the trigger: readiness off, exit 1."""
    supervisor = Supervisor(chain(2))
    assert await serve_then(supervisor, supervisor.force) == 1
    assert supervisor.trigger is not None
    assert [e.phase for e in supervisor.events if e.component == SERVICE] == [
        "ready",
        "shutdown",
        "forced",
        "stopped",
    ]
    assert set(order(supervisor, "cut")) == {"c1", "c2"}
    assert supervisor.health.phase is Phase.STOPPED


# -- failure at start -------------------------------------------------------------


class FailsToStart(Probe):
    async def setup(self) -> None:
        await trio.sleep(self.start)
        raise Boom(f"{self.name} cannot start")


async def test_failed_start_stops_what_started_in_reverse(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """c3 of a 5-chain fails to start: c2 then c1 stop, c4 and c5 never start, exit 1."""
    components: list[Probe] = chain(5, start=1, drain=1)
    components[2] = FailsToStart("c3", depends_on=["c2"], start=1)
    supervisor = Supervisor(components)
    assert await run_to_end(supervisor) == 1
    assert order(supervisor, "starting") == ["c1", "c2", "c3"]
    assert order(supervisor, "stopping") == ["c2", "c1"]
    assert order(supervisor, "stopped") == ["c2", "c1"]
    assert phases(supervisor, "c3") == ["starting", "failed"]
    assert [c.runs for c in components] == [1, 1, 1, 0, 0]
    root = supervisor.failures[0]
    assert root.component == "c3"
    assert str(root) == "c3: failed to start: Boom: c3 cannot start"
    assert isinstance(root.__cause__, Boom)
    assert len(supervisor.failures) == 1
    assert supervisor.trigger is not None
    assert supervisor.trigger.reason == "c3 failed"
    assert "ready" not in phases(supervisor, SERVICE)
    states = supervisor.health.components
    assert [states[f"c{i}"] for i in range(1, 6)] == [
        ComponentState.STOPPED,
        ComponentState.STOPPED,
        ComponentState.FAILED,
        ComponentState.PENDING,
        ComponentState.PENDING,
    ]


async def test_never_ready_fails_at_start_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """A component that never calls started() is failed (and cancelled) at start_timeout."""

    class Hangs(Probe):
        async def setup(self) -> None:
            await trio.sleep_forever()

    supervisor = Supervisor(
        [Probe("db"), Hangs("api", G)], lifecycle=LifecycleSettings(start_timeout=7)
    )
    t0 = trio.current_time()
    assert await run_to_end(supervisor) == 1
    (failure,) = supervisor.failures
    assert str(failure) == "api: did not report ready within 7 s"
    assert event(supervisor, "api", "failed").time - t0 == pytest.approx(7)
    assert supervisor.health.components["api"] is ComponentState.FAILED
    assert phases(supervisor, "db") == ["starting", "started", "stopping", "stopped"]


async def test_shielded_start_past_start_timeout_is_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A start that shields itself past start_timeout fails (exit 1) instead of going ready late."""

    class Shielded(Probe):
        async def setup(self) -> None:
            with trio.CancelScope(shield=True):
                await trio.sleep(20)

    supervisor = Supervisor(
        [Shielded("db"), Probe("server", G)], lifecycle=LifecycleSettings(start_timeout=1)
    )
    with trio.fail_after(100):  # ready late, it would serve forever
        assert await run_to_end(supervisor) == 1
    (failure,) = supervisor.failures
    assert str(failure) == "db: did not report ready within 1 s"
    assert "ready" not in phases(supervisor, SERVICE)
    assert "started" not in phases(supervisor, "db")
    assert phases(supervisor, "server") == []  # never began


async def test_start_blocking_the_thread_past_start_timeout_is_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A start that holds the thread past start_timeout (no checkpoint) is failed, not ready."""

    class Blocks(Probe):
        async def setup(self) -> None:
            autojump_clock.jump(20)  # the loop's clock moves on; the task never yields

    supervisor = Supervisor([Blocks("db")], lifecycle=LifecycleSettings(start_timeout=1))
    with trio.fail_after(100):  # ready late, it would serve forever
        assert await run_to_end(supervisor) == 1
    (failure,) = supervisor.failures
    assert str(failure) == "db: did not report ready within 1 s"
    assert "ready" not in phases(supervisor, SERVICE)


async def test_group_of_errors_names_its_first_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A start failing with a group of two errors is described by its first error, not the group."""

    class TwoErrors(Probe):
        async def setup(self) -> None:
            raise ExceptionGroup("outer", [ExceptionGroup("inner", [Boom("first")]), KeyError("k")])

    supervisor = Supervisor([TwoErrors("db")])
    assert await run_to_end(supervisor) == 1
    (failure,) = supervisor.failures
    assert str(failure) == "db: failed to start: Boom: first (and 1 more error at once)"
    # The log keeps every traceback: the cause is the whole group.
    assert isinstance(failure.__cause__, ExceptionGroup)


async def test_returning_before_ready_is_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    """A component whose run() returns without calling started() fails the start."""

    class Quits(Probe):
        async def run(
            self,
            lifetime: Lifetime,
            *,
            task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            await trio.sleep(1)

    supervisor = Supervisor([Quits("q")])
    assert await run_to_end(supervisor) == 1
    (failure,) = supervisor.failures
    assert str(failure) == ("q: returned before reporting ready (task_status.started() not called)")
    assert phases(supervisor, "q") == ["starting", "failed"]
    assert supervisor.health.components["q"] is ComponentState.FAILED


async def test_first_start_failure_is_the_root_cause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Of concurrent start failures, the first recorded is failures[0] and owns the trigger."""

    class BreaksWhenCancelled(Probe):
        async def setup(self) -> None:
            try:
                await trio.sleep(10)
            except trio.Cancelled:
                raise Boom("broke while cancelled") from None

    supervisor = Supervisor(
        [
            FailsToStart("early", start=1),
            BreaksWhenCancelled("late"),
            FailsToStart("slow", start=2),
        ]
    )
    assert await run_to_end(supervisor) == 1
    assert [f.component for f in supervisor.failures] == ["early", "late"]
    assert supervisor.trigger is not None
    assert supervisor.trigger.reason == "early failed"
    # slow was starting when shutdown began: abandoned, not failed.
    assert phases(supervisor, "slow") == ["starting", "stopped"]


async def test_simultaneous_start_failures(autojump_clock: trio.testing.MockClock) -> None:
    """Two starts failing at one instant: the first recorded owns the trigger, the other unwinds."""
    supervisor = Supervisor([FailsToStart("x", start=1), FailsToStart("y", start=1)])
    assert await run_to_end(supervisor) == 1
    first = supervisor.failures[0].component
    other = "y" if first == "x" else "x"
    assert supervisor.trigger is not None
    assert supervisor.trigger.reason == f"{first} failed"
    # The other was cancelled before it could raise (Trio delivers the
    # cancellation at its next checkpoint), so it was abandoned, not failed.
    assert len(supervisor.failures) == 1
    assert phases(supervisor, other) == ["starting", "stopped"]
    assert event(supervisor, other, "stopped").time == event(supervisor, first, "failed").time


async def test_started_twice_crashes_the_component(autojump_clock: trio.testing.MockClock) -> None:
    """Calling task_status.started() twice breaks the contract: the component fails."""

    class Twice(Probe):
        async def run(
            self,
            lifetime: Lifetime,
            *,
            task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            task_status.started()
            task_status.started()

    supervisor = Supervisor([Twice("t")])
    assert await run_to_end(supervisor) == 1
    (failure,) = supervisor.failures
    assert "started() called twice" in str(failure)


# -- after start ------------------------------------------------------------------


async def test_crash_after_start_stops_the_rest(autojump_clock: trio.testing.MockClock) -> None:
    """A serving component crashing triggers shutdown of the rest in reverse; exit 1."""

    class Crashes(Probe):
        async def serve(self, lifetime: Lifetime) -> None:
            await trio.sleep(5)
            raise Boom("crash")

    components = [*chain(3, drain=1), Crashes("c4", depends_on=["c2"])]
    supervisor = Supervisor(components)
    assert await serve_then(supervisor) == 1
    (failure,) = supervisor.failures
    assert str(failure) == "c4: crashed: Boom: crash"
    assert order(supervisor, "stopping") == ["c3", "c2", "c1"]
    assert phases(supervisor, "c4") == ["starting", "started", "failed"]
    assert supervisor.health.components["c4"] is ComponentState.FAILED
    assert supervisor.health.phase is Phase.STOPPED


async def test_component_returning_ends_service_gracefully(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A serving component that returns on its own triggers graceful shutdown, exit 0."""

    class Done(Probe):
        async def serve(self, lifetime: Lifetime) -> None:
            await trio.sleep(5)

    supervisor = Supervisor([Probe("db", drain=1), Done("job", G)])
    assert await serve_then(supervisor) == 0
    assert supervisor.trigger is not None
    assert supervisor.trigger.reason == "job finished"
    assert phases(supervisor, "job") == ["starting", "started", "stopped"]
    assert phases(supervisor, "db") == ["starting", "started", "stopping", "stopped"]


@pytest.mark.parametrize("code", [0, 3])
async def test_component_proposes_exit_code(
    code: int, autojump_clock: trio.testing.MockClock
) -> None:
    """lifetime.stop(exit_code=N) then returning makes N the service's exit code."""

    class Script(Probe):
        async def serve(self, lifetime: Lifetime) -> None:
            await trio.sleep(1)
            lifetime.stop("script finished", exit_code=code)

    supervisor = Supervisor([Probe("db"), Script("script", G)])
    assert await serve_then(supervisor) == code
    assert supervisor.trigger is not None
    assert supervisor.trigger.reason == "script: script finished"


async def test_failure_wins_over_proposed_code(autojump_clock: trio.testing.MockClock) -> None:
    """A failure while stopping makes the exit code 1 whatever was proposed."""

    class BadStop(Probe):
        async def stop(self, lifetime: Lifetime) -> None:
            raise Boom("flush failed")

    supervisor = Supervisor([BadStop("logs")])
    assert await serve_then(supervisor, lambda: supervisor.stop(exit_code=0)) == 1
    assert str(supervisor.failures[0]) == "logs: failed while stopping: Boom: flush failed"


# -- warmup -----------------------------------------------------------------------


class Warm(Probe):
    async def warmup(self) -> None:
        await trio.sleep(2)


async def test_warmup_after_all_started_before_serving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """warmup() runs once every component is ready, and the service is ready after it."""
    phase_during_warmup: list[Phase] = []

    class Watched(Warm):
        async def warmup(self) -> None:
            phase_during_warmup.append(supervisor.health.phase)
            await super().warmup()

    supervisor = Supervisor([Watched("cache"), Probe("server", G, ["cache"], start=3)])
    assert await serve_then(supervisor, supervisor.stop) == 0
    names = [(e.component, e.phase) for e in supervisor.events]
    warm = names.index(("cache", "warmup"))
    assert names.index(("server", "started")) < warm < names.index((SERVICE, "ready"))
    assert event(supervisor, SERVICE, "ready").time - event(
        supervisor, "cache", "warmup"
    ).time == pytest.approx(2)
    assert phase_during_warmup == [Phase.STARTING]


async def test_failing_warmup_exits_1(autojump_clock: trio.testing.MockClock) -> None:
    """A warmup that raises fails the start: never ready, everything stops, exit 1."""

    class Cold(Probe):
        async def warmup(self) -> None:
            raise Boom("cold")

    supervisor = Supervisor([Cold("cache"), Warm("other"), Probe("server", G)])
    assert await run_to_end(supervisor) == 1
    assert str(supervisor.failures[0]) == "cache: warmup failed: Boom: cold"
    assert len(supervisor.failures) == 1
    assert "ready" not in phases(supervisor, SERVICE)
    assert order(supervisor, "stopped") == ["server", "cache", "other"] or order(
        supervisor, "stopped"
    ) == ["server", "other", "cache"]


async def test_warmup_bounded_by_start_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """A warmup that never ends fails the service at start_timeout."""

    class Forever(Probe):
        async def warmup(self) -> None:
            await trio.sleep_forever()

    supervisor = Supervisor([Forever("cache")], lifecycle=LifecycleSettings(start_timeout=4))
    t0 = trio.current_time()
    assert await run_to_end(supervisor) == 1
    assert str(supervisor.failures[0]) == "service: warmup did not finish within 4 s"
    assert event(supervisor, SERVICE, "shutdown").time - t0 == pytest.approx(4)


async def test_stop_during_warmup_cancels_it(autojump_clock: trio.testing.MockClock) -> None:
    """A trigger during warmup cancels it; the service never reports ready and exits 0."""
    supervisor = Supervisor([Warm("cache")])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_to_end, supervisor)
        await trio.sleep(1)
        assert supervisor.health.phase is Phase.STARTING
        supervisor.stop()
    assert supervisor.exit_code == 0
    assert "ready" not in phases(supervisor, SERVICE)
    assert supervisor.failures == []


# -- stop during start ----------------------------------------------------------------


async def test_stop_while_starting(autojump_clock: trio.testing.MockClock) -> None:
    """A trigger mid-start abandons starts in flight, never begins the rest, stops the ready."""
    components = chain(4, start=1, drain=1)
    supervisor = Supervisor(components)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_to_end, supervisor)
        await trio.sleep(1.5)  # c1 ready, c2 starting
        supervisor.stop()
    assert supervisor.exit_code == 0
    assert phases(supervisor, "c1") == ["starting", "started", "stopping", "stopped"]
    assert phases(supervisor, "c2") == ["starting", "stopped"]
    assert phases(supervisor, "c3") == []
    assert [c.stops for c in components] == [1, 0, 0, 0]
    # c1 is asked to stop only once c2's abandoned start has unwound.
    assert event(supervisor, "c1", "stopping").time == event(supervisor, "c2", "stopped").time


async def test_ready_after_shutdown_began_is_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """started() from a start abandoned by shutdown is ignored: no 'started', no stop hooks."""

    class ShieldedSetup(Probe):
        async def setup(self) -> None:
            with trio.CancelScope(shield=True):
                await trio.sleep(2)

    probe = ShieldedSetup("slow")
    supervisor = Supervisor([probe])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_to_end, supervisor)
        await trio.sleep(1)
        supervisor.stop()
    assert supervisor.exit_code == 0
    assert phases(supervisor, "slow") == ["starting", "stopped"]
    assert probe.stops == 0
    assert supervisor.failures == []


async def test_stop_before_run(autojump_clock: trio.testing.MockClock) -> None:
    """stop() before run() means nothing starts, on either side of the barrier."""
    components = [Probe("w1", G), Probe("w2", G, ["w1"])]
    supervisor = Supervisor(components)
    supervisor.stop()
    assert await run_to_end(supervisor) == 0
    assert [c.runs for c in components] == [0, 0]
    assert order(supervisor, "starting") == []


async def test_empty_service(autojump_clock: trio.testing.MockClock) -> None:
    """A supervisor with no components gets ready and stops on request."""
    supervisor = Supervisor([])
    assert await serve_then(supervisor, supervisor.stop) == 0
    assert [e.phase for e in supervisor.events] == ["ready", "shutdown", "stopped"]


# -- signals (real ones, real clock) ----------------------------------------------------


async def test_sigterm_shuts_down_gracefully() -> None:
    """SIGTERM starts a graceful shutdown; exit code 0."""
    supervisor = Supervisor([Probe("db"), Probe("server", G)], handle_signals=True)
    with trio.fail_after(5):
        assert await serve_then(supervisor, lambda: os.kill(os.getpid(), signal.SIGTERM)) == 0
    assert supervisor.trigger is not None
    assert supervisor.trigger.signal == signal.SIGTERM
    assert supervisor.trigger.reason == "SIGTERM"
    assert order(supervisor, "stopped") == ["server", "db"]


async def test_second_signal_forces_exit() -> None:
    """A second signal during a slow drain forces exit with 128 + its number."""
    draining = trio.Event()

    class SlowDrain(Probe):
        async def stop(self, lifetime: Lifetime) -> None:
            draining.set()
            await trio.sleep(60)

    supervisor = Supervisor([SlowDrain("server", G)], handle_signals=True)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            os.kill(os.getpid(), signal.SIGTERM)
            await draining.wait()
            os.kill(os.getpid(), signal.SIGINT)
    assert supervisor.exit_code == 130
    assert event(supervisor, SERVICE, "forced").detail == "SIGINT"


async def test_sighup_shuts_down_gracefully() -> None:
    """SIGHUP drains like SIGTERM (exit 0), and the run gives the signal handlers back."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGHUP, signal.SIGTERM)}
    supervisor = Supervisor([Probe("db"), Probe("server", G)], handle_signals=True)
    with trio.fail_after(5):
        assert await serve_then(supervisor, lambda: os.kill(os.getpid(), signal.SIGHUP)) == 0
    assert supervisor.trigger is not None
    assert supervisor.trigger.reason == "SIGHUP"
    assert order(supervisor, "stopped") == ["server", "db"]
    assert {signum: signal.getsignal(signum) for signum in before} == before


# -- the watchdog: what the supervisor arms it with -----------------------------------


class Recorder(Watchdog):
    """A watchdog on the Trio clock whose thread never starts: alarms are only recorded."""

    def __init__(self) -> None:
        super().__init__(clock=trio.current_time)
        self.alarms: list[tuple[float, int, str] | None] = []

    def start(self) -> None:
        pass

    def arm(self, delay: float, code: int, why: str, *, sooner: bool = False) -> None:
        super().arm(delay, code, why, sooner=sooner)
        alarm = self.alarm
        self.alarms.append(None if alarm is None else (alarm.deadline, alarm.code, alarm.why))

    def disarm(self) -> None:
        super().disarm()
        self.alarms.append(None)


async def test_watchdog_follows_start_ready_and_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Armed at the earliest start deadline, disarmed when ready, re-armed at shutdown_timeout."""
    watchdog = Recorder()
    supervisor = Supervisor(
        [Probe("db", start=2), Probe("server", G, start=3)],
        lifecycle=LifecycleSettings(start_timeout=5, shutdown_timeout=9),
        watchdog=watchdog,
    )
    t0 = trio.current_time()
    stop_at = -1.0

    def stop() -> None:
        nonlocal stop_at
        stop_at = trio.current_time()
        supervisor.stop("test")

    assert await serve_then(supervisor, stop) == 0
    # Each component's deadline in turn; then nothing starting (None) and
    # ready (None); then the shutdown.
    start_db, start_server, *ready, shutdown = watchdog.alarms
    assert ready == [None, None]
    why = "start_timeout (5 s) passed: db did not report ready"
    assert start_db == (t0 + 5 + MARGIN, EXIT_CODE, why)
    # server began when db was ready, at t0 + 2: its own deadline.
    assert start_server is not None
    assert start_server[0] == pytest.approx(t0 + 2 + 5 + MARGIN)
    assert "server did not report ready" in start_server[2]
    assert shutdown is not None
    assert shutdown[:2] == (pytest.approx(stop_at + 9 + MARGIN), EXIT_CODE)
    assert shutdown[2] == "shutdown_timeout (9 s) passed since test"


async def test_watchdog_armed_at_once_by_force(autojump_clock: trio.testing.MockClock) -> None:
    """force(SIGTERM) arms the watchdog to act after the margin alone, with exit code 143."""
    watchdog = Recorder()
    supervisor = Supervisor(chain(2, drain=100), watchdog=watchdog)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        supervisor.stop()
        await trio.sleep(1)
        forced_at = trio.current_time()
        supervisor.force(signal.SIGTERM)
    why = "forced exit by SIGTERM"
    assert watchdog.alarms[-1] == (forced_at + MARGIN, 128 + signal.SIGTERM, why)


async def test_stuck_report_names_component_phase_and_line(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The watchdog's report names a shielded drain, its phase, and the line it waits on."""
    draining, release = trio.Event(), trio.Event()
    report: list[str] = []

    class Shielded(Probe):
        async def stop(self, lifetime: Lifetime) -> None:
            draining.set()
            with trio.CancelScope(shield=True):
                await release.wait()  # the line the report must name

    supervisor = Supervisor([Probe("db"), Shielded("server", G)])
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        supervisor.stop()
        await draining.wait()
        # From another thread, as the watchdog reads it.
        report = await trio.to_thread.run_sync(supervisor._stuck)
        release.set()
    # The loop itself may be mid-step (logging the drain deadline) when the
    # thread samples it: that adds a "Trio thread is at" line, not a component.
    (line,) = [line for line in report if not line.startswith("the Trio thread")]
    assert line.startswith("server (stopping) at ")
    assert line.endswith(" in stop")
    assert "test_supervisor.py:" in line


# -- random graphs --------------------------------------------------------------------


@st.composite
def graphs(draw: st.DrawFn) -> list[Probe]:
    """A random valid DAG with both roles, enhancements, timings and maybe one failure."""
    count = draw(st.integers(1, 9))
    roles = [draw(st.sampled_from([P, G])) for _ in range(count)]
    timing = st.sampled_from([0.0, 0.5, 1.0])
    fail = draw(st.one_of(st.none(), st.integers(0, count - 1)))
    enhancer_of: dict[int, int] = {}
    probes: list[Probe] = []
    for i in range(count):
        # A PROCESSING component may depend only on PROCESSING ones (the barrier).
        allowed = [j for j in range(i) if roles[i] is G or roles[j] is P]
        deps = draw(st.lists(st.sampled_from(allowed), unique=True)) if allowed else []
        factory = FailsToStart if i == fail else Probe
        start, drain = draw(timing), draw(timing)
        probes.append(factory(f"n{i}", roles[i], [f"n{j}" for j in deps], start=start, drain=drain))
    # Enhancements: a later PROCESSING component with no dependencies of its own
    # may enhance an earlier PROCESSING one (a PROCESSING enhancer of a GENERATING
    # component could be required by other PROCESSING components: a barrier cycle).
    for i in range(count):
        if roles[i] is P and not probes[i].depends_on and draw(st.booleans()):
            targets = [j for j in range(i) if roles[j] is P and j not in enhancer_of.values()]
            if targets:
                target = draw(st.sampled_from(targets))
                enhancer_of[i] = target
                probes[target].enhanced_by = (*probes[target].enhanced_by, f"n{i}")
    return probes


def expected_requirements(probes: Sequence[Probe]) -> dict[str, set[str]]:
    """What must be ready before each component starts, worked out from the rules."""
    enhancers = {p.name: set(p.enhanced_by) for p in probes}
    enhanced = {e: p.name for p in probes for e in p.enhanced_by}

    def with_enhancements(name: str) -> set[str]:
        out = {name}
        for e in enhancers[name]:
            out |= with_enhancements(e)
        return out

    def side(name: str) -> Role:
        while name in enhanced:
            name = enhanced[name]
        return next(p.role for p in probes if p.name == name)

    processing = {p.name for p in probes if side(p.name) is P}
    requires: dict[str, set[str]] = {}
    for p in probes:
        reqs = {enhanced[p.name]} if p.name in enhanced else set()
        for dep in p.depends_on:
            reqs |= with_enhancements(dep)
        if side(p.name) is G:
            reqs |= processing
        requires[p.name] = reqs
    return requires


def check_run(probes: Sequence[Probe], supervisor: Supervisor, code: int) -> None:
    events = supervisor.events
    at = {(e.component, e.phase): n for n, e in enumerate(events)}
    requires = expected_requirements(probes)
    failed = [p.name for p in probes if isinstance(p, FailsToStart) and p.runs]
    assert code == (1 if failed else 0)
    for p in probes:
        name = p.name
        mine = phases(supervisor, name)
        assert mine.count("starting") == p.runs <= 1
        if "starting" in mine:
            for r in requires[name]:  # never starts before its requirements are ready
                assert at[(r, "started")] < at[(name, "starting")]
        if "started" in mine:  # started: stopped exactly once
            assert p.stops == 1
            assert mine == ["starting", "started", "stopping", "stopped"]
        # Asked to stop only after everything requiring it finished.
        if "stopping" in mine:
            for d, reqs in requires.items():
                if name in reqs and (d, "starting") in at:
                    end = at.get((d, "stopped"), at.get((d, "failed")))
                    assert end is not None
                    assert end < at[(name, "stopping")]
    assert supervisor.health.phase is Phase.STOPPED


@settings(max_examples=50, deadline=None)
@given(probes=graphs())
def test_random_graphs_start_and_stop_in_order(probes: list[Probe]) -> None:
    """Random DAGs, 2 cycles each: start after requirements, stop once, after dependents."""
    for _ in range(2):
        for p in probes:
            p.runs = p.stops = 0
        supervisor = Supervisor(probes)

        async def main(supervisor: Supervisor = supervisor) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_to_end, supervisor)
                while supervisor.health.phase is Phase.STARTING:
                    await supervisor.health.wait_changed(supervisor.health.version)
                supervisor.stop()

        # A fresh autojump clock per run: the autojump_clock fixture is function
        # scoped and hypothesis runs many examples in one test function.
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        check_run(probes, supervisor, supervisor.exit_code)


async def test_error_during_forced_cancellation_is_recorded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A component raising while force() cancels it is a failure, not a supervisor crash."""

    class Messy(Probe):
        async def stop(self, lifetime: Lifetime) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.explode_when_cancelled)
                await trio.sleep(100)

        async def explode_when_cancelled(self) -> None:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                raise Boom("while cancelled") from None

    supervisor = Supervisor([Messy("m")], lifecycle=LifecycleSettings(drain_timeout=500))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        supervisor.stop()
        await trio.sleep(1)
        supervisor.force(signal.SIGTERM)
    assert supervisor.exit_code == 128 + signal.SIGTERM
    (failure,) = supervisor.failures
    assert str(failure) == "m: failed while stopping: Boom: while cancelled"
