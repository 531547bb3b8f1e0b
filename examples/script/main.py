"""A script service: adds up expenses and reports whether they fit a budget.

    python examples/script/main.py            # exit 0: within the limit
    mikros-trio run examples/script/main.py --config other.toml

Exit codes: 0 within the limit, 3 over it (a returned int), 1 when the
input is unusable (an exception, logged), 128 + N when signal N cut it short.
The verdict is a log line too (``structlog.get_logger``), with the total,
the limit and the verdict as fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import trio
from dependency_injector import providers

import mikros_trio
from mikros_trio import ServiceContainer

OVER_BUDGET = 3

log = structlog.get_logger("budget")


@dataclass(frozen=True)
class Settings:
    """The ``[service]`` table."""

    expenses: tuple[float, ...] = ()
    limit: float = 0.0
    pause: float = 0.0  # seconds to wait before answering (lets tests signal it mid-run)


class BudgetCheck:
    """The one-shot job: its return value becomes the exit code."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(self) -> int:
        if not self.settings.expenses:
            raise ValueError("no expenses to check: [service] expenses is empty")
        await trio.sleep(self.settings.pause)
        total = sum(self.settings.expenses)
        verdict = "within" if total <= self.settings.limit else "over"
        log.info("budget checked", total=total, limit=self.settings.limit, verdict=verdict)
        return 0 if total <= self.settings.limit else OVER_BUDGET


class Container(ServiceContainer):
    service_model = Settings

    script = providers.Factory(BudgetCheck, settings=ServiceContainer.settings)


if __name__ == "__main__":
    trio.run(mikros_trio.run, Container)
