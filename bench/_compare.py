"""The overhead benchmarks' shared method: replicas of each server, loaded in shuffled rounds.

Two measurements of one server a few seconds apart differ by 10-30 % on a
shared machine, and two processes of the *same* server can differ by
5-10 % over a whole run (each has its own memory layout and hash seed).
So each compared server runs as several processes (replicas), and
``compare`` warms every one up, then runs ``rounds`` rounds; each round
loads every replica once, in an order shuffled per round (seeded, so a run
is repeatable in its order) so neither drift on the machine nor position
favours a side. It records each load's rate, errors and the server's CPU
time per unit of work, and returns the figures both ``*_overhead.py``
scripts print as JSON:

- ``ratio``: median framework rate over median bare rate, all replicas
  pooled;
- ``noise``: for each server with two replicas or more, its slowest
  replica's median over its fastest's. This is an A/A comparison run
  alongside the A/B: a ``ratio`` within ``1 - noise`` of the target is
  closer than this run can tell apart.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from _http_apps import LoadResult, cpu_seconds

#: Processes per compared server (framework and bare); references run one.
REPLICAS = 2


def replicated(start: Callable[[Path], Mapping[str, Any]], scratch: Path) -> dict[str, list[Any]]:
    """``REPLICAS`` of each server ``start(folder)`` starts; each call gets its own folder.

    The folder is for what a replica writes (the framework's log file).
    """
    servers: dict[str, list[Any]] = {}
    for replica in range(REPLICAS):
        folder = scratch / str(replica)
        folder.mkdir()
        for name, server in start(folder).items():
            servers.setdefault(name, []).append(server)
    return servers


def compare(
    servers: Mapping[str, Sequence[Any]],
    *,
    rounds: int,
    load: Callable[[int, float], LoadResult],
    seconds: float,
    unit: str,
    target: float,
    cpu: Callable[[Any], float | None] | None = None,
) -> dict[str, Any]:
    """Run the rounds; return rates, medians, the framework/bare ratio, noise and CPU per unit.

    ``servers`` maps a name to its replicas and must hold ``framework`` and
    ``bare``; others are references. Every replica is closed on the way out
    (exit codes included). ``cpu(server)`` gives the CPU seconds a server
    has used (default: its process's; a server of several processes
    passes its own).
    """

    cpu_of = cpu if cpu is not None else _process_cpu

    replicas = [
        (name, index, server)
        for name, group in servers.items()
        for index, server in enumerate(group)
    ]
    results: dict[str, list[LoadResult]] = {name: [] for name in servers}
    by_replica: dict[tuple[str, int], list[float]] = {(n, i): [] for n, i, _ in replicas}
    cpu_us: dict[str, list[float]] = {name: [] for name in servers}
    round_ratios: list[float] = []
    try:
        for _, _, server in replicas:
            server.wait_ready()
            load(server.port, 1.0)  # warm-up, not counted
        for number in range(1, rounds + 1):
            order = list(replicas)
            random.Random(number).shuffle(order)
            this_round: dict[str, list[float]] = {name: [] for name in servers}
            for name, index, server in order:
                before = cpu_of(server)
                result = load(server.port, seconds)
                after = cpu_of(server)
                results[name].append(result)
                by_replica[name, index].append(result.rate)
                this_round[name].append(result.rate)
                cpu = ""
                if before is not None and after is not None and result.count:
                    cpu_us[name].append((after - before) / result.count * 1e6)
                    cpu = f", server CPU {cpu_us[name][-1]:4.0f} µs/{unit}"
                print(
                    f"round {number}: {name:9s}#{index} {result.rate:9.1f} {unit}s/s "
                    f"({result.count} {unit}s, {result.errors} errors{cpu})"
                )
            round_ratios.append(
                statistics.median(this_round["framework"]) / statistics.median(this_round["bare"])
            )
    finally:
        codes = {
            f"{name}#{index}" if len(servers[name]) > 1 else name: server.close()
            for name, index, server in replicas
        }

    medians = {name: statistics.median(r.rate for r in runs) for name, runs in results.items()}
    ratio = medians["framework"] / medians["bare"]
    errors = {name: sum(r.errors for r in runs) for name, runs in results.items()}
    noise: dict[str, float] = {}
    for name, group in servers.items():
        if len(group) > 1:
            per_replica = [statistics.median(by_replica[name, i]) for i in range(len(group))]
            noise[name] = round(min(per_replica) / max(per_replica), 3)
    return {
        "replicas": {name: len(group) for name, group in servers.items()},
        "rates": {name: [round(r.rate, 1) for r in runs] for name, runs in results.items()},
        "medians": {name: round(value, 1) for name, value in medians.items()},
        "ratio": round(ratio, 3),
        "per_round_ratios": [round(value, 3) for value in round_ratios],
        "noise": noise,
        f"cpu_us_per_{unit}": {
            name: round(statistics.median(values)) if values else None
            for name, values in cpu_us.items()
        },
        "target_ratio": target,
        "meets_target": ratio >= target and not any(errors.values()),
        "errors": errors,
        "exit_codes": codes,
    }


def _process_cpu(server: Any) -> float | None:
    return cpu_seconds(server.proc.pid)


def verdict(figures: Mapping[str, Any]) -> str:
    """The human end of the summary line: target met or not, and this run's resolution."""
    met = "met" if figures["meets_target"] else "NOT met"
    text = f"target ≥ {figures['target_ratio']}: {met}"
    if figures["noise"]:
        worst = min(figures["noise"].values())
        text += f"; replicas of one server differed by up to {(1 - worst) * 100:.0f} %"
    return text
