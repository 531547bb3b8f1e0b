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
a :class:`~mikros_trio.ext.Call` (kind ``worker``): features log, time, count
and trace it. Stopping waits for the iteration in flight (bounded by the
drain deadline) and starts no new one; a wait between iterations ends at
once::

    class Reaper:
        async def run_once(self) -> bool:
            deleted = await self.delete_expired()
            return deleted > 0  # False: an idle tick

- **Idle ticks stay quiet.** An iteration that returns exactly ``False``
  found nothing to do: its call ends with status ``idle`` and is marked
  quiet (``call.state["quiet"]``), so its access line is written at debug
  and no span is exported for it nor for the calls it made (a database
  poll); metrics still count it, as ``idle``.
  Any other result, ``None`` included, is work done, as before.
  ``report_idle = true`` reports idle ticks like any other.
- **Failures back off.** A failing iteration is logged and counted and the
  service goes on: one bad poll must not end it. After ``k`` failures in a
  row the next iteration waits ``interval * 2**(k-1)`` seconds, at most
  ``max_backoff`` (and never less than ``interval``); no jitter, so the
  schedule is what the logs say. The first failure of a streak is logged
  with its traceback, the later ones on one warning line each (at most
  one per wait, which only grows), and the first success after a streak
  says how many failed.
- **Unhealthy after a threshold.** From ``unhealthy_after`` failures in a
  row (3 by default; 0 never), the worker's health check says not ok: the
  component shows ``{"ok": false, ...}`` under ``checks`` on ``/healthz``
  and readiness turns off, through the same mechanism as a resource's
  health; the next successful (or idle) iteration clears it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ._component import Component, Lifetime
from ._container import BuildContext, EntryComponent, entry_point
from ._runtime_settings import WorkerSettings
from ._telemetry import QUIET, Telemetry

__all__ = ["WorkerComponent", "build_worker"]

log = logging.getLogger("mikros_trio.worker")


class WorkerComponent(EntryComponent):
    """Runs the user's worker (a loop, or a periodic job) as a work-generating component.

    A periodic job's failures never stop the service; a stop request while
    it waits (between iterations or backing off) ends the wait at once.
    """

    def __init__(
        self,
        provider: Callable[[], Any],
        name: str,
        *,
        interval: float | None = None,
        telemetry: Telemetry | None = None,
        max_backoff: float = 300.0,
        unhealthy_after: int = 3,
        report_idle: bool = False,
    ) -> None:
        super().__init__(provider, name)
        self._interval = interval
        self._telemetry = telemetry or Telemetry()
        self._max_backoff = max_backoff
        self._unhealthy_after = unhealthy_after
        self._report_idle = report_idle
        #: Failed iterations in a row, and the last one's error (for the health check).
        self.failures = 0
        self._last_error = ""

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        interval = self._interval
        if interval is None:
            loop = self.entry()
            task_status.started()
            await loop(lifetime)
            return
        worker = self._provider()
        once = entry_point(getattr(worker, "run_once", worker), self.name)
        health = lifetime.health
        if self._unhealthy_after:
            health._add_check(self.name, self.health)
        try:
            task_status.started()
            while not lifetime.stopping:
                await self._iterate(once, lifetime)
                if self._unhealthy_after:
                    health._poll_check(self.name)
                with trio.move_on_after(self.delay()):
                    await lifetime.wait_stopping()
        finally:
            health._remove_check(self.name)

    def delay(self) -> float:
        """Seconds to wait before the next iteration, given the failures in a row."""
        interval = self._interval or 0.0
        if not self.failures:
            return interval
        # min() before the power: 2**k overflows a float past k = 1023.
        doublings = min(self.failures - 1, 64)
        return max(interval, min(interval * 2.0**doublings, self._max_backoff))

    def health(self) -> dict[str, Any]:
        """The worker's health check: not ok from ``unhealthy_after`` failures in a row."""
        ok = self.failures < self._unhealthy_after
        details: dict[str, Any] = {"ok": ok, "consecutive_failures": self.failures}
        if self.failures:
            details["last_error"] = self._last_error
        return details

    async def _iterate(
        self, once: Callable[[Lifetime], Awaitable[Any]], lifetime: Lifetime
    ) -> None:
        telemetry = self._telemetry
        call = telemetry.begin("worker", "internal", self.name)
        if not self._report_idle:
            call.state[QUIET] = False  # may turn quiet: tracing holds its children's spans
        token = telemetry.enter(call)
        status, failed = "error", True  # unless the iteration completes
        try:
            result = await once(lifetime)
            status, failed = "ok", False
            if result is False:
                status = "idle"
                if not self._report_idle:
                    call.state[QUIET] = True
        except trio.Cancelled:
            status = "cancelled"  # cut at the drain deadline
            raise
        except Exception as error:
            call.error = error
            self._failed(error)
        finally:
            telemetry.leave(token)
            telemetry.end(call, status, failed=failed)
        if not failed and self.failures:
            log.info("worker %r: recovered after %d failed iterations", self.name, self.failures)
            self.failures = 0
            self._last_error = ""

    def _failed(self, error: Exception) -> None:
        self.failures += 1
        # The type only on /healthz: probes are not masked as log lines are.
        self._last_error = type(error).__name__
        name, failures = self.name, self.failures
        if failures == 1:
            log.error(
                "worker %r: an iteration failed; next try in %g s",
                name,
                self.delay(),
                exc_info=error,
            )
        else:
            log.warning(
                "worker %r: %d failed iterations in a row (%s: %s); next try in %g s",
                name,
                failures,
                self._last_error,
                error,
                self.delay(),
            )
        if failures == self._unhealthy_after:
            log.error("worker %r: not ok after %d failed iterations in a row", name, failures)


def build_worker(context: BuildContext) -> Sequence[Component]:
    """Kind builder: one worker component from ``[runtime.worker] provider``."""
    settings: WorkerSettings = context.settings
    provider = context.provider(settings.provider, "runtime.worker.provider")
    worker = WorkerComponent(
        provider,
        "worker",
        interval=settings.interval,
        telemetry=context.telemetry,
        max_backoff=settings.max_backoff,
        unhealthy_after=settings.unhealthy_after,
        report_idle=settings.report_idle,
    )
    return [worker]
