"""The overhead benchmarks' shared method: alternate servers under the same load.

``compare`` warms every server up, then runs ``rounds`` rounds; each round
loads every server once, framework and bare in an order that flips each
round so drift on the machine hits both alike, and any reference server
after them. It records the rate, the errors and the server's CPU time per
unit of work (steadier than the rate when other work shares the machine),
and returns the figures both ``*_overhead.py`` scripts print as JSON.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import Any

from _http_apps import LoadResult, cpu_seconds


def compare(
    servers: Mapping[str, Any],
    *,
    rounds: int,
    load: Callable[[int, float], LoadResult],
    seconds: float,
    unit: str,
    target: float,
) -> dict[str, Any]:
    """Run the rounds; return rates, medians, the framework/bare ratio and CPU per unit.

    ``servers`` must hold ``framework`` and ``bare``; a third one is the
    reference. Every server is closed on the way out (exit codes included).
    """
    results: dict[str, list[LoadResult]] = {name: [] for name in servers}
    cpu_us: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.wait_ready()
            load(server.port, 1.0)  # warm-up, not counted
        for number in range(1, rounds + 1):
            order = ["framework", "bare"] if number % 2 else ["bare", "framework"]
            order += [name for name in servers if name not in order]
            for name in order:
                pid = servers[name].proc.pid
                before = cpu_seconds(pid)
                result = load(servers[name].port, seconds)
                after = cpu_seconds(pid)
                results[name].append(result)
                cpu = ""
                if before is not None and after is not None and result.count:
                    cpu_us[name].append((after - before) / result.count * 1e6)
                    cpu = f", server CPU {cpu_us[name][-1]:4.0f} µs/{unit}"
                print(
                    f"round {number}: {name:9s} {result.rate:9.1f} {unit}s/s "
                    f"({result.count} {unit}s, {result.errors} errors{cpu})"
                )
    finally:
        codes = {name: server.close() for name, server in servers.items()}

    medians = {name: statistics.median(r.rate for r in runs) for name, runs in results.items()}
    ratio = medians["framework"] / medians["bare"]
    errors = {name: sum(r.errors for r in runs) for name, runs in results.items()}
    return {
        "rates": {name: [round(r.rate, 1) for r in runs] for name, runs in results.items()},
        "medians": {name: round(value, 1) for name, value in medians.items()},
        "ratio": round(ratio, 3),
        "per_round_ratios": [
            round(f.rate / b.rate, 3)
            for f, b in zip(results["framework"], results["bare"], strict=True)
        ],
        f"cpu_us_per_{unit}": {
            name: round(statistics.median(values)) if values else None
            for name, values in cpu_us.items()
        },
        "target_ratio": target,
        "meets_target": ratio >= target and not any(errors.values()),
        "errors": errors,
        "exit_codes": codes,
    }
