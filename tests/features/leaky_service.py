"""A service that tries to leak its secret: it logs it, and raises it in a 500, a 404 and a worker.

Run by ``test_env.py`` through ``mikros-trio run`` with ``TOKEN`` (and its
per-service override ``LEAKY__TOKEN``) listed in ``[features.env] secrets``;
the test checks that neither value reaches stdout, stderr or a response.
``GET /crash`` makes the worker fail, which ends the service with exit code 1.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio
from dependency_injector import providers
from quart_trio import QuartTrio

from mikros_trio import Lifetime, NotFoundError, ServiceContainer
from mikros_trio.features.env import Env

log = logging.getLogger("leaky")


class Tripwire:
    """Shared between the app and the worker: pulled by ``GET /crash``."""

    def __init__(self) -> None:
        self.pulled = trio.Event()


def create_app(env: Env, tripwire: Tripwire) -> QuartTrio:
    app = QuartTrio(__name__)
    token = env.secret("TOKEN")
    # Careless code: the shared value, straight from the process environment.
    log.warning("shared token is %s", os.environ["TOKEN"])

    @app.get("/boom")
    async def boom() -> dict[str, Any]:
        log.warning("calling upstream with token %s", token.reveal())
        raise RuntimeError(f"upstream rejected token {token.reveal()}")

    @app.get("/missing")
    async def missing() -> dict[str, Any]:
        raise NotFoundError(f"no account for token {token.reveal()}")

    @app.get("/crash")
    async def crash() -> dict[str, Any]:
        tripwire.pulled.set()
        return {"pulled": True}

    return app


class Crasher:
    """A worker that fails, with the secret in its exception, once the tripwire is pulled."""

    def __init__(self, env: Env, tripwire: Tripwire) -> None:
        self.env = env
        self.tripwire = tripwire

    async def run(self, lifetime: Lifetime) -> None:
        await self.tripwire.pulled.wait()
        value = self.env.str("TOKEN")
        log.error("worker gives up; token was %s", value)
        raise RuntimeError(f"worker failed with token {value}")


class Container(ServiceContainer):
    tripwire = providers.Singleton(Tripwire)
    app = providers.Singleton(create_app, env=ServiceContainer.env, tripwire=tripwire)
    worker = providers.Singleton(Crasher, env=ServiceContainer.env, tripwire=tripwire)
