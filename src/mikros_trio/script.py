"""The script kind (``types = ["script"]``): one shot, its result is the exit code.

The user writes ``async def main(lifetime) -> int | None``. Returning
``None`` exits 0, returning an int exits with it, raising exits 1 with the
error logged. A signal cancels the script at once (there is nothing to
drain in a one-shot job) and the exit code says so: 128 + the signal's
number, as shells report it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ._component import Component, Lifetime
from ._container import BuildContext, EntryComponent
from ._runtime_settings import ScriptSettings
from ._telemetry import Telemetry

__all__ = ["ScriptComponent", "build_script"]

log = logging.getLogger("mikros_trio")


class ScriptComponent(EntryComponent):
    """Runs the user's script once, then stops the service with its exit code.

    The run is one :class:`~mikros_trio.ext.Call` (kind ``script``), so features
    log, time and trace it like a request.
    """

    def __init__(
        self, provider: Callable[[], Any], name: str, telemetry: Telemetry | None = None
    ) -> None:
        super().__init__(provider, name)
        self._telemetry = telemetry or Telemetry()

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        main = self.entry()
        task_status.started()
        telemetry = self._telemetry
        call = telemetry.begin("script", "internal", self.name)
        token = telemetry.enter(call)
        status = "error"  # unless it returns exit code 0
        try:
            code = await self._run(main, lifetime)
            status = "ok" if code == 0 else "error" if code is not None else "cancelled"
        except Exception as error:
            call.error = error
            raise
        finally:
            telemetry.leave(token)
            telemetry.end(call, status, failed=status != "ok")

    async def _run(
        self, main: Callable[[Lifetime], Awaitable[Any]], lifetime: Lifetime
    ) -> int | None:
        """Run the script; its exit code, or ``None`` if a stop cancelled it."""
        finished = False
        result: Any = None
        async with trio.open_nursery() as nursery:

            async def cancel_on_stop() -> None:
                await lifetime.wait_stopping()
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_on_stop)
            result = await main(lifetime)
            finished = True
            nursery.cancel_scope.cancel()
        if finished:
            code = _exit_code(result)
            lifetime.stop("script finished", exit_code=code)
            return code
        trigger = lifetime.trigger
        signum = trigger.signal if trigger is not None else None
        log.warning(
            "script cancelled before it finished (%s)", trigger.reason if trigger else "stop"
        )
        lifetime.stop("script cancelled", exit_code=128 + signum if signum else 1)
        return None


def _exit_code(result: Any) -> int:
    if result is None:
        return 0
    if isinstance(result, int) and not isinstance(result, bool) and 0 <= result <= 255:
        return result
    log.error("script returned %r; expected None or an int from 0 to 255", result)
    return 1


def build_script(context: BuildContext) -> Sequence[Component]:
    """Kind builder: one script component from ``[runtime.script] provider``."""
    settings: ScriptSettings = context.settings
    provider = context.provider(settings.provider, "runtime.script.provider")
    return [ScriptComponent(provider, "script", context.telemetry)]
