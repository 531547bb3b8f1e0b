"""A FastAPI app on the HTTP kind: an orders API, typed with pydantic, served on Trio.

Run it from the repository root, then call it from another shell:

    mikros-trio run examples/fastapi/main.py     # Container, service.toml beside it
    curl -s localhost:8080/orders -H 'content-type: application/json' \
        -d '{"item": "pen", "quantity": 2}'              # 201, the new order
    curl -s localhost:8080/orders/1                     # one order, or 404 Mikros JSON
    curl -s localhost:8080/orders/x                     # 422 Mikros ValidationError

FastAPI runs on Trio through anyio, so the HTTP kind serves it as it serves
a QuartTrio app: probes, Mikros JSON errors (FastAPI's own HTTPException and
request validation errors included), calls named by route template
(``/orders/{order_id}``), body limits, and the app's lifespan run inside the
service's start and drain.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from dependency_injector import providers
from fastapi import FastAPI
from pydantic import BaseModel, Field

from mikros_trio import NotFoundError, ServiceContainer

log = structlog.get_logger("orders")  # the logger feature's lines, with the service's fields


class NewOrder(BaseModel):
    item: str = Field(min_length=1)
    quantity: int = Field(gt=0, le=1000)


class Order(NewOrder):
    id: int


class Orders:
    """Orders by id (a database would sit here)."""

    def __init__(self) -> None:
        self.orders: dict[int, Order] = {}

    def place(self, new: NewOrder) -> Order:
        order = Order(id=len(self.orders) + 1, **new.model_dump())
        self.orders[order.id] = order
        return order

    def get(self, order_id: int) -> Order:
        try:
            return self.orders[order_id]
        except KeyError:
            raise NotFoundError(f"order {order_id} does not exist") from None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Around serving: starts before the first request, ends once the last has drained."""
    orders: Orders = app.state.orders
    log.info("orders serving")
    yield
    log.info("orders drained", orders=len(orders.orders))


def create_app(orders: Orders) -> FastAPI:
    """The FastAPI app; the framework adds probes, limits and JSON errors around it."""
    app = FastAPI(lifespan=lifespan)
    app.state.orders = orders

    @app.post("/orders", status_code=201)
    async def place(new: NewOrder) -> Order:
        return orders.place(new)

    @app.get("/orders/{order_id}")
    async def get(order_id: int) -> Order:
        return orders.get(order_id)

    return app


class Container(ServiceContainer):
    orders = providers.Singleton(Orders)
    app = providers.Singleton(create_app, orders=orders)
