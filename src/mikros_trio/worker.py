"""The worker kind (``types = ["worker"]``; Mikros' older name ``native`` too).

Two shapes. A long-running loop the user writes as ``async def
run(lifetime)``: it is ready as soon as it runs and should return once
``lifetime.stopping`` turns true (or simply loop until cancelled): the
supervisor cancels it at the drain deadline either way. Returning on its
own ends the service, exit 0::

    class Poller:
        async def run(self, lifetime: Lifetime) -> None:
            while not lifetime.stopping:
                await self.poll_once()
                await trio.sleep(1)

Or, with ``[runtime.worker] interval = <seconds>``, a periodic job: the
framework calls the worker's ``run_once`` (or the worker itself) every
``interval`` seconds after the previous iteration ended. Each iteration is
a :class:`~mikros_trio.Call` (kind ``worker``): features log, time, count
and trace it. A failing iteration is logged and counted, and the next one
runs on schedule: one bad poll must not end a service. Stopping waits for
the iteration in flight (bounded by the drain deadline) and starts no new
one::

    class Reaper:
        async def run_once(self) -> None:
            await self.delete_expired()
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ._component import Component, Lifetime
from ._container import BuildContext, EntryComponent, entry_point
from ._runtime_settings import WorkerSettings
from ._telemetry import Telemetry

__all__ = ["WorkerComponent", "build_worker"]

log = logging.getLogger("mikros_trio.worker")


class WorkerComponent(EntryComponent):
    """Runs the user's worker (a loop, or a periodic job) as a work-generating component."""

    def __init__(
        self,
        provider: Callable[[], Any],
        name: str,
        *,
        interval: float | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(provider, name)
        self._interval = interval
        self._telemetry = telemetry or Telemetry()

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self._interval is None:
            loop = self.entry()
            task_status.started()
            await loop(lifetime)
            return
        worker = self._provider()
        once = entry_point(getattr(worker, "run_once", worker), self.name)
        task_status.started()
        while not lifetime.stopping:
            await self._iterate(once, lifetime)
            with trio.move_on_after(self._interval):
                await lifetime.wait_stopping()

    async def _iterate(
        self, once: Callable[[Lifetime], Awaitable[Any]], lifetime: Lifetime
    ) -> None:
        telemetry = self._telemetry
        call = telemetry.begin("worker", "internal", self.name)
        token = telemetry.enter(call)
        status, failed = "error", True  # unless the iteration completes
        try:
            await once(lifetime)
            status, failed = "ok", False
        except trio.Cancelled:
            status = "cancelled"  # cut at the drain deadline
            raise
        except Exception as error:
            call.error = error
            log.error("worker %r: an iteration failed", self.name, exc_info=error)
        finally:
            telemetry.leave(token)
            telemetry.end(call, status, failed=failed)


def build_worker(context: BuildContext) -> Sequence[Component]:
    """Kind builder: one worker component from ``[runtime.worker] provider``."""
    settings: WorkerSettings = context.settings
    provider = context.provider(settings.provider, "runtime.worker.provider")
    return [
        WorkerComponent(provider, "worker", interval=settings.interval, telemetry=context.telemetry)
    ]
