"""How start and stop scale with the size of the component graph.

For 1 000, 10 000 and 100 000 no-op components in a random DAG (each node
depends on about 3 random earlier nodes; seeded, so every run measures the
same graphs), time with ``time.perf_counter``:

- ``plan_s``: ``plan()`` alone (checking and ordering the graph);
- ``init_s``: building the ``Supervisor`` (which plans again, plus its tables);
- ``start_stop_s``: under a real ``trio.run``, every component started,
  ready, then stopped, until ``run`` returned.

All components are PROCESSING: mixing roles at random could close cycles
through the ready barrier, which is a configuration error, not a workload.

Each size is measured ``--repeat`` times (once at 100 000) and the best run
is kept: noise from other processes only ever adds time. The same
start+stop is also timed with the cyclic garbage collector off
(``start_stop_gc_off_s``), to show how much of the cost is the GC walking
the heap rather than the supervisor working.

Prints one line per size for humans, then, as the last line, one JSON
object for tools. Run: ``python bench/graph_scale.py [--sizes 1000,10000]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from typing import Any

import trio

from mikros_trio._component import Component, Lifetime, Role
from mikros_trio._graph import NodeSpec, plan
from mikros_trio._supervisor import Supervisor

SIZES = (1_000, 10_000, 100_000)
TARGET_10K_S = 1.0
DEPENDENCIES = 3
SEED = 20261122


class Noop(Component):
    """Ready at once, stops as soon as asked: measures only the supervisor."""

    role = Role.PROCESSING

    def __init__(self, name: str, depends_on: tuple[str, ...]) -> None:
        self.name = name
        self.depends_on = depends_on

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await lifetime.wait_stopping()


def random_dag(size: int, rng: random.Random) -> tuple[list[Noop], int]:
    """``size`` components, each depending on up to 3 distinct earlier ones."""
    names = [f"c{i}" for i in range(size)]
    components: list[Noop] = []
    edges = 0
    for i in range(size):
        deps = tuple(names[j] for j in rng.sample(range(i), min(DEPENDENCIES, i)))
        edges += len(deps)
        components.append(Noop(names[i], deps))
    return components, edges


async def start_and_stop(supervisor: Supervisor) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        supervisor.stop()
    if supervisor.exit_code != 0:
        raise SystemExit(f"benchmark run failed: {supervisor.failures}")


def measure_once(size: int, *, gc_on: bool = True) -> tuple[int, float, float, float]:
    """One run: (edges, plan_s, init_s, start_stop_s)."""
    components, edges = random_dag(size, random.Random(SEED + size))
    nodes = [NodeSpec(c.name, c.role, c.depends_on) for c in components]
    gc.collect()
    if not gc_on:
        gc.disable()
    try:
        t0 = time.perf_counter()
        plan(nodes)
        plan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        supervisor = Supervisor(components)
        init_s = time.perf_counter() - t0
        # As mikros_trio.run() does once the service is built: what was
        # built lives as long as the process, so the collector skips it.
        gc.freeze()
        t0 = time.perf_counter()
        trio.run(start_and_stop, supervisor)
        start_stop_s = time.perf_counter() - t0
    finally:
        gc.unfreeze()
        gc.enable()
    assert sum(e.phase == "stopped" for e in supervisor.events) == size + 1
    return edges, plan_s, init_s, start_stop_s


def measure(size: int, repeat: int) -> dict[str, Any]:
    runs = [measure_once(size) for _ in range(repeat)]
    edges = runs[0][0]
    plan_s = min(r[1] for r in runs)
    init_s = min(r[2] for r in runs)
    start_stop_s = min(r[3] for r in runs)
    gc_off_s = min(measure_once(size, gc_on=False)[3] for _ in range(repeat))
    total_s = init_s + start_stop_s
    return {
        "components": size,
        "edges": edges,
        "plan_s": round(plan_s, 4),
        "init_s": round(init_s, 4),
        "start_stop_s": round(start_stop_s, 4),
        "start_stop_gc_off_s": round(gc_off_s, 4),
        "total_s": round(total_s, 4),
        "us_per_component_plus_edge": round(total_s / (size + edges) * 1e6, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="comma-separated component counts"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per size below 100 000")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for size in sizes:
        result = measure(size, args.repeat if size < 100_000 else 1)
        results.append(result)
        print(
            f"{size:>7} components {result['edges']:>7} edges: "
            f"plan {result['plan_s'] * 1e3:8.1f} ms  "
            f"init {result['init_s'] * 1e3:8.1f} ms  "
            f"start+stop {result['start_stop_s'] * 1e3:8.1f} ms "
            f"(GC off {result['start_stop_gc_off_s'] * 1e3:8.1f} ms)  "
            f"= {result['us_per_component_plus_edge']:6.2f} µs per component+edge",
            flush=True,
        )
    print("total = init (plan included) + start+stop; the target is total at 10 000 <= 1 s")
    by_size = {r["components"]: r for r in results}
    ten_k = by_size.get(10_000)
    meets = None if ten_k is None else ten_k["total_s"] <= TARGET_10K_S
    linearity = None
    if 1_000 in by_size and 100_000 in by_size:
        linearity = round(
            by_size[100_000]["us_per_component_plus_edge"]
            / by_size[1_000]["us_per_component_plus_edge"],
            3,
        )
    summary = {
        "bench": "graph_scale",
        "python": sys.version.split()[0],
        "trio": trio.__version__,
        "results": results,
        "target_10k_s": TARGET_10K_S,
        "meets_target": meets,
        "linearity": linearity,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
