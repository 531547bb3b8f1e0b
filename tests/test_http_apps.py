"""Starlette and FastAPI apps on the HTTP kind: probes, Mikros errors, names, lifespan, limits.

Each test runs against both frameworks (FastAPI is a Starlette app with its
own defaults): a real service started in-process, real httpx clients or raw
sockets, the same behaviours tests/test_http*.py pin for a QuartTrio app.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from dependency_injector import providers
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from helpers import (
    BOUND,
    Store,
    client_for,
    create_app,
    get,
    raw_exchange,
    start_http,
    wait_until,
    write_http_toml,
)
from helpers import http_port as port
from mikros_trio import NotFoundError, PermissionDeniedError, ServiceContainer, ValidationError
from mikros_trio._telemetry import UNMATCHED
from mikros_trio.ext import Call, Observer
from mikros_trio.testing import RunningService, ServiceStarter

ERRORS = {"validation": (ValidationError, 400), "permission": (PermissionDeniedError, 403)}


class Abort(BaseException):
    """Neither Exception nor cancellation: what a handler calling sys.exit() raises, in kind."""


class Events:
    """What a test app records: its lifespan steps, and whether a slow handler is in flight.

    The container copies its providers' arguments: a test reads the app's
    own, ``app.state.events`` (see :func:`events_of`).
    """

    def __init__(self, fail_startup: bool = False) -> None:
        self.steps: list[str] = []
        self.entered = trio.Event()
        self.finished = 0
        self.fail_startup = fail_startup


def lifespan_of(events: Events) -> Callable[[Any], Any]:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        events.steps.append("startup")
        if events.fail_startup:
            raise ConnectionRefusedError("the database is down")
        yield
        events.steps.append("shutdown")

    return lifespan


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def item(request: Request) -> Response:
    key = request.path_params["key"]
    if key != "greeting":
        raise NotFoundError(f"no item {key!r}")
    return JSONResponse({"key": key, "value": "hello"})


async def raise_kind(request: Request) -> Response:
    cls, _ = ERRORS[request.path_params["kind"]]
    raise cls(f"raised {request.path_params['kind']}", code=7)


async def boom(request: Request) -> Response:
    raise RuntimeError("the handler broke")


async def abort(request: Request) -> Response:
    raise Abort("out")


async def refuse(request: Request) -> Response:
    raise HTTPException(403, "token s3cr3t-value refused")


async def echo(request: Request) -> Response:
    return JSONResponse({"length": len(await request.body())})


def slow_route(events: Events) -> Callable[[Request], Any]:
    async def slow(request: Request) -> Response:
        seconds = float(request.query_params.get("seconds", "0.5"))
        events.entered.set()
        await trio.sleep(seconds)
        events.finished += 1
        return JSONResponse({"slept": seconds})

    return slow


def starlette_app(events: Events) -> Starlette:
    """The Starlette test app."""
    routes = [
        Route("/hello", hello),
        Route("/items/{key}", item),
        Route("/raise/{kind}", raise_kind),
        Route("/boom", boom),
        Route("/abort", abort),
        Route("/refuse", refuse),
        Route("/echo", echo, methods=["POST"]),
        Route("/slow", slow_route(events)),
    ]
    app = Starlette(routes=routes, lifespan=lifespan_of(events))
    app.state.events = events
    return app


def fastapi_app(events: Events) -> Any:
    """The same app, written for FastAPI (path parameters typed, body read by FastAPI)."""
    from fastapi import Body, FastAPI

    app = FastAPI(lifespan=lifespan_of(events))
    app.add_api_route("/hello", hello)
    for path, endpoint in [
        ("/items/{key}", item),
        ("/raise/{kind}", raise_kind),
        ("/boom", boom),
        ("/abort", abort),
        ("/refuse", refuse),
        ("/slow", slow_route(events)),
    ]:
        app.add_api_route(path, endpoint)

    @app.post("/echo")
    async def echo_fastapi(data: bytes = Body(media_type="application/octet-stream")) -> Any:
        return {"length": len(data)}

    app.state.events = events

    @app.get("/count/{number}")
    async def count(number: int) -> Any:
        return {"number": number}

    return app


FRAMEWORKS = {"starlette": starlette_app, "fastapi": fastapi_app}


class Names(Observer):
    """Records each finished call's name and status, by target."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, str]] = {}
        self.ended = trio.Event()  # set at each call's end

    def finished(self, call: Call) -> None:
        self.seen[call.target] = (call.name, call.status)
        self.ended.set()
        self.ended = trio.Event()


@pytest.fixture(name="framework", params=sorted(FRAMEWORKS))
def _framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def start(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    framework: str,
    *,
    fail_startup: bool = False,
    tables: str = "",
    **options: Any,
) -> RunningService:
    """Start a service serving ``framework``'s test app, with ``options`` for service.toml.

    ``tables`` is TOML appended to the file (features' tables).
    """

    class Container(ServiceContainer):
        app = providers.Singleton(FRAMEWORKS[framework], Events(fail_startup))

    path = write_http_toml(tmp_path, **options)
    path.write_text(path.read_text() + tables)
    with trio.fail_after(BOUND):
        return await mikros_service.start(Container, path)


def events_of(running: RunningService) -> Events:
    """The :class:`Events` of the running service's app."""
    events: Events = running.container.app().state.events
    return events


async def exchange(running: RunningService, request: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers before closing."""
    received = b""
    with trio.fail_after(BOUND):
        async with await trio.open_tcp_stream("127.0.0.1", port(running)) as stream:
            await stream.send_all(request)
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_probes_answer_before_the_app(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """/livez, /readyz and /healthz answer for the service, whatever the app routes."""
    running = await start(mikros_service, tmp_path, framework)
    for path in ("/livez", "/readyz"):
        response = await get(running, path)
        assert response.status_code == 200, path
    health = await get(running, "/healthz")
    assert health.json()["status"] == "serving"
    assert (await get(running, "/hello")).text == "hello"


async def test_unexpected_exception_is_500_internal_error_logged_once(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    framework: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An Exception or a BaseException (not cancellation) from a handler: 500 JSON, logged once.

    The service goes on serving.
    """
    running = await start(mikros_service, tmp_path, framework)
    with caplog.at_level(logging.ERROR):
        response = await get(running, "/boom")
        after = await get(running, "/hello")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    with caplog.at_level(logging.CRITICAL, logger="mikros_trio.http"):
        aborted = await get(running, "/abort")
    body = response.json()
    assert (response.status_code, response.headers["content-type"]) == (500, "application/json")
    assert (body["kind"], body["message"]) == ("InternalError", "internal error")
    assert (body["details"], body["service_name"]) == ("RuntimeError: the handler broke", "web")
    assert [(r.name, r.exc_info and r.exc_info[0]) for r in errors] == [
        ("mikros_trio.http", RuntimeError)
    ]
    assert after.status_code == 200
    assert (aborted.status_code, aborted.json()["kind"]) == (500, "InternalError")
    assert (await get(running, "/hello")).status_code == 200
    assert running.health.ready


async def test_details_hidden_when_expose_details_is_off(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """With [features.errors] expose_details = false the 500 body carries no exception text."""
    hidden = "\n[features.errors]\nexpose_details = false\n"
    running = await start(mikros_service, tmp_path, framework, tables=hidden)
    response = await get(running, "/boom")
    assert response.status_code == 500
    assert "details" not in response.json()
    assert "broke" not in response.text


@pytest.mark.parametrize("kind", sorted(ERRORS))
async def test_service_errors_map_to_their_status(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str, kind: str
) -> None:
    """Each ServiceError answers its HTTP status with kind, message, code and service."""
    running = await start(mikros_service, tmp_path, framework)
    cls, status = ERRORS[kind]
    response = await get(running, f"/raise/{kind}")
    assert response.status_code == status
    assert response.json() == {**cls(f"raised {kind}", code=7).to_wire(), "service_name": "web"}
    missing = await get(running, "/items/nope")
    assert missing.status_code == 404
    assert missing.json()["kind"] == "NotFoundError"


async def test_http_errors_unknown_routes_and_wrong_methods_answer_json(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """HTTPException keeps its status with a Mikros body; 404 and 405 are Mikros JSON too."""
    running = await start(mikros_service, tmp_path, framework)
    refused = await get(running, "/refuse")
    assert refused.status_code == 403
    assert refused.json() == {
        "code": 0,
        "kind": "PermissionError",
        "message": "token s3cr3t-value refused",
    }
    missing = await get(running, "/no/such/route")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json()["kind"] == "NotFoundError"
    with trio.fail_after(BOUND):
        async with client_for(running) as client:
            wrong = await client.delete("/hello")
    assert wrong.status_code == 405
    assert wrong.json()["kind"] == "ValidationError"
    assert "GET" in wrong.headers["allow"]


async def test_fastapi_validation_errors_are_mikros_json(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """FastAPI's request validation failure stays 422, with a Mikros ValidationError body."""
    running = await start(mikros_service, tmp_path, "fastapi")
    good = await get(running, "/count/3")
    assert good.json() == {"number": 3}
    bad = await get(running, "/count/three")
    assert bad.status_code == 422
    body = bad.json()
    assert body["kind"] == "ValidationError"
    assert body["message"].startswith("request validation failed: path.number")


async def test_calls_are_named_by_route_template(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """Telemetry names a call by its route template (/items/{key}); no route is UNMATCHED."""
    running = await start(mikros_service, tmp_path, framework)
    names = Names()
    running.service.telemetry.add_observer(names)
    for path in ("/items/greeting", "/items/nope", "/boom", "/no/such/route", "/raise/validation"):
        await get(running, path)
    assert names.seen == {
        "/items/greeting": ("/items/{key}", "200"),
        "/items/nope": ("/items/{key}", "404"),
        "/boom": ("/boom", "500"),
        "/no/such/route": (UNMATCHED, "404"),
        "/raise/validation": ("/raise/{kind}", "400"),
    }


async def test_route_names_reach_the_metrics(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """The metrics feature labels requests by route template, not by path."""
    metrics = "\n[features.metrics]\nenabled = true\n"
    running = await start(mikros_service, tmp_path, framework, tables=metrics)
    for key in ("a", "b", "c"):
        await get(running, f"/items/{key}")
    exposition = (await get(running, "/metrics")).text
    assert 'route="/items/{key}"' in exposition
    assert "/items/a" not in exposition


async def test_lifespan_runs_startup_before_serving_and_shutdown_after_the_drain(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """The app's lifespan starts before the first request and ends after in-flight work."""
    running = await start(mikros_service, tmp_path, framework)
    events = events_of(running)
    assert events.steps == ["startup"]
    slow: list[httpx.Response] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            slow.append(await get(running, "/slow?seconds=0.3"))

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await events.entered.wait()
        running.service.stop("test")
        await wait_until(running, lambda: running.health.components["http"].value == "draining")
        assert events.steps == ["startup"], "shutdown ran before the drain"
    assert slow[0].status_code == 200
    assert slow[0].headers["connection"] == "close"
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    assert events.steps == ["startup", "shutdown"]
    assert events.finished == 1


async def test_failing_startup_fails_the_start_with_the_apps_exception(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """A lifespan that raises fails the service's start; the app's own exception is the cause."""
    running = await start(mikros_service, tmp_path, framework, fail_startup=True)
    events = events_of(running)
    with trio.fail_after(BOUND):
        assert await running.wait() == 1
    failure = running.service.supervisor.failures[0]
    assert str(failure) == "http: failed to start: ConnectionRefusedError: the database is down"
    assert isinstance(failure.__cause__, ConnectionRefusedError)
    assert events.steps == ["startup"]


async def _ignores_lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app that returns at once on lifespan, answering nothing (ASGI allows it)."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"bare"})


class IgnoresLifespanContainer(ServiceContainer):
    app = providers.Object(_ignores_lifespan)


async def test_app_returning_from_lifespan_without_answering_starts(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An app whose lifespan call returns without a word is served (it hung the start before)."""
    running = await start_http(mikros_service, tmp_path, container=IgnoresLifespanContainer)
    response = await get(running, "/anything")
    assert (response.status_code, response.text) == (200, "bare")
    running.service.stop("test")
    with trio.fail_after(BOUND):
        assert await running.wait() == 0


async def test_declared_and_chunked_bodies_over_the_limit_are_413(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """Over max_body_size, declared or chunked, is 413 Mikros JSON and the connection closes."""
    running = await start(mikros_service, tmp_path, framework, http={"max_body_size": 1024})

    async def chunks(count: int) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield b"x" * 512

    async with client_for(running) as client:
        with trio.fail_after(BOUND):
            at_limit = await client.post("/echo", content=b"x" * 1024)
            declared = await client.post("/echo", content=b"x" * 2000)
            under = await client.post("/echo", content=chunks(2))
            over = await client.post("/echo", content=chunks(4))
    assert (at_limit.status_code, at_limit.json()) == (200, {"length": 1024})
    assert declared.status_code == 413
    assert (under.status_code, under.json()) == (200, {"length": 1024})
    assert over.request.headers["transfer-encoding"] == "chunked"
    assert over.status_code == 413
    assert over.headers["connection"] == "close"
    assert over.json() == {
        "code": 0,
        "kind": "ValidationError",
        "message": "request body over 1024 bytes",
    }


async def test_a_body_trickling_past_body_timeout_is_408(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """A body whose bytes keep coming (each within read_timeout) is cut at body_timeout: 408."""
    running = await start(
        mikros_service, tmp_path, framework, http={"body_timeout": 0.5, "read_timeout": 5}
    )
    with trio.fail_after(BOUND):
        async with await trio.open_tcp_stream("127.0.0.1", port(running)) as stream:
            await stream.send_all(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n"
            )
            received = b""
            for _ in range(40):  # 4 s of trickle at most: the deadline is 0.5 s
                with trio.move_on_after(0.1):
                    received += await stream.receive_some(65536)
                if received:
                    break
                await stream.send_all(b"x")
            while chunk := await stream.receive_some(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 408"), received
    assert b"connection: close" in received
    assert b'"kind":"ValidationError"' in received


async def test_connection_closes_after_its_in_flight_response_during_drain(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """A keep-alive request in flight when the drain starts is answered with Connection: close."""
    running = await start(mikros_service, tmp_path, framework)
    events = events_of(running)
    request = b"GET /slow?seconds=0.3 HTTP/1.1\r\nHost: t\r\n\r\n"
    async with trio.open_nursery() as nursery:
        answers: list[bytes] = []

        async def send() -> None:
            answers.append(await exchange(running, request))

        nursery.start_soon(send)
        with trio.fail_after(BOUND):
            await events.entered.wait()
        running.service.stop("test")
    assert answers[0].startswith(b"HTTP/1.1 200")
    assert b"connection: close" in answers[0].lower()


async def test_requests_cut_at_the_drain_deadline_get_503(
    mikros_service: ServiceStarter, tmp_path: Path, framework: str
) -> None:
    """A handler still running at the drain deadline is cut: its client gets 503 and close."""
    running = await start(
        mikros_service,
        tmp_path,
        framework,
        lifecycle={"drain_timeout": 0.5, "shutdown_timeout": 3.0},
    )
    events = events_of(running)
    names = Names()
    running.service.telemetry.add_observer(names)
    async with trio.open_nursery() as nursery:
        answers: list[bytes] = []

        async def send() -> None:
            answers.append(
                await exchange(running, b"GET /slow?seconds=30 HTTP/1.1\r\nHost: t\r\n\r\n")
            )

        nursery.start_soon(send)
        with trio.fail_after(BOUND):
            await events.entered.wait()
        running.service.stop("test")
    assert answers[0].startswith(b"HTTP/1.1 503"), answers
    assert b"connection: close" in answers[0].lower()
    assert names.seen["/slow"][1] == "503"
    assert events.finished == 0


# -- QuartTrio: the handler runs in the request's task, and behaves as before ----------


async def test_quart_handler_is_cancelled_when_its_client_disconnects(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A QuartTrio handler still waiting when its client leaves is cancelled, not left running."""
    running = await start_http(mikros_service, tmp_path)
    app = running.container.app()
    names = Names()
    running.service.telemetry.add_observer(names)
    with trio.fail_after(BOUND):
        async with await trio.open_tcp_stream("127.0.0.1", port(running)) as stream:
            await stream.send_all(b"GET /slow?seconds=30 HTTP/1.1\r\nHost: t\r\n\r\n")
            await app.entered.wait()
        while "/slow" not in names.seen:  # the call ends only once its handler has
            await names.ended.wait()
    assert app.finished == 0
    assert (await get(running, "/hello")).status_code == 200


async def test_quart_response_timeout_still_cuts_a_streamed_response(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """RESPONSE_TIMEOUT is skipped only for a body in memory: a slow stream is still cut."""
    running = await start_http(mikros_service, tmp_path)
    running.container.app().config["RESPONSE_TIMEOUT"] = 0.3
    raw, took = await raw_exchange(
        port(running), b"GET /chunks?count=3&delay=5 HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"chunk 0," in raw
    assert b"chunk 1," not in raw
    assert took < 3.0
    # A body in memory is answered whole, the short timeout notwithstanding.
    assert (await get(running, "/hello")).text == "hello"


async def test_quart_app_with_its_own_connection_class_keeps_it(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An app built with its own asgi_http_class is served through it, unchanged."""
    from quart_trio.asgi import TrioASGIHTTPConnection

    class Counting(TrioASGIHTTPConnection):
        calls = 0

        async def __call__(self, receive: Any, send: Any) -> None:
            Counting.calls += 1
            await super().__call__(receive, send)

    def counting_app(store: Store) -> Any:
        app = create_app(store)
        app.asgi_http_class = Counting
        return app

    class Container(ServiceContainer):
        store = providers.Singleton(Store)
        app = providers.Singleton(counting_app, store=store)

    running = await start_http(mikros_service, tmp_path, container=Container)
    assert running.container.app().asgi_http_class is Counting
    assert (await get(running, "/hello")).text == "hello"
    assert Counting.calls == 1


# -- any other ASGI 3 app: served as is, with the kind's last-resort answers -----------


def raw_asgi_app() -> Any:
    """A bare ASGI callable: /boom raises, /abort raises a BaseException, /echo reads the body."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/boom":
            raise RuntimeError("the raw app broke")
        if scope["path"] == "/abort":
            raise Abort("out")
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = b'{"length":%d}' % size
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_any_asgi_app_gets_mikros_answers_for_what_escapes_it(
    mikros_service: ServiceStarter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bare ASGI app: its errors are 500 Mikros JSON, a chunked body over the limit 413."""

    class Container(ServiceContainer):
        app = providers.Object(raw_asgi_app())

    path = write_http_toml(tmp_path, http={"max_body_size": 1024})
    with trio.fail_after(BOUND):
        running = await mikros_service.start(Container, path)

    async def chunks(count: int) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield b"x" * 512

    with caplog.at_level(logging.CRITICAL, logger="mikros_trio.http"):
        boom = await get(running, "/boom")
        abort = await get(running, "/abort")
    async with client_for(running) as client:
        with trio.fail_after(BOUND):
            under = await client.post("/echo", content=chunks(2))
            over = await client.post("/echo", content=chunks(4))
    assert boom.status_code == 500
    assert boom.json()["details"] == "RuntimeError: the raw app broke"
    assert (abort.status_code, abort.json()["kind"]) == (500, "InternalError")
    assert under.json() == {"length": 1024}
    assert over.status_code == 413
    assert over.headers["connection"] == "close"
    assert over.json()["message"] == "request body over 1024 bytes"
    assert running.health.ready


async def test_fastapi_startup_and_shutdown_handlers_run_around_serving(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """FastAPI's on_startup and on_shutdown handlers run as its lifespan: before and after."""
    from fastapi import FastAPI

    steps: list[str] = []

    async def opened() -> None:
        steps.append("startup")

    async def closed() -> None:
        steps.append("shutdown")

    def handlers_app() -> Any:
        app = FastAPI(on_startup=[opened], on_shutdown=[closed])
        app.add_api_route("/hello", hello)
        return app

    class Container(ServiceContainer):
        app = providers.Singleton(handlers_app)

    with trio.fail_after(BOUND):
        running = await mikros_service.start(Container, write_http_toml(tmp_path))
    assert steps == ["startup"]
    assert (await get(running, "/hello")).text == "hello"
    with trio.fail_after(BOUND):
        assert await running.stop() == 0
    assert steps == ["startup", "shutdown"]
