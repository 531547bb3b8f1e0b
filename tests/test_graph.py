"""The component graph: ordering rules, the ready barrier, and graph errors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import trio

from mikros_trio._component import Component, Lifetime, Role
from mikros_trio._graph import NodeSpec, plan
from mikros_trio._supervisor import SERVICE, LifecycleEvent, Supervisor
from mikros_trio.errors import ConfigError

P = Role.PROCESSING
G = Role.GENERATING


class Probe(Component):
    """Takes one second (Trio time) to start and one to drain, so each wave has its own time."""

    def __init__(
        self,
        name: str,
        role: Role = P,
        depends_on: Sequence[str] = (),
        enhanced_by: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.role = role
        self.depends_on = tuple(depends_on)
        self.enhanced_by = tuple(enhanced_by)

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await trio.sleep(1)
        task_status.started()
        await lifetime.wait_stopping()
        await trio.sleep(1)


def waves(events: Iterable[LifecycleEvent], phase: str) -> list[set[str]]:
    """Components that reached ``phase``, grouped by the Trio time they reached it."""
    by_time: dict[float, set[str]] = {}
    for event in events:
        if event.phase == phase and event.component != SERVICE:
            by_time.setdefault(event.time, set()).add(event.component)
    return [by_time[t] for t in sorted(by_time)]


async def start_and_stop(components: Sequence[Component]) -> Supervisor:
    supervisor = Supervisor(components)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        supervisor.stop()
    assert supervisor.exit_code == 0
    return supervisor


def messages(error: ConfigError) -> list[str]:
    return [issue.message for issue in error.issues]


# -- ordering -----------------------------------------------------------------


@pytest.fixture(name="diamond")
def fixture_diamond() -> list[Component]:
    """b and c depend on a, d on both; a is enhanced by e (declared out of order)."""
    return [
        Probe("d", depends_on=["b", "c"]),
        Probe("b", depends_on=["a"]),
        Probe("e"),
        Probe("c", depends_on=["a"]),
        Probe("a", enhanced_by=["e"]),
    ]


async def test_diamond_with_enhancement_start_and_stop_order(
    diamond: list[Component], autojump_clock: trio.testing.MockClock
) -> None:
    """Diamond plus enhancement starts a, e, {b,c}, d and stops in exactly the reverse."""
    supervisor = await start_and_stop(diamond)
    assert waves(supervisor.events, "starting") == [{"a"}, {"e"}, {"b", "c"}, {"d"}]
    assert waves(supervisor.events, "started") == [{"a"}, {"e"}, {"b", "c"}, {"d"}]
    assert waves(supervisor.events, "stopping") == [{"d"}, {"b", "c"}, {"e"}, {"a"}]
    assert waves(supervisor.events, "stopped") == [{"d"}, {"b", "c"}, {"e"}, {"a"}]


def test_dependent_waits_for_enhancement_without_naming_it() -> None:
    """Whatever depends on X also requires X's enhancements, transitively."""
    result = plan(
        [
            NodeSpec("a", P, enhanced_by=["e"]),
            NodeSpec("e", P, enhanced_by=["f"]),
            NodeSpec("f", P),
            NodeSpec("b", P, depends_on=["a"]),
        ]
    )
    names = result.names
    requires = {names[i]: {names[j] for j in result.requires[i]} for i in range(len(names))}
    assert requires["e"] == {"a"}
    assert requires["f"] == {"e"}
    assert requires["b"] == {"a", "e", "f"}
    assert result.waves() == [["a"], ["e"], ["f"], ["b"]]


async def test_generating_start_after_and_stop_before_processing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The ready barrier: every GENERATING component starts after and stops before PROCESSING."""
    components: list[Component] = [
        Probe("server", G),  # declared first, depends on nothing
        Probe("db", P),
        Probe("cache", P, depends_on=["db"]),
        Probe("worker", G, depends_on=["server"]),
    ]
    supervisor = await start_and_stop(components)
    assert waves(supervisor.events, "started") == [{"db"}, {"cache"}, {"server"}, {"worker"}]
    assert waves(supervisor.events, "stopping") == [{"worker"}, {"server"}, {"cache"}, {"db"}]


def test_barrier_is_not_a_level() -> None:
    """The barrier orders the waves but does not add an empty wave of its own."""
    result = plan([NodeSpec("server", G), NodeSpec("db", P), NodeSpec("log", P)])
    assert result.waves() == [["db", "log"], ["server"]]
    assert result.order == (1, 2, 0)


def test_enhancer_takes_the_side_of_what_it_enhances() -> None:
    """A GENERATING enhancement of a PROCESSING component stays before the barrier."""
    result = plan([NodeSpec("db", P, enhanced_by=["probe"]), NodeSpec("probe", G)])
    assert result.waves() == [["db"], ["probe"]]
    assert result.barrier not in result.requires[1]


def test_only_generating_components() -> None:
    """With nothing on the PROCESSING side the barrier is open from the start."""
    result = plan([NodeSpec("w1", G), NodeSpec("w2", G, depends_on=["w1"])])
    assert result.waves() == [["w1"], ["w2"]]


def test_plan_is_deterministic() -> None:
    """The same declarations give the same order, in declaration order within a wave."""
    nodes = [NodeSpec(f"n{i}", P, depends_on=[f"n{i - 3}"] if i >= 3 else ()) for i in range(9)]
    first, second = plan(nodes), plan(nodes)
    assert first == second
    assert first.waves() == [["n0", "n1", "n2"], ["n3", "n4", "n5"], ["n6", "n7", "n8"]]


def test_empty_graph() -> None:
    """No components is a valid, empty plan."""
    result = plan([])
    assert result.names == ()
    assert result.waves() == []


# -- errors ---------------------------------------------------------------------


def test_cycle_is_named() -> None:
    """A dependency cycle is a ConfigError whose issue walks the cycle in start order."""
    with pytest.raises(ConfigError) as caught:
        plan(
            [
                NodeSpec("a", P, depends_on=["c"], path="components.a"),
                NodeSpec("b", P, depends_on=["a"]),
                NodeSpec("c", P, depends_on=["b"]),
                NodeSpec("d", P, depends_on=["c"]),  # stuck behind the cycle, not in it
            ]
        )
    (issue,) = caught.value.issues
    # "x → y": x starts before y, so each name depends on the one before it.
    assert issue.message == "dependency cycle: a → b → c → a"
    assert issue.path == "components.a.depends_on"
    assert "d" not in issue.message.split(": ")[1].split(" → ")


def test_unknown_dependency_suggests_nearest() -> None:
    """An unknown depends_on name is reported with the nearest known name."""
    with pytest.raises(ConfigError) as caught:
        plan(
            [
                NodeSpec("database", P, source="service.toml", path="features.db"),
                NodeSpec("api", G, depends_on=["databse"], source="service.toml", path="api"),
            ]
        )
    (issue,) = caught.value.issues
    assert issue.source == "service.toml"
    assert issue.path == "api.depends_on"
    assert issue.message == "'api' names unknown component 'databse'; did you mean \"database\"?"


def test_duplicate_name() -> None:
    """Two components with one name are a ConfigError."""
    with pytest.raises(ConfigError) as caught:
        plan([NodeSpec("a", P), NodeSpec("a", G)])
    assert messages(caught.value) == ["component 'a' is declared twice"]


def test_self_reference() -> None:
    """A component naming itself is reported as such, not as a cycle."""
    with pytest.raises(ConfigError) as caught:
        plan([NodeSpec("a", P, depends_on=["a"])])
    assert messages(caught.value) == ["'a' names itself"]


def test_enhancement_claimed_twice() -> None:
    """An enhancement belongs to one component only."""
    with pytest.raises(ConfigError) as caught:
        plan(
            [
                NodeSpec("a", P, enhanced_by=["e"]),
                NodeSpec("b", P, enhanced_by=["e"]),
                NodeSpec("e", P),
            ]
        )
    assert messages(caught.value) == [
        "'e' already enhances 'a'; an enhancement belongs to one component"
    ]


def test_enhancement_cycle() -> None:
    """Two components enhancing each other is a cycle, and plan() terminates."""
    with pytest.raises(ConfigError) as caught:
        plan([NodeSpec("a", P, enhanced_by=["b"]), NodeSpec("b", P, enhanced_by=["a"])])
    (issue,) = caught.value.issues
    assert issue.message.startswith("dependency cycle: ")


def test_processing_depending_on_generating_is_a_barrier_cycle() -> None:
    """PROCESSING needing GENERATING closes a cycle through the barrier; the hint says why."""
    with pytest.raises(ConfigError) as caught:
        plan([NodeSpec("server", G), NodeSpec("db", P, depends_on=["server"])])
    (issue,) = caught.value.issues
    assert issue.message == (
        "dependency cycle: server → db → <ready barrier> → server"
        " (work-processing components start before work-generating ones,"
        " so one may not depend on the other)"
    )


def test_all_issues_reported_at_once() -> None:
    """Every problem of a graph is in one ConfigError: names, enhancements and cycles."""
    with pytest.raises(ConfigError) as caught:
        plan(
            [
                NodeSpec("a", P, enhanced_by=["e"]),
                NodeSpec("b", P, enhanced_by=["e"]),
                NodeSpec("e", P),
                NodeSpec("a", P),
                NodeSpec("api", G, depends_on=["nope"]),
                NodeSpec("x", P, depends_on=["y"]),
                NodeSpec("y", P, depends_on=["x"]),
                NodeSpec("s", P, depends_on=["t"]),
                NodeSpec("t", P, depends_on=["s"]),
            ]
        )
    assert messages(caught.value) == [
        "component 'a' is declared twice",
        "'e' already enhances 'a'; an enhancement belongs to one component",
        "'api' names unknown component 'nope'",
        "dependency cycle: x → y → x",
        "dependency cycle: s → t → s",
    ]
    assert caught.value.render().startswith("5 configuration errors:\n")


def test_supervisor_checks_graph_before_anything_runs() -> None:
    """Constructing a Supervisor on a bad graph raises ConfigError; no Trio needed."""
    with pytest.raises(ConfigError, match="names unknown component 'ghost'"):
        Supervisor([Probe("a", depends_on=["ghost"])])
