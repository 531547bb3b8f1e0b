"""The health state machine, alone and as the supervisor drives it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from mikros_trio._component import Component, Lifetime, Role
from mikros_trio._definition import LifecycleSettings
from mikros_trio._health import ComponentState, Health, Phase
from mikros_trio._supervisor import SERVICE, LifecycleEvent, Supervisor


class Probe(Component):
    """Takes a second to start and a second to drain; optionally crashes while serving."""

    def __init__(
        self,
        name: str,
        role: Role = Role.PROCESSING,
        depends_on: Sequence[str] = (),
        *,
        crash_after: float | None = None,
    ) -> None:
        self.name = name
        self.role = role
        self.depends_on = tuple(depends_on)
        self.crash_after = crash_after

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await trio.sleep(1)
        task_status.started()
        if self.crash_after is not None:
            await trio.sleep(self.crash_after)
            raise RuntimeError("crash")
        await lifetime.wait_stopping()
        await trio.sleep(1)


@pytest.fixture(name="health")
def fixture_health() -> Health:
    """A fresh Health with two components registered."""
    health = Health()
    health._set_component("db", ComponentState.PENDING)
    health._set_component("api", ComponentState.PENDING)
    return health


# -- the state machine alone -------------------------------------------------------


def test_initial_state(health: Health) -> None:
    """A new Health is starting: live, not ready."""
    assert health.phase is Phase.STARTING
    assert health.live
    assert not health.ready


@pytest.mark.parametrize(
    ("phase", "ready", "live"),
    [
        (Phase.STARTING, False, True),
        (Phase.SERVING, True, True),
        (Phase.DRAINING, False, True),
        (Phase.STOPPED, False, False),
    ],
)
def test_ready_only_while_serving_live_until_stopped(
    health: Health, phase: Phase, ready: bool, live: bool
) -> None:
    """Readiness is true only while SERVING; liveness until STOPPED."""
    health._set_phase(phase)
    assert (health.ready, health.live) == (ready, live)


def test_version_moves_only_on_change(health: Health) -> None:
    """Setting the same phase or state again is not a change."""
    before = health.version
    health._set_phase(Phase.STARTING)
    health._set_component("db", ComponentState.PENDING)
    assert health.version == before
    health._set_component("db", ComponentState.STARTING)
    health._set_phase(Phase.SERVING)
    assert health.version == before + 2


def test_components_view_is_read_only_and_ordered(health: Health) -> None:
    """components is a live, read-only mapping in registration order."""
    view = health.components
    assert list(view) == ["db", "api"]
    with pytest.raises(TypeError):
        view["db"] = ComponentState.FAILED  # type: ignore[index]
    health._set_component("api", ComponentState.FAILED)
    assert view["api"] is ComponentState.FAILED


def test_snapshot_shape(health: Health) -> None:
    """snapshot() is JSON-ready: overall status and each component's state, as strings."""
    health._set_phase(Phase.SERVING)
    health._set_component("db", ComponentState.SERVING)
    health._set_component("api", ComponentState.FAILED)
    snapshot = health.snapshot()
    assert snapshot == {"status": "serving", "components": {"db": "serving", "api": "failed"}}
    assert json.loads(json.dumps(snapshot)) == snapshot
    health._set_component("db", ComponentState.DRAINING)
    assert snapshot["components"]["db"] == "serving"  # a copy, not a view


async def test_wait_changed_returns_at_once_when_behind(health: Health) -> None:
    """wait_changed(since) returns without waiting when the version already moved on."""
    since = health.version
    health._set_phase(Phase.SERVING)
    with trio.testing.assert_checkpoints():
        assert await health.wait_changed(since) == since + 1


async def test_wait_changed_wakes_every_waiter(
    health: Health, autojump_clock: trio.testing.MockClock
) -> None:
    """Every task waiting on wait_changed wakes on the next change, not before."""
    woke: list[tuple[int, float]] = []

    async def waiter() -> None:
        woke.append((await health.wait_changed(health.version), trio.current_time()))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(waiter)
        await trio.sleep(5)
        assert woke == []
        health._set_component("db", ComponentState.STARTING)
    assert woke == [(health.version, 5.0)] * 3


async def test_wait_changed_sees_changes_made_while_not_waiting(
    health: Health, autojump_clock: trio.testing.MockClock
) -> None:
    """Changes between two wait_changed calls are not lost: the version says so."""
    seen = health.version
    health._set_phase(Phase.SERVING)  # nobody waits: nothing to wake
    health._set_phase(Phase.DRAINING)
    seen = await health.wait_changed(seen)
    assert health.phase is Phase.DRAINING
    with trio.move_on_after(10) as scope:
        await health.wait_changed(seen)
    assert scope.cancelled_caught


# -- as the supervisor drives it ---------------------------------------------------------


async def test_phases_and_component_states_over_a_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """STARTING → SERVING → DRAINING → STOPPED; each component PENDING → … → STOPPED."""
    supervisor = Supervisor([Probe("db"), Probe("api", Role.GENERATING)])
    health = supervisor.health
    phases = [health.phase]
    states = {name: [state] for name, state in health.components.items()}
    done = trio.Event()

    async def watch(version: int) -> None:
        while not done.is_set():
            version = await health.wait_changed(version)
            if health.phase is not phases[-1]:
                phases.append(health.phase)
            for name, state in health.components.items():
                if state is not states[name][-1]:
                    states[name].append(state)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, health.version)
        await nursery.start(supervisor.run)
        assert health.ready
        await trio.sleep(1)
        supervisor.stop()
        with trio.fail_after(60):
            while health.phase is not Phase.STOPPED:
                await health.wait_changed(health.version)
        await trio.lowlevel.checkpoint()  # let the watcher see the last change
        done.set()
        health._bump()  # wake the watcher so it sees ``done``
    assert phases == [Phase.STARTING, Phase.SERVING, Phase.DRAINING, Phase.STOPPED]
    expected = [
        ComponentState.PENDING,
        ComponentState.STARTING,
        ComponentState.SERVING,
        ComponentState.DRAINING,
        ComponentState.STOPPED,
    ]
    assert states == {"db": expected, "api": expected}
    assert not health.live


async def test_draining_from_the_instant_of_the_trigger(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Readiness is off the moment stop() returns, before any component is asked to stop."""
    supervisor = Supervisor([Probe("db"), Probe("api", Role.GENERATING)])
    health = supervisor.health
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        supervisor.stop()
        assert health.phase is Phase.DRAINING
        assert not health.ready
        assert health.live
        assert health.snapshot() == {
            "status": "draining",
            "components": {"db": "serving", "api": "serving"},
        }


async def test_draining_before_anything_stops_on_a_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A crash trigger turns readiness off before the first component is asked to stop."""
    seen: list[tuple[str, str, Phase, dict[str, Any]]] = []
    supervisor: Supervisor

    def on_event(event: LifecycleEvent) -> None:
        health = supervisor.health
        seen.append((event.component, event.phase, health.phase, health.snapshot()))

    supervisor = Supervisor(
        [Probe("db"), Probe("api", Role.GENERATING, crash_after=3)], on_event=on_event
    )
    assert await supervisor.run() == 1
    shutdown = next(n for n, s in enumerate(seen) if s[:2] == (SERVICE, "shutdown"))
    assert all(n > shutdown for n, s in enumerate(seen) if s[1] in ("stopping", "failed"))
    # From the shutdown event on, the phase is DRAINING until the final stop.
    assert {s[2] for s in seen[shutdown:-1]} == {Phase.DRAINING}
    assert seen[shutdown][3]["components"]["db"] == "serving"
    assert supervisor.health.snapshot() == {
        "status": "stopped",
        "components": {"db": "stopped", "api": "failed"},
    }


async def test_failed_start_shows_in_health(autojump_clock: trio.testing.MockClock) -> None:
    """A component that never gets ready is FAILED; what never began stays PENDING."""

    class Never(Component):
        name = "never"

        async def run(
            self,
            lifetime: Lifetime,
            *,
            task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            await trio.sleep_forever()

    supervisor = Supervisor(
        [Probe("db"), Never(), Probe("api", depends_on=["never"])],
        lifecycle=LifecycleSettings(start_timeout=2),
    )
    assert await supervisor.run() == 1
    assert supervisor.health.snapshot() == {
        "status": "stopped",
        "components": {"db": "stopped", "never": "failed", "api": "pending"},
    }
