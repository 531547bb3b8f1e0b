"""The script kind (``types = ["script"]``): one shot, its result is the exit code.

The user writes ``async def main(lifetime) -> int | None``. Returning
``None`` exits 0, returning an int exits with it, raising exits 1 with the
error logged. A signal cancels the script at once (there is nothing to
drain in a one-shot job) and the exit code says so: 128 + the signal's
number, as shells report it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio

from ._component import Component, Lifetime
from ._container import BuildContext, EntryComponent
from ._runtime_settings import ScriptSettings

__all__ = ["ScriptComponent", "build_script"]

log = logging.getLogger("mikros_trio")


class ScriptComponent(EntryComponent):
    """Runs the user's script once, then stops the service with its exit code."""

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        main = self.entry()
        task_status.started()
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
            lifetime.stop("script finished", exit_code=_exit_code(result))
            return
        trigger = lifetime.trigger
        signum = trigger.signal if trigger is not None else None
        log.warning(
            "script cancelled before it finished (%s)", trigger.reason if trigger else "stop"
        )
        lifetime.stop("script cancelled", exit_code=128 + signum if signum else 1)


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
    return [
        ScriptComponent(context.provider(settings.provider, "runtime.script.provider"), "script")
    ]
