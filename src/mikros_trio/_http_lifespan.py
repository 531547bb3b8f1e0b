"""The HTTP kind's driver of an app's ASGI lifespan (Quart's before_serving and after_serving).

hypercorn's own ``Lifespan`` reports a failing ``before_serving`` as
``LifespanFailureError`` carrying only ``str(error)`` (the user's exception
type is lost), waits up to its own 60 s ``startup_timeout``, and its task had
to be shielded by the kind so ``after_serving`` survives a cut drain, which
made every early failure (a port in use, a bad certificate) hang on that
shielded task. This driver keeps the one task the app's lifespan needs in a
shielded scope it always cancels on the way out, raises the app's own
exception, and leaves every deadline to the supervisor.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

__all__ = ["AppLifespan", "app_lifespan"]

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class AppLifespan:
    """One app's lifespan: :meth:`startup`, then :meth:`shutdown`, each answered or raised."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self._app = app
        self._state = state
        self._to_app, self._from_us = trio.open_memory_channel[dict[str, Any]](1)
        self._answered = trio.Event()
        self._failure: BaseException | None = None
        # False once the app shows it does not speak lifespan (it raised
        # before answering startup): the ASGI spec says to go on without it.
        self.supported = True
        # True once the app's lifespan call has returned: nothing more will
        # answer (an app that ignores lifespan returns at once).
        self._ended = False
        self.scope = trio.CancelScope(shield=True)

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The app's lifespan call; ended by cancelling :attr:`scope` (shielded from the rest)."""
        scope = {
            "type": "lifespan",
            "asgi": {"spec_version": "2.0", "version": "3.0"},
            "state": self._state,
        }
        with self.scope:
            task_status.started()
            try:
                await self._app(scope, self._from_us.receive, self._send)
            except Exception as error:
                if not self._answered.is_set():
                    self.supported = False
                else:
                    self._failure = error
            finally:
                self._ended = True
                self._answered.set()

    async def _send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind.endswith(".failed"):
            # Quart (and Starlette) send ``failed`` from inside the ``except``
            # block that caught the hook's exception: that exception, with
            # its type and traceback, is what the operator must read.
            error = sys.exception()
            self._failure = error if error is not None else RuntimeError(message.get("message"))
        self._answered.set()

    async def _ask(self, kind: str) -> None:
        if not self.supported or self._ended:
            return
        self._answered = trio.Event()
        try:
            await self._to_app.send({"type": kind})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the app's lifespan call has already returned
        await self._answered.wait()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    async def startup(self) -> None:
        """Run the app's startup hooks; raise the exception one of them raised."""
        await self._ask("lifespan.startup")

    async def shutdown(self) -> None:
        """Run the app's shutdown hooks; raise the exception one of them raised."""
        await self._ask("lifespan.shutdown")


@asynccontextmanager
async def app_lifespan(app: ASGIApp, state: dict[str, Any]) -> AsyncIterator[AppLifespan]:
    """Run ``app``'s lifespan task for the block; it is cancelled on the way out, whatever happens.

    The block calls :meth:`AppLifespan.startup` and :meth:`AppLifespan.shutdown`.
    """
    lifespan = AppLifespan(app, state)
    async with trio.open_nursery() as nursery:
        await nursery.start(lifespan.run)
        try:
            yield lifespan
        finally:
            lifespan.scope.cancel()
