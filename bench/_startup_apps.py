"""The peers ``startup.py`` compares the HTTP example with, as their users start them.

Each serves what the HTTP example serves (``GET``/``POST /items``,
``GET /items/{id}`` over an in-memory store) plus ``GET /readyz``, the probe
every server in the start-up benchmark is polled on. Self-contained on
purpose: importing the example would import mikros_trio and Quart into a
peer and measure them there too.

- ``starlette_app``: a Starlette app factory, started as
  ``python -m uvicorn --factory _startup_apps:starlette_app --app-dir bench``.
- ``quart_app``: the same routes on QuartTrio, served by
  ``python bench/_startup_apps.py PORT`` on ``hypercorn.trio.serve`` (how a
  QuartTrio app runs on Trio without a framework; SIGTERM stops it).
"""

from __future__ import annotations

import signal
import sys
from typing import Any


class _Store:
    """Items by id, as the example's ``ItemStore`` keeps them."""

    def __init__(self) -> None:
        self.items: dict[int, dict[str, Any]] = {}

    def add(self, body: Any) -> dict[str, Any]:
        item = {"id": len(self.items) + 1, "name": str(body["name"]), "price": float(body["price"])}
        self.items[item["id"]] = item
        return item


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    store = _Store()

    async def readyz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def list_items(request: Request) -> JSONResponse:
        return JSONResponse({"items": list(store.items.values())})

    async def create_item(request: Request) -> JSONResponse:
        return JSONResponse(store.add(await request.json()), status_code=201)

    async def get_item(request: Request) -> JSONResponse:
        item = store.items.get(request.path_params["item_id"])
        if item is None:
            return JSONResponse({"message": "not found"}, status_code=404)
        return JSONResponse(item)

    return Starlette(
        routes=[
            Route("/readyz", readyz),
            Route("/items", list_items, methods=["GET"]),
            Route("/items", create_item, methods=["POST"]),
            Route("/items/{item_id:int}", get_item),
        ]
    )


def quart_app() -> Any:
    from quart import request
    from quart_trio import QuartTrio

    app = QuartTrio(__name__)
    store = _Store()

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/items")
    async def list_items() -> dict[str, Any]:
        return {"items": list(store.items.values())}

    @app.post("/items")
    async def create_item() -> tuple[dict[str, Any], int]:
        return store.add(await request.get_json(force=True)), 201

    @app.get("/items/<int:item_id>")
    async def get_item(item_id: int) -> Any:
        item = store.items.get(item_id)
        if item is None:
            return {"message": "not found"}, 404
        return item

    return app


def serve_quart(port: int) -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:

            async def sigterm() -> None:
                async for _ in signals:
                    return

            await serve(quart_app(), config, shutdown_trigger=sigterm)

    trio.run(main)


if __name__ == "__main__":
    serve_quart(int(sys.argv[1]))
