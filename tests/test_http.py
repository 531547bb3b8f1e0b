"""The HTTP kind, in-process over real sockets: probes through the lifecycle.

Also the shared support of every ``test_http_*`` module: the test app and
container, service.toml writing, and small client helpers. Every service
here starts through ``mikros_service`` (real lifecycle, ephemeral ports on
127.0.0.1) and every wait is bounded with ``trio.fail_after``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from dependency_injector import providers
from quart import request
from quart_trio import QuartTrio

from mikros_trio import (
    ConditionError,
    NotFoundError,
    PermissionDeniedError,
    Service,
    ServiceContainer,
    ValidationError,
)
from mikros_trio.testing import RunningService, ServiceStarter

#: No single wait in these tests may take longer than this (seconds).
BOUND = 5.0

#: The real command-line client the tests drive for h2c, TLS and HTTP/2 drains.
CURL = "/usr/bin/curl"

#: The error kinds a handler may raise by name, with the status each must map to.
SERVICE_ERRORS = {
    "validation": (ValidationError, 400),
    "permission": (PermissionDeniedError, 403),
    "not-found": (NotFoundError, 404),
    "condition": (ConditionError, 412),
}


def _toml_value(value: Any) -> str:
    return json.dumps(str(value) if isinstance(value, Path) else value)


def write_toml(
    tmp_path: Path,
    *,
    http: Mapping[str, Any] | None = None,
    lifecycle: Mapping[str, Any] | None = None,
) -> Path:
    """A service.toml for an http service on 127.0.0.1, written into ``tmp_path``."""
    timeouts = {"start_timeout": 5.0, "drain_timeout": 3.0, "shutdown_timeout": 8.0}
    timeouts.update(lifecycle or {})
    lines = ['name = "web"', 'types = ["http"]', 'version = "1.0.0"', "", "[runtime.http]"]
    lines += [
        f"{key} = {_toml_value(value)}"
        for key, value in {"host": "127.0.0.1", **(http or {})}.items()
    ]
    lines += ["", "[lifecycle]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in timeouts.items()]
    path = tmp_path / "service.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Store:
    """The container component handlers reach: a tiny key-value store."""

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self.items = dict(items or {"greeting": "hello"})

    def get(self, key: str) -> str:
        try:
            return self.items[key]
        except KeyError:
            raise NotFoundError(f"no item {key!r}") from None


def create_app(store: Store) -> QuartTrio:
    """The test app: one route per behaviour the tests pin.

    ``app.entered`` is set whenever a slow handler starts, so a test knows
    its request is in flight; ``app.finished`` counts slow handlers that ran
    to their end.
    """
    app = QuartTrio(__name__)
    app.entered = trio.Event()  # type: ignore[attr-defined]
    app.finished = 0  # type: ignore[attr-defined]

    @app.get("/hello")
    async def hello() -> str:
        return "hello"

    @app.get("/slow")
    async def slow() -> dict[str, Any]:
        seconds = float(request.args.get("seconds", "0.5"))
        app.entered.set()  # type: ignore[attr-defined]
        await trio.sleep(seconds)
        app.finished += 1  # type: ignore[attr-defined]
        return {"slept": seconds, "client_port": request.scope["client"][1]}

    @app.get("/stream")
    async def stream() -> tuple[AsyncIterator[bytes], int]:
        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * 65536

        return endless(), 200

    @app.get("/chunks")
    async def chunks() -> tuple[AsyncIterator[bytes], int]:
        count = int(request.args.get("count", "3"))
        delay = float(request.args.get("delay", "0.1"))

        async def paced() -> AsyncIterator[bytes]:
            app.entered.set()  # type: ignore[attr-defined]
            for index in range(count):
                yield f"chunk {index},".encode()
                await trio.sleep(delay)

        return paced(), 200

    @app.get("/boom")
    async def boom() -> str:
        raise RuntimeError("the handler broke")

    @app.get("/raise/<kind>")
    async def raise_kind(kind: str) -> str:
        cls, _ = SERVICE_ERRORS[kind]
        raise cls(f"raised {kind}", code=7)

    @app.post("/echo")
    async def echo() -> dict[str, Any]:
        data = await request.get_data()
        return {"length": len(data)}

    @app.get("/items/<key>")
    async def item(key: str) -> dict[str, Any]:
        return {"key": key, "value": store.get(key)}

    return app


class Container(ServiceContainer):
    store = providers.Singleton(Store)
    app = providers.Singleton(create_app, store=store)


def port(running: RunningService, name: str = "http") -> int:
    """The port ``name`` listens on."""
    return running.ports[name]


def url(running: RunningService, path: str, name: str = "http", scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{port(running, name)}{path}"


async def get(running: RunningService, path: str, name: str = "http") -> httpx.Response:
    """One GET on a fresh connection (no pooling), bounded."""
    with trio.fail_after(BOUND):
        async with client_for(running, name=name) as client:
            return await client.get(path)


def client_for(running: RunningService, name: str = "http", **options: Any) -> httpx.AsyncClient:
    """An httpx client for one of the service's listeners, deaf to proxy settings."""
    return httpx.AsyncClient(base_url=url(running, "", name), trust_env=False, **options)


async def start(mikros_service: ServiceStarter, tmp_path: Path, **options: Any) -> RunningService:
    """Start :class:`Container` with a service.toml from ``options`` (see :func:`write_toml`)."""
    overrides = options.pop("overrides", None)
    container = options.pop("container", Container)
    path = write_toml(tmp_path, **options)
    with trio.fail_after(BOUND):
        return await mikros_service.start(container, path, overrides=overrides)


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost: (ca, cert, key)."""
    authority = trustme.CA()
    server = authority.issue_cert("127.0.0.1", "localhost")
    ca, cert, key = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    authority.cert_pem.write_to_path(str(ca))
    server.cert_chain_pems[0].write_to_path(str(cert))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(cert), append=True)
    server.private_key_pem.write_to_path(str(key))
    return ca, cert, key


async def curl(*args: str) -> tuple[str, str]:
    """Run curl with ``args``, bounded; return (body, "<http version> <status>").

    It must exit 0: an HTTP error status is still a success for curl.
    """
    with trio.fail_after(BOUND):
        done = await trio.run_process(
            [
                CURL,
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "4",
                "-w",
                "\n%{http_version} %{http_code}",
                *args,
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    body, _, summary = done.stdout.decode().rpartition("\n")
    return body, summary


def phase_time(running: RunningService, component: str, phase: str) -> float:
    """Trio time of the first event where ``component`` reached ``phase``."""
    for event in running.events:
        if event.component == component and event.phase == phase:
            return event.time
    raise AssertionError(f"{component} never reached {phase}: {running.events}")


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


class GatedContainer(Container):
    gate = providers.Singleton(Gate)


async def wait_until(running: RunningService | Service, check: Callable[[], bool]) -> None:
    """Return once ``check()`` holds; re-checked on every health change, bounded."""
    health = running.health
    with trio.fail_after(BOUND):
        version = health.version
        while not check():
            version = await health.wait_changed(version)


class StartGate:
    """A processing component whose on_start blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.waiting = trio.Event()
        self.opened = trio.Event()

    async def on_start(self) -> None:
        self.waiting.set()
        await self.opened.wait()


class StartGatedContainer(Container):
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


async def test_admin_port_takes_the_probes(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """With admin_port, probes answer there and are 404 JSON on the main port (the app's space)."""
    running = await start(mikros_service, tmp_path, http={"admin_port": 0})
    assert port(running, "http-admin") != port(running, "http")
    for probe in ("/livez", "/readyz", "/healthz"):
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
