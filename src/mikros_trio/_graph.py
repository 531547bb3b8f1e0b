"""The component dependency graph: checked once, before anything starts.

Three sources of edges, all reduced to "X must be ready before Y starts and
stop after Y stops":

- ``depends_on``: Y names X.
- ``enhanced_by`` (Misk semantics): X enhanced by E means E starts right
  after X and stops right before it, and whatever depends on X also waits
  for E, without naming it.
- the ready barrier: every work-processing component before every
  work-generating one. It is one virtual node, not P*G edges, so the graph
  stays linear in size.

Everything here is plain lists of ints: the supervisor walks these tables
for 100 000 components, so no per-edge objects.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ._component import Role
from ._settings import join_path, suggest
from .errors import ConfigError, ConfigIssue

__all__ = ["NodeSpec", "Plan", "plan"]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One component as the graph sees it; ``source``/``path`` locate its declaration."""

    name: str
    role: Role
    depends_on: Sequence[str] = ()
    enhanced_by: Sequence[str] = ()
    source: str = "<container>"
    path: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    """A checked graph. Node ``i < len(names)`` is a component; ``barrier`` is virtual.

    ``requires[i]`` lists what must be ready before ``i`` starts;
    ``dependents[i]`` is the reverse. ``order`` is a deterministic
    topological order of the components and ``level[i]`` the length of the
    longest chain before ``i``: components of one level start together.
    """

    names: tuple[str, ...]
    requires: tuple[tuple[int, ...], ...]
    dependents: tuple[tuple[int, ...], ...]
    barrier: int
    order: tuple[int, ...]
    level: tuple[int, ...]

    def waves(self) -> list[list[str]]:
        """Components grouped by the level they start in, for ``mikros-trio check``."""
        waves: list[list[str]] = []
        for index in self.order:
            lvl = self.level[index]
            while len(waves) <= lvl:
                waves.append([])
            waves[lvl].append(self.names[index])
        return [wave for wave in waves if wave]


def plan(nodes: Sequence[NodeSpec]) -> Plan:
    """Check ``nodes`` and return the start/stop plan; ``ConfigError`` lists every problem."""
    issues: list[ConfigIssue] = []
    count = len(nodes)
    index: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.name in index:
            issues.append(
                ConfigIssue(node.source, node.path, f"component {node.name!r} is declared twice")
            )
        else:
            index[node.name] = i

    def resolve(i: int, names: Sequence[str], key: str) -> list[int]:
        found = []
        for name in names:
            j = index.get(name)
            if j is None:
                node = nodes[i]
                issues.append(
                    ConfigIssue(
                        node.source,
                        join_path(node.path, key),
                        f"{node.name!r} names unknown component {name!r}"
                        + suggest(name, index, noun=None),
                    )
                )
            elif j == i:
                node = nodes[i]
                issues.append(
                    ConfigIssue(node.source, join_path(node.path, key), f"{name!r} names itself")
                )
            else:
                found.append(j)
        return found

    # Enhancements: each enhancer serves exactly one component (Misk rule),
    # and takes that component's side of the barrier, or the barrier would
    # close a cycle through it.
    enhances: list[int] = [-1] * count
    enhancers: list[list[int]] = [[] for _ in range(count)]
    for i, node in enumerate(nodes):
        for e in resolve(i, node.enhanced_by, "enhanced_by"):
            if enhances[e] != -1 and enhances[e] != i:
                issues.append(
                    ConfigIssue(
                        node.source,
                        join_path(node.path, "enhanced_by"),
                        f"{nodes[e].name!r} already enhances {nodes[enhances[e]].name!r}; "
                        "an enhancement belongs to one component",
                    )
                )
                continue
            enhances[e] = i
            enhancers[i].append(e)

    def side(i: int) -> Role:
        seen = 0
        while enhances[i] != -1 and seen <= count:
            i = enhances[i]
            seen += 1
        return nodes[i].role

    def closure(i: int) -> list[int]:
        """``i`` and, transitively, every enhancement of it."""
        out = [i]
        stack = list(enhancers[i])
        while stack:
            e = stack.pop()
            if len(out) > count:  # an enhancement cycle; reported below
                break
            out.append(e)
            stack.extend(enhancers[e])
        return out

    barrier = count
    requires: list[list[int]] = [[] for _ in range(count + 1)]
    for i, node in enumerate(nodes):
        reqs = requires[i]
        if enhances[i] != -1:
            reqs.append(enhances[i])
        for j in resolve(i, node.depends_on, "depends_on"):
            if enhancers[j]:
                reqs.extend(k for k in closure(j) if k != i)
            else:
                reqs.append(j)  # the common case, without building a closure
        if side(i) is Role.GENERATING:
            reqs.append(barrier)
        else:
            requires[barrier].append(i)

    # Unknown names and the like do not stop the cycle check: the edges
    # that did resolve are still checked, so every problem is reported in
    # one pass.
    dependents: list[list[int]] = [[] for _ in range(count + 1)]
    pending = [0] * (count + 1)
    for i, reqs in enumerate(requires):
        unique = list(dict.fromkeys(reqs)) if len(reqs) > 1 else reqs
        requires[i] = unique
        pending[i] = len(unique)
        for j in unique:
            dependents[j].append(i)

    # Kahn's algorithm, seeded in declaration order so the result is stable.
    # A node's level is final when it is dequeued (all it requires came
    # first), so levels are computed in the same pass. The barrier is not
    # a component: it must not cost a level in `waves`.
    level = [0] * (count + 1)
    queue = deque(i for i in range(count + 1) if pending[i] == 0)
    order: list[int] = []
    while queue:
        i = queue.popleft()
        order.append(i)
        step = level[i] if i == barrier else level[i] + 1
        for d in dependents[i]:
            if level[d] < step:
                level[d] = step
            pending[d] -= 1
            if pending[d] == 0:
                queue.append(d)
    if len(order) != count + 1:
        issues.extend(_cycle_issues(nodes, requires, pending, barrier))
    if issues:
        raise ConfigError(issues)

    return Plan(
        names=tuple(node.name for node in nodes),
        requires=tuple(tuple(r) for r in requires),
        dependents=tuple(tuple(d) for d in dependents),
        barrier=barrier,
        order=tuple(i for i in order if i != barrier),
        level=tuple(level),
    )


def _cycle_issues(
    nodes: Sequence[NodeSpec], requires: list[list[int]], pending: list[int], barrier: int
) -> list[ConfigIssue]:
    """Describe the cycles among the nodes Kahn could not order, one issue each.

    Every stuck node requires at least one other stuck node, so walking
    "requires" edges from any of them ends on a node seen before: on a new
    cycle when the walk closes on itself, on an already reported one
    otherwise. Each node is walked once, so this stays linear.
    """
    stuck = [p > 0 for p in pending]
    walked = [0] * len(pending)  # 0: not yet; otherwise the number of the walk
    issues: list[ConfigIssue] = []
    for start in range(len(pending)):
        if not stuck[start] or walked[start]:
            continue
        walk = start + 1
        path: list[int] = []
        current = start
        while not walked[current]:
            walked[current] = walk
            path.append(current)
            current = next(j for j in requires[current] if stuck[j])
        if walked[current] == walk:
            cycle = [*path[path.index(current) :], current]
            issues.append(_cycle_issue(nodes, cycle, barrier))
    return issues


def _cycle_issue(nodes: Sequence[NodeSpec], cycle: list[int], barrier: int) -> ConfigIssue:
    """Describe one cycle, given as a walk along "requires" edges."""
    cycle.reverse()  # print in start order: a needs b needs a → "b → a → b"
    label = [("<ready barrier>" if i == barrier else nodes[i].name) for i in cycle]
    first = min(i for i in cycle if i != barrier)
    node = nodes[first]
    hint = ""
    if barrier in cycle:
        hint = (
            " (work-processing components start before work-generating ones, "
            "so one may not depend on the other)"
        )
    return ConfigIssue(
        node.source,
        join_path(node.path, "depends_on"),
        "dependency cycle: " + " → ".join(label) + hint,
    )
