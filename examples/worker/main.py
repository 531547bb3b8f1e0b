"""A worker service: a ticker that runs jobs until shutdown.

Run it from the repository root and stop it with Ctrl-C (or SIGTERM):

    python examples/worker/main.py
    MIKROS_TRIO_VERBOSE=1 python examples/worker/main.py   # print lifecycle events

``Counter`` is a lifecycle component: its ``on_start`` runs before the
worker starts and its ``on_shutdown`` after the worker has drained, because
the worker is injected with it (the container's wiring is the dependency).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
from dependency_injector import providers

import mikros_trio
from mikros_trio import Lifetime, ServiceContainer


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
        print("counter: on_start", flush=True)

    async def on_shutdown(self) -> None:
        print(f"counter: on_shutdown after {self.jobs} jobs", flush=True)


class Ticker:
    """The worker loop: one job per interval; the job in flight finishes on shutdown."""

    def __init__(self, counter: Counter, settings: Settings) -> None:
        self.counter = counter
        self.settings = settings

    async def run(self, lifetime: Lifetime) -> None:
        print("ticker: running", flush=True)
        while not lifetime.stopping:
            await trio.sleep(self.settings.job_seconds)  # stands in for real work
            self.counter.jobs += 1
            with trio.move_on_after(self.settings.interval):
                await lifetime.wait_stopping()
        print("ticker: drained", flush=True)


class Container(ServiceContainer):
    service_model = Settings

    counter = providers.Singleton(Counter)
    worker = providers.Factory(Ticker, counter=counter, settings=ServiceContainer.settings)


if __name__ == "__main__":
    trio.run(mikros_trio.run, Container)
