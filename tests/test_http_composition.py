"""The HTTP kind with the container: components, @inject, blueprints, middleware, config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from dependency_injector import providers
from dependency_injector.wiring import Provide, inject
from quart import Blueprint
from quart_trio import QuartTrio

from helpers import BOUND, Store, client_for, create_app, get
from helpers import start_http as start
from helpers import write_http_toml as write_toml
from mikros_trio import ConfigError, Service, ServiceContainer, ValidationError
from mikros_trio.testing import ServiceStarter


@inject
async def wired_item(key: str, store: Store = Provide["store"]) -> dict[str, Any]:
    """A view that gets the store from the container through dependency-injector wiring."""
    await trio.lowlevel.checkpoint()  # a real checkpoint: the injected call runs under Trio
    return {"key": key, "value": store.get(key), "via": "inject"}


extra = Blueprint("extra", __name__, url_prefix="/extra")


@extra.get("/ping")
async def ping() -> dict[str, str]:
    return {"pong": "extra"}


@extra.get("/invalid")
async def invalid() -> dict[str, str]:
    raise ValidationError("bad input from a blueprint")


class Stamp:
    """A plain ASGI middleware: stamps every HTTP response with a header."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lifespans = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.lifespans += 1
            return await self.app(scope, receive, send)

        async def stamped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"x-stamp", b"1")]}
            await send(message)

        return await self.app(scope, receive, stamped)


def create_composed_app(store: Store) -> QuartTrio:
    """The test app plus a blueprint, an ASGI middleware and an @inject view."""
    app = create_app(store)
    app.register_blueprint(extra)
    app.add_url_rule("/wired/<key>", view_func=wired_item)
    app.asgi_app = Stamp(app.asgi_app)  # type: ignore[method-assign]
    app.serving = []  # type: ignore[attr-defined]

    @app.before_serving
    async def startup() -> None:
        app.serving.append("startup")  # type: ignore[attr-defined]

    @app.after_serving
    async def shutdown() -> None:
        app.serving.append("shutdown")  # type: ignore[attr-defined]

    return app


class ComposedContainer(ServiceContainer):
    store = providers.Singleton(Store)
    app = providers.Singleton(create_composed_app, store=store)


async def test_handler_reaches_the_component_the_factory_received(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """The app factory gets the container's store; its handlers read that very object."""
    running = await start(mikros_service, tmp_path, container=ComposedContainer)
    running.container.store().items["added"] = "later"
    response = await get(running, "/items/added")
    assert response.json() == {"key": "added", "value": "later"}


async def test_inject_provide_works_under_trio(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """@inject with Provide["store"], once container.wire() ran, gives a Trio handler the store."""
    running = await start(mikros_service, tmp_path, container=ComposedContainer)
    running.container.wire(modules=[sys.modules[__name__]])
    try:
        response = await get(running, "/wired/greeting")
    finally:
        running.container.unwire()
    assert response.status_code == 200
    assert response.json() == {"key": "greeting", "value": "hello", "via": "inject"}


async def test_blueprint_and_middleware(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """Blueprint routes and errors work, an ASGI middleware wraps the app; probes bypass it."""
    running = await start(mikros_service, tmp_path, container=ComposedContainer)
    ping_, invalid_, hello, ready = [
        await get(running, p) for p in ("/extra/ping", "/extra/invalid", "/hello", "/readyz")
    ]
    assert (ping_.status_code, ping_.json()) == (200, {"pong": "extra"})
    assert invalid_.status_code == 400
    assert invalid_.json()["message"] == "bad input from a blueprint"
    assert ping_.headers["x-stamp"] == "1"
    assert invalid_.headers["x-stamp"] == "1"
    assert hello.headers["x-stamp"] == "1"
    # Probes are answered in front of the app, middleware included.
    assert ready.status_code == 200
    assert "x-stamp" not in ready.headers
    # The middleware also saw the app's lifespan (startup), run by the HTTP kind.
    assert running.container.app().asgi_app.lifespans == 1


async def test_app_lifespan_hooks_run_inside_the_component(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Quart's before_serving runs before the first request, after_serving once it has drained."""
    running = await start(mikros_service, tmp_path, container=ComposedContainer)
    app = running.container.app()
    assert app.serving == ["startup"]
    assert (await get(running, "/hello")).status_code == 200
    with trio.fail_after(BOUND):
        assert await running.stop() == 0
    assert app.serving == ["startup", "shutdown"]


class FakeStore(Store):
    def __init__(self) -> None:
        super().__init__({"greeting": "from the fake"})


async def test_overridden_store_is_what_handlers_see(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """overrides={"store": fake} reaches both the factory-injected and the @inject handlers."""
    fake = FakeStore()
    running = await start(
        mikros_service, tmp_path, container=ComposedContainer, overrides={"store": fake}
    )
    assert running.container.store() is fake
    running.container.wire(modules=[sys.modules[__name__]])
    try:
        async with client_for(running) as client:
            with trio.fail_after(BOUND):
                direct = await client.get("/items/greeting")
                wired = await client.get("/wired/greeting")
    finally:
        running.container.unwire()
    assert direct.json()["value"] == "from the fake"
    assert wired.json()["value"] == "from the fake"


# -- configuration -------------------------------------------------------------


class NoApp(ServiceContainer):
    store = providers.Singleton(Store)


def test_missing_app_provider_is_a_config_error(tmp_path: Path) -> None:
    """Without the provider [runtime.http] app names, the service is a ConfigError at that key."""
    with pytest.raises(ConfigError) as caught:
        Service(NoApp, write_toml(tmp_path)).build()
    [issue] = caught.value.issues
    assert issue.path == "runtime.http.app"
    assert issue.source.endswith("service.toml")
    assert "'app'" in issue.message
    assert "NoApp" in issue.message


def test_app_provider_name_comes_from_runtime_http(tmp_path: Path) -> None:
    """[runtime.http] app = "web" picks that provider, and a missing one is named in the error."""

    class Named(ServiceContainer):
        store = providers.Singleton(Store)
        web = providers.Singleton(create_app, store=store)

    path = write_toml(tmp_path, http={"app": "web"})
    assert [c.name for c in Service(Named, path).supervisor.components] == ["logger", "http"]
    with pytest.raises(ConfigError) as caught:
        Service(NoApp, path).build()
    [issue] = caught.value.issues
    assert (issue.path, "'web'" in issue.message) == ("runtime.http.app", True)


@pytest.mark.parametrize("only", ["certfile", "keyfile"])
def test_half_tls_config_is_a_config_error(tmp_path: Path, only: str) -> None:
    """certfile without keyfile (or the reverse) is a ConfigError at runtime.http."""
    pem = tmp_path / "x.pem"
    pem.write_text("not used")
    with pytest.raises(ConfigError) as caught:
        Service(ComposedContainer, write_toml(tmp_path, http={only: pem})).build()
    [issue] = caught.value.issues
    assert issue.path == "runtime.http"
    assert "certfile and keyfile go together" in issue.message


async def test_config_errors_surface_from_the_harness(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """mikros_service.start raises the ConfigError itself; nothing starts."""
    with pytest.raises(ConfigError, match=r"runtime\.http\.app"):
        await mikros_service.start(NoApp, write_toml(tmp_path))
