"""The HTTP kind, in-process over real sockets: probes through the lifecycle.

The test app and container, service.toml writing and the client helpers
every ``test_http_*`` module shares are in ``helpers.py``. Every service
here starts through ``mikros_service`` (real lifecycle, ephemeral ports on
127.0.0.1) and every wait is bounded with ``trio.fail_after``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from dependency_injector import providers

from helpers import (
    BOUND,
    HttpContainer,
    client_for,
    get,
    phase_time,
    wait_until,
)
from helpers import http_port as port
from helpers import start_http as start
from helpers import write_http_toml as write_toml
from mikros_trio import Service, ServiceContainer
from mikros_trio.testing import ServiceStarter

# -- probes ------------------------------------------------------------------


async def test_probes_while_serving(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """While serving, /livez and /readyz answer 200 and /healthz lists each component's state."""
    running = await start(mikros_service, tmp_path)
    live, ready, health = [await get(running, p) for p in ("/livez", "/readyz", "/healthz")]
    assert (live.status_code, live.json()) == (200, {"status": "live"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert health.status_code == 200
    assert health.json() == {
        "status": "serving",
        "components": {"logger": "serving", "http": "serving"},
    }


class Gate:
    """A processing component whose warmup blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.waiting = trio.Event()
        self.opened = trio.Event()

    async def warmup(self) -> None:
        self.waiting.set()
        await self.opened.wait()


class GatedContainer(HttpContainer):
    gate = providers.Singleton(Gate)


class StartGate:
    """A processing component whose on_start blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.waiting = trio.Event()
        self.opened = trio.Event()

    async def on_start(self) -> None:
        self.waiting.set()
        await self.opened.wait()


class StartGatedContainer(HttpContainer):
    gate = providers.Singleton(StartGate)


@asynccontextmanager
async def unready_service(container: type[ServiceContainer], path: Path) -> AsyncIterator[Service]:
    """Run a service without waiting for it to be ready (``mikros_service.start`` waits).

    Used to probe a service that is still starting or warming up; it is
    stopped on the way out.
    """
    service = Service(container, path, environ={**os.environ, "MIKROS_HTTP_PORT": "0"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        try:
            yield service
        finally:
            service.stop("test over")


def _base(service: Service, name: str) -> str:
    return f"http://127.0.0.1:{service.supervisor.addresses[name][1]}"


@pytest.mark.parametrize("probes", ["http", "http-admin"])
async def test_readyz_is_503_during_warmup(tmp_path: Path, probes: str) -> None:
    """During warmup the server already listens: /readyz 503 'starting', /livez 200, then 200."""
    http = {"admin_port": 0} if probes == "http-admin" else {}
    with trio.fail_after(BOUND):
        async with unready_service(GatedContainer, write_toml(tmp_path, http=http)) as service:
            gate = service.container.gate()
            await gate.waiting.wait()
            async with httpx.AsyncClient(
                base_url=_base(service, probes), trust_env=False
            ) as client:
                ready = await client.get("/readyz")
                assert (ready.status_code, ready.json()) == (503, {"status": "starting"})
                assert (await client.get("/livez")).status_code == 200
                health = (await client.get("/healthz")).json()
                assert health["status"] == "starting"
                assert health["components"]["http"] == "serving"
                assert health["components"]["gate"] == "serving"
                # The app itself is already reachable on the main port.
                hello = await client.get(_base(service, "http") + "/hello")
                assert hello.status_code == 200
                gate.opened.set()
                await wait_until(service, lambda: service.health.ready)
                ready = await client.get("/readyz")
                assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_admin_probes_answer_while_components_start(tmp_path: Path) -> None:
    """The admin listener is up before the main server: /readyz 503 while a component starts."""
    path = write_toml(tmp_path, http={"admin_port": 0})
    with trio.fail_after(BOUND):
        async with unready_service(StartGatedContainer, path) as service:
            gate = service.container.gate()
            await gate.waiting.wait()
            await wait_until(service, lambda: "http-admin" in service.supervisor.addresses)
            assert "http" not in service.supervisor.addresses  # not started yet
            async with httpx.AsyncClient(
                base_url=_base(service, "http-admin"), trust_env=False
            ) as client:
                ready = await client.get("/readyz")
                assert (ready.status_code, ready.json()) == (503, {"status": "starting"})
                assert (await client.get("/livez")).status_code == 200
                health = (await client.get("/healthz")).json()
                assert health == {
                    "status": "starting",
                    "components": {
                        "logger": "serving",
                        "http": "pending",
                        "http-admin": "serving",
                        "gate": "starting",
                    },
                }
                gate.opened.set()
                await wait_until(service, lambda: service.health.ready)
                assert (await client.get("/readyz")).status_code == 200


async def test_readiness_off_during_readiness_delay(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """From the moment shutdown begins /readyz is 503 while /livez and the app still answer."""
    running = await start(mikros_service, tmp_path, lifecycle={"readiness_delay": 1.0})
    async with client_for(running) as client:
        assert (await client.get("/readyz")).status_code == 200
        running.service.stop("test")
        shutdown = phase_time(running, "service", "shutdown")
        with trio.fail_after(BOUND):
            ready = await client.get("/readyz")
            live = await client.get("/livez")
            health = await client.get("/healthz")
            hello = await client.get("/hello")
        assert trio.current_time() < shutdown + 1.0, "checks must fall inside the delay"
        assert running.phases("http") == ["starting", "started"]
    assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
    assert (live.status_code, live.json()) == (200, {"status": "live"})
    assert health.json() == {
        "status": "draining",
        "components": {"logger": "serving", "http": "serving"},
    }
    assert hello.status_code == 200
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    assert phase_time(running, "http", "stopping") >= shutdown + 1.0


async def test_health_answers_as_mikros_services_do(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """GET /health (Go's and Rust's probe): 200 with an empty body while ready."""
    running = await start(mikros_service, tmp_path)
    async with client_for(running) as client:
        health = await client.get("/health")
        head = await client.head("/health")
    assert (health.status_code, health.content) == (200, b"")
    assert health.headers["content-type"] == "text/plain; charset=utf-8"
    assert head.status_code == 200


async def test_health_is_503_once_shutdown_begins(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """/health reads the same state as /readyz: 503 'draining' during the readiness delay."""
    running = await start(mikros_service, tmp_path, lifecycle={"readiness_delay": 1.0})
    async with client_for(running) as client:
        running.service.stop("test")
        with trio.fail_after(BOUND):
            health = await client.get("/health")
    assert (health.status_code, health.text) == (503, "draining")
    with trio.fail_after(BOUND):
        assert await running.wait() == 0


async def test_admin_port_takes_the_probes(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """With admin_port, probes answer there and are 404 JSON on the main port (the app's space)."""
    running = await start(mikros_service, tmp_path, http={"admin_port": 0})
    assert port(running, "http-admin") != port(running, "http")
    for probe in ("/livez", "/readyz", "/healthz", "/health"):
        assert (await get(running, probe, "http-admin")).status_code == 200
        main = await get(running, probe)
        assert main.status_code == 404
        assert main.json()["kind"] == "NotFoundError"
    health = (await get(running, "/healthz", "http-admin")).json()
    assert health == {
        "status": "serving",
        "components": {"logger": "serving", "http": "serving", "http-admin": "serving"},
    }
    # The admin listener serves probes only.
    other = await get(running, "/hello", "http-admin")
    assert (other.status_code, other.json()["kind"]) == (404, "NotFoundError")
    assert (await get(running, "/hello")).status_code == 200


async def test_admin_port_stays_live_while_main_drains(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """While the main server drains an in-flight request, the admin port still answers /livez."""
    running = await start(mikros_service, tmp_path, http={"admin_port": 0})
    app = running.container.app()
    async with trio.open_nursery() as nursery:
        slow: list[httpx.Response] = []

        async def in_flight() -> None:
            slow.append(await get(running, "/slow?seconds=1.0"))

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await app.entered.wait()
        running.service.stop("test")
        await wait_until(running, lambda: running.health.components["http"].value == "draining")
        live = await get(running, "/livez", "http-admin")
        ready = await get(running, "/readyz", "http-admin")
        health = await get(running, "/healthz", "http-admin")
        assert running.phases("http")[-1] == "stopping", "the main server is still draining"
    assert (live.status_code, ready.status_code) == (200, 503)
    assert health.json()["components"] == {
        "logger": "serving",
        "http": "draining",
        "http-admin": "serving",
    }
    assert slow[0].status_code == 200
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    # The admin listener stops only after the main server has finished.
    assert phase_time(running, "http-admin", "stopping") >= phase_time(running, "http", "stopped")
