"""The worker kind (``types = ["worker"]``; Mikros' older name ``native`` too).

A long-running loop the user writes as ``async def run(lifetime)``. It is
ready as soon as it runs; it should return once ``lifetime.stopping`` turns
true (or simply loop until cancelled): the supervisor cancels it at the
drain deadline either way. Returning on its own ends the service, exit 0.

Example::

    class Poller:
        async def run(self, lifetime: Lifetime) -> None:
            while not lifetime.stopping:
                await self.poll_once()
                await trio.sleep(1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from ._component import Component, Lifetime
from ._container import BuildContext, EntryComponent
from ._runtime_settings import WorkerSettings

__all__ = ["WorkerComponent", "build_worker"]


class WorkerComponent(EntryComponent):
    """Runs the user's worker loop as a work-generating component."""

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        loop = self.entry()
        task_status.started()
        await loop(lifetime)


def build_worker(context: BuildContext) -> Sequence[Component]:
    """Kind builder: one worker component from ``[runtime.worker] provider``."""
    settings: WorkerSettings = context.settings
    return [
        WorkerComponent(context.provider(settings.provider, "runtime.worker.provider"), "worker")
    ]
