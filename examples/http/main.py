"""An HTTP service: a small JSON API over an in-memory item store.

Run it from the repository root, then call it from another shell:

    python examples/http/main.py
    curl -s localhost:8080/items -d '{"name": "pen", "price": 1.5}'   # 201, the new item
    curl -s localhost:8080/items                                      # every item
    curl -s localhost:8080/items/1                                    # one item, or 404
    curl -s localhost:8080/readyz                                     # probes come built in

``MIKROS_HTTP_PORT=9000`` picks another port; ``MIKROS_TRIO_VERBOSE=1``
prints the lifecycle events. Stop it with Ctrl-C (or SIGTERM): the server
stops accepting, lets requests in flight finish, and only then does the
store's ``on_shutdown`` run, because the app is built with the store (the
container's wiring is the dependency). Bad input raises
``mikros_trio.ValidationError`` (400) and unknown ids ``NotFoundError``
(404); the framework answers both with Mikros JSON error bodies. The store
and the app log through the logger feature (``structlog.get_logger``), so
their lines carry the service's fields like the framework's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import structlog
import trio
from dependency_injector import providers
from quart import request
from quart_trio import QuartTrio

import mikros_trio
from mikros_trio import NotFoundError, ServiceContainer, ValidationError

log = structlog.get_logger("items")


@dataclass(frozen=True)
class Item:
    id: int
    name: str
    price: float


class ItemStore:
    """Items by id; a resource with start and shutdown hooks (a database would sit here)."""

    def __init__(self) -> None:
        self._items: dict[int, Item] = {}

    async def on_start(self) -> None:
        log.info("store started")

    async def on_shutdown(self) -> None:
        log.info("store stopped", items=len(self._items))

    def add(self, name: str, price: float) -> Item:
        item = Item(len(self._items) + 1, name, price)
        self._items[item.id] = item
        return item

    def items(self) -> list[Item]:
        return list(self._items.values())

    def get(self, item_id: int) -> Item:
        try:
            return self._items[item_id]
        except KeyError:
            raise NotFoundError(f"item {item_id} does not exist") from None


def parse_item(body: Any) -> tuple[str, float]:
    """``(name, price)`` from a request body, or a ``ValidationError`` saying what is wrong."""
    if not isinstance(body, dict):
        raise ValidationError('expected a JSON object like {"name": "pen", "price": 1.5}')
    name, price = body.get("name"), body.get("price")
    if not isinstance(name, str) or not name:
        raise ValidationError("name: expected a non-empty string")
    if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
        raise ValidationError("price: expected a number >= 0")
    return name, float(price)


def create_app(store: ItemStore) -> QuartTrio:
    """The Quart app; the framework adds probes, limits and JSON errors around it."""
    app = QuartTrio(__name__)

    @app.before_serving
    async def serving() -> None:
        log.info("api serving")

    @app.after_serving
    async def drained() -> None:
        log.info("api drained")

    @app.post("/items")
    async def create_item() -> tuple[dict[str, Any], int]:
        # force: curl -d sends a form content type; the body is JSON all the same.
        item = store.add(*parse_item(await request.get_json(force=True, silent=True)))
        return asdict(item), 201

    @app.get("/items")
    async def list_items() -> dict[str, Any]:
        return {"items": [asdict(item) for item in store.items()]}

    @app.get("/items/<int:item_id>")
    async def get_item(item_id: int) -> dict[str, Any]:
        return asdict(store.get(item_id))

    return app


class Container(ServiceContainer):
    store = providers.Singleton(ItemStore)
    app = providers.Singleton(create_app, store=store)


if __name__ == "__main__":
    trio.run(mikros_trio.run, Container)
