"""The workers tests' service: every answer names the process that served it.

Switches, from the environment (each worker inherits it):

- ``WORKERS_TEST_FAIL_START=1``: the app's startup raises, so no worker can start;
- ``WORKERS_TEST_HOLD=<folder>``: the first worker to claim ``<folder>/token``
  holds its startup until ``<folder>/go`` exists (at most 60 s), so the
  others are ready and it is not.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import trio
from dependency_injector import providers
from quart import request
from quart_trio import QuartTrio

import mikros_trio
from mikros_trio import ServiceContainer


def create_app() -> QuartTrio:
    app = QuartTrio(__name__)

    @app.before_serving
    async def start() -> None:
        if os.environ.get("WORKERS_TEST_FAIL_START"):
            raise RuntimeError("the test app refuses to start")
        hold = os.environ.get("WORKERS_TEST_HOLD")
        if hold:
            try:
                os.close(os.open(Path(hold, "token"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return  # another worker holds
            with trio.move_on_after(60):
                # Another process creates the file: there is no event to wait on.
                while not await trio.Path(hold, "go").exists():  # noqa: ASYNC110
                    await trio.sleep(0.02)

    @app.get("/pid")
    async def pid() -> dict[str, Any]:
        return {"pid": os.getpid()}

    @app.get("/slow")
    async def slow() -> dict[str, Any]:
        await trio.sleep(float(request.args.get("seconds", "1")))
        return {"pid": os.getpid()}

    return app


class Container(ServiceContainer):
    app = providers.Singleton(create_app)


if __name__ == "__main__":
    # As a service's own main.py: the parent starts its workers from this file.
    config = Path(__file__).with_name("service.toml")
    trio.run(functools.partial(mikros_trio.run, Container, config))
