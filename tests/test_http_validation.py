"""Request models on the HTTP kind: validation failures as Mikros JSON, OpenAPI, handler errors.

A QuartTrio app declares its models with quart-schema, a FastAPI app with
its own annotations; both run as a real service, asked by a real httpx
client. An app's own error handler raising a Mikros error answers that
error, on Quart and on Starlette.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from dependency_injector import providers
from fastapi import FastAPI
from pydantic import BaseModel, Field
from quart_schema import QuartSchema, validate_querystring, validate_request, validate_response
from quart_trio import QuartTrio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from helpers import BOUND, client_for, get, start_http
from mikros_trio import NotFoundError, ServiceContainer
from mikros_trio.testing import RunningService, ServiceStarter


class Order(BaseModel):
    item: str
    quantity: int = Field(gt=0)


class Placed(BaseModel):
    id: int
    item: str
    quantity: int


class Page(BaseModel):
    limit: int = Field(le=100)


class Batch(BaseModel):
    quantities: list[int] = []
    prices: dict[str, int] = {}


class Missing(Exception):
    """What the apps' own handlers turn into a Mikros NotFoundError."""


def quart_app() -> QuartTrio:
    app = QuartTrio("orders")
    QuartSchema(app)

    @app.post("/orders")
    @validate_request(Order)
    @validate_response(Placed, 201)
    async def place(data: Order) -> tuple[Placed, int]:
        return Placed(id=1, item=data.item, quantity=data.quantity), 201

    @app.post("/batches")
    @validate_request(Batch)
    async def batch(data: Batch) -> dict[str, int]:
        return {"count": len(data.quantities)}

    @app.get("/orders")
    @validate_querystring(Page)
    async def orders(query_args: Page) -> dict[str, int]:
        return {"limit": query_args.limit}

    @app.get("/missing")
    async def missing() -> str:
        raise Missing("order 9")

    @app.errorhandler(Missing)
    async def not_found(error: Missing) -> str:
        raise NotFoundError(f"{error} does not exist")

    return app


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.post("/orders", status_code=201)
    async def place(order: Order) -> Placed:
        return Placed(id=1, item=order.item, quantity=order.quantity)

    return app


def starlette_app() -> Starlette:
    async def missing(request: Request) -> Response:
        raise Missing("order 9")

    async def not_found(request: Request, error: Exception) -> Response:
        raise NotFoundError(f"{error} does not exist")

    class Guard:
        """A user's middleware refusing a path: it runs outside Starlette's exception handlers."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] == "/guarded":
                raise NotFoundError("order 9 does not exist")
            await self.app(scope, receive, send)

    return Starlette(
        routes=[Route("/missing", missing)],
        exception_handlers={Missing: not_found},
        middleware=[Middleware(Guard)],
    )


async def serve(mikros_service: ServiceStarter, tmp_path: Path, build: Any) -> RunningService:
    class Container(ServiceContainer):
        app = providers.Singleton(build)

    await trio.Path(tmp_path).mkdir(exist_ok=True)
    return await start_http(mikros_service, tmp_path, container=Container)


async def post(running: RunningService, path: str, body: Any) -> Any:
    with trio.fail_after(BOUND):
        async with client_for(running) as client:
            return await client.post(path, json=body)


def schemas(document: Any) -> dict[str, Any]:
    """Every object schema in an OpenAPI document by title (quart-schema inlines them)."""
    found: dict[str, Any] = {}
    if isinstance(document, dict):
        if "properties" in document and "title" in document:
            found[document["title"]] = document
        for value in document.values():
            found.update(schemas(value))
    elif isinstance(document, list):
        for value in document:
            found.update(schemas(value))
    return found


def fields(body: dict[str, Any]) -> list[str]:
    return [problem["path"] for problem in body["attributes"]["fields"]]


async def test_quart_schema_failures_are_mikros_validation_errors_with_field_paths(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A body or query string failing its model is a 400 ValidationError naming each field."""
    running = await serve(mikros_service, tmp_path, quart_app)
    placed = await post(running, "/orders", {"item": "pen", "quantity": 2})
    assert (placed.status_code, placed.json()) == (201, {"id": 1, "item": "pen", "quantity": 2})
    bad = await post(running, "/orders", {"quantity": 0})
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/json"
    body = bad.json()
    assert (body["code"], body["kind"], body["service_name"]) == (0, "ValidationError", "web")
    assert body["message"].startswith("request validation failed: ")
    assert fields(body) == ["item", "quantity"]
    assert "quantity: Input should be greater than 0" in body["details"]
    assert body["cause"] == body["details"]
    query = await get(running, "/orders?limit=1000")
    assert query.status_code == 400
    assert fields(query.json()) == ["limit"]
    not_json = await post(running, "/orders", [1, 2])
    assert (not_json.status_code, not_json.json()["kind"]) == (400, "ValidationError")


async def test_a_body_with_thousands_of_faults_gets_a_bounded_answer(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """5000 bad items: the answer names the first 20 fields, its message the first 5.

    A field path holds the client's own keys: a 100 kB one is clipped.
    """
    running = await serve(mikros_service, tmp_path, quart_app)
    bad = await post(running, "/batches", {"quantities": ["x"] * 5000})
    assert bad.status_code == 400
    body = bad.json()
    assert fields(body) == [f"quantities.{index}" for index in range(20)]
    assert body["details"].count("quantities.") == 20
    assert body["message"].count("quantities.") == 5
    key = "k" * 100_000
    long = await post(running, "/batches", {"prices": {key: "x"}})
    (problem,) = long.json()["attributes"]["fields"]
    assert problem["path"] == "prices." + "k" * 192 + "\u2026"
    assert len(long.content) < 2048


async def test_fastapi_failures_carry_field_paths(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """FastAPI's 422 carries the same fields: paths in the message, details and attributes."""
    running = await serve(mikros_service, tmp_path, fastapi_app)
    bad = await post(running, "/orders", {"item": "pen", "quantity": "many"})
    assert bad.status_code == 422
    body = bad.json()
    assert body["kind"] == "ValidationError"
    assert fields(body) == ["body.quantity"]
    assert body["details"].startswith("body.quantity: ")
    assert "body.quantity" in body["message"]


async def test_openapi_documents_are_served_and_name_the_models(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """/openapi.json is served by both kinds of app, with the declared models in it."""
    for name, build in (("quart", quart_app), ("fastapi", fastapi_app)):
        running = await serve(mikros_service, tmp_path / name, build)
        document = await get(running, "/openapi.json")
        assert document.status_code == 200, name
        models = schemas(document.json())
        assert {"Order", "Placed"} <= set(models), name
        assert models["Order"]["required"] == ["item", "quantity"], name


async def test_a_mikros_error_raised_by_an_error_handler_is_answered(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An app's own handler (or middleware) raising NotFoundError gives a 404, not a 500."""
    cases = (
        ("starlette", starlette_app, "/guarded"),
        ("starlette", starlette_app, "/missing"),
        ("quart", quart_app, "/missing"),
    )
    for index, (name, build, path) in enumerate(cases):
        running = await serve(mikros_service, tmp_path / str(index), build)
        missing = await get(running, path)
        assert missing.status_code == 404, (name, path)
        assert missing.json() == {
            "code": 0,
            "service_name": "web",
            "message": "order 9 does not exist",
            "kind": "NotFoundError",
        }, (name, path)
