"""A worker service: a ticker that runs jobs until shutdown.

Run it from the repository root and stop it with Ctrl-C (or SIGTERM):

    python examples/worker/main.py
    MIKROS_TRIO_VERBOSE=1 python examples/worker/main.py   # print lifecycle events

``Counter`` is a lifecycle component: its ``on_start`` runs before the
worker starts and its ``on_shutdown`` after the worker has drained, because
the worker is injected with it (the container's wiring is the dependency).
Both say what they do through the logger feature (``structlog.get_logger``):
JSON lines on stdout beside the framework's, coloured lines on a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import trio
from dependency_injector import providers

import mikros_trio
from mikros_trio import Lifetime, ServiceContainer

log = structlog.get_logger("ticker")


@dataclass(frozen=True)
class Settings:
    """The ``[service]`` table, validated at start-up."""

    interval: float = 0.2
    job_seconds: float = 0.05


class Counter:
    """Counts finished jobs; a resource with start and shutdown hooks."""

    def __init__(self) -> None:
        self.jobs = 0

    async def on_start(self) -> None:
        log.info("counter started")

    async def on_shutdown(self) -> None:
        log.info("counter stopped", jobs=self.jobs)


class Ticker:
    """The worker loop: one job per interval; the job in flight finishes on shutdown."""

    def __init__(self, counter: Counter, settings: Settings) -> None:
        self.counter = counter
        self.settings = settings

    async def run(self, lifetime: Lifetime) -> None:
        log.info("ticker running")
        while not lifetime.stopping:
            await trio.sleep(self.settings.job_seconds)  # stands in for real work
            self.counter.jobs += 1
            with trio.move_on_after(self.settings.interval):
                await lifetime.wait_stopping()
        log.info("ticker drained")


class Container(ServiceContainer):
    service_model = Settings

    counter = providers.Singleton(Counter)
    worker = providers.Factory(Ticker, counter=counter, settings=ServiceContainer.settings)


if __name__ == "__main__":
    trio.run(mikros_trio.run, Container)
