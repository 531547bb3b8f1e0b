"""The HTTP service the hostile suite attacks, started as users start one (python http_target.py).

``HOSTILE_TOML`` names its service.toml; ``HOSTILE_START`` set to ``raise``
or ``hang`` makes the app's ``before_serving`` fail or never finish.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import trio
from dependency_injector import providers
from quart import request
from quart_trio import QuartTrio

import mikros_trio
from mikros_trio import (
    ConditionError,
    NotFoundError,
    PermissionDeniedError,
    ServiceContainer,
    ValidationError,
)


class Meltdown(BaseException):
    """A BaseException subclass that is neither an Exception nor one of Python's own."""


#: What ``/raise/<kind>`` raises (a fresh exception each time).
RAISES: dict[str, Callable[[], BaseException]] = {
    "exception": lambda: RuntimeError("the handler broke"),
    "validation": lambda: ValidationError("bad input"),
    "permission": lambda: PermissionDeniedError("not yours"),
    "not-found": lambda: NotFoundError("no such thing"),
    "condition": lambda: ConditionError("not now"),
    "system-exit": lambda: SystemExit(3),
    "keyboard-interrupt": KeyboardInterrupt,
    "generator-exit": GeneratorExit,
    "base-exception": lambda: Meltdown("a BaseException subclass"),
}


def create_app() -> QuartTrio:
    """Routes the attacks need: fast, slow, large, body-reading and raising handlers."""
    app = QuartTrio("hostile")
    stats = {"in_flight": 0, "most_in_flight": 0, "served": 0}
    mode = os.environ.get("HOSTILE_START", "")

    @app.before_serving
    async def starting() -> None:
        if mode == "raise":
            raise ValueError("db unreachable")
        if mode == "hang":
            print("before_serving: hanging", flush=True)
            await trio.sleep_forever()

    @app.get("/hello")
    async def hello() -> str:
        stats["served"] += 1
        return "hello"

    @app.get("/work")
    async def work() -> dict[str, Any]:
        stats["in_flight"] += 1
        stats["most_in_flight"] = max(stats["most_in_flight"], stats["in_flight"])
        try:
            await trio.sleep(float(request.args.get("ms", "20")) / 1000)
        finally:
            stats["in_flight"] -= 1
        stats["served"] += 1
        return {"done": True}

    @app.get("/big")
    async def big() -> bytes:
        return b"x" * int(request.args.get("bytes", str(1024 * 1024)))

    @app.post("/echo")
    async def echo() -> dict[str, int]:
        return {"length": len(await request.get_data())}

    @app.get("/stats")
    async def get_stats() -> dict[str, int]:
        return stats

    @app.get("/raise/<kind>")
    async def raise_kind(kind: str) -> str:
        raise RAISES[kind]()

    return app


class Container(ServiceContainer):
    app = providers.Singleton(create_app)


async def main() -> None:
    await mikros_trio.run(Container, os.environ["HOSTILE_TOML"])


if __name__ == "__main__":
    trio.run(main)
