"""dependency-injector's ``providers.Resource`` as lifecycle components, under Trio."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from dependency_injector import providers, resources

from helpers import Spawn, client_for, start_http, write_worker_toml
from mikros_trio import ConfigError, Lifetime, Service, ServiceContainer
from mikros_trio.testing import ServiceStarter


@pytest.fixture(name="config")
def _config(tmp_path: Path) -> Path:
    return write_worker_toml(tmp_path)


#: What every test's resources and components did, in order (reset per test).
journal: list[str] = []


@pytest.fixture(autouse=True)
def _fresh_journal() -> Iterator[None]:
    journal.clear()
    yield
    journal.clear()


class Pool:
    """What a resource gives: records what uses it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.closed = False


# -- every initialiser form dependency-injector accepts ---------------------------------


async def agen_pool(label: str) -> AsyncIterator[Pool]:
    await trio.sleep(0.1)  # a real checkpoint: opening is async work
    journal.append("open")
    pool = Pool(label)
    try:
        yield pool
    finally:
        await trio.sleep(0.1)
        pool.closed = True
        journal.append("close")


def gen_pool(label: str) -> Iterator[Pool]:
    journal.append("open")
    pool = Pool(label)
    yield pool
    pool.closed = True
    journal.append("close")


class AsyncManager:
    def __init__(self, label: str) -> None:
        self.pool = Pool(label)

    async def __aenter__(self) -> Pool:
        await trio.sleep(0.1)
        journal.append("open")
        return self.pool

    async def __aexit__(self, *exc: object) -> None:
        await trio.sleep(0.1)
        self.pool.closed = True
        journal.append("close")


class SyncManager:
    def __init__(self, label: str) -> None:
        self.pool = Pool(label)

    def __enter__(self) -> Pool:
        journal.append("open")
        return self.pool

    def __exit__(self, *exc: object) -> None:
        self.pool.closed = True
        journal.append("close")


class AsyncPoolResource(resources.AsyncResource):  # type: ignore[misc]
    async def init(self, label: str) -> Pool:
        await trio.sleep(0.1)
        journal.append("open")
        return Pool(label)

    async def shutdown(self, pool: Pool) -> None:
        await trio.sleep(0.1)
        pool.closed = True
        journal.append("close")


class PoolResource(resources.Resource):  # type: ignore[misc]
    def init(self, label: str) -> Pool:
        journal.append("open")
        return Pool(label)

    def shutdown(self, pool: Pool) -> None:
        pool.closed = True
        journal.append("close")


async def coroutine_pool(label: str) -> Pool:
    await trio.sleep(0.1)
    journal.append("open")
    return Pool(label)


def function_pool(label: str) -> Pool:
    journal.append("open")
    return Pool(label)


class Repo:
    """A user of the resource, with hooks: it must see the live value."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def on_start(self) -> None:
        assert isinstance(self.pool, Pool), self.pool
        assert not self.pool.closed
        journal.append(f"repo on_start with {self.pool.label}")

    async def on_shutdown(self) -> None:
        assert not self.pool.closed
        journal.append("repo on_shutdown")


class Loop:
    def __init__(self, repo: Repo, pool: Pool) -> None:
        self.repo = repo
        self.pool = pool

    async def run(self, lifetime: Lifetime) -> None:
        assert self.pool is self.repo.pool  # one value, however it is reached
        journal.append("worker runs")
        await lifetime.wait_stopping()
        journal.append("worker drained")


def container_for(init: Any) -> type[ServiceContainer]:
    class Container(ServiceContainer):
        pool = providers.Resource(init, label=ServiceContainer.config.name)
        repo = providers.Singleton(Repo, pool=pool)
        worker = providers.Factory(Loop, repo=repo, pool=pool)

    return Container


FORMS = {
    "async generator": (agen_pool, True),
    "generator": (gen_pool, True),
    "async context manager": (AsyncManager, True),
    "context manager": (SyncManager, True),
    "AsyncResource": (AsyncPoolResource, True),
    "Resource": (PoolResource, True),
    "coroutine function": (coroutine_pool, False),
    "function": (function_pool, False),
}


@pytest.mark.parametrize("form", list(FORMS))
async def test_every_form_starts_before_its_users_and_stops_after(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock, form: str
) -> None:
    """Each initialiser form opens before what uses it, gives it its value, closes after."""
    init, closes = FORMS[form]
    running = await mikros_service.start(container_for(init), config)
    assert running.phases("pool")[:2] == ["starting", "started"]
    assert await running.stop() == 0
    expected = [
        "open",
        "repo on_start with svc",
        "worker runs",
        "worker drained",
        "repo on_shutdown",
    ]
    if closes:
        expected.append("close")
    assert journal == expected
    # The override made while it ran is gone: the provider is the Resource again.
    assert running.container.pool.last_overriding is None


async def test_value_from_a_running_service_is_the_initialised_one(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """While the service runs, calling the provider gives the value, not an asyncio future."""
    running = await mikros_service.start(container_for(agen_pool), config)
    value = running.container.pool()
    assert isinstance(value, Pool)
    assert value is running.container.repo().pool
    await running.stop()
    assert value.closed


class Warm:
    """A value with warmup and a health report that a test can flip."""

    def __init__(self) -> None:
        self.warmed = False
        self.ok = True

    async def warmup(self) -> None:
        await trio.sleep(1)
        self.warmed = True

    def health(self) -> Mapping[str, Any]:
        return {"ok": self.ok, "in_use": 0}


async def warm_resource() -> AsyncIterator[Warm]:
    yield Warm()


async def idle(lifetime: Lifetime) -> None:
    await lifetime.wait_stopping()


def idle_with(init: Any) -> type[ServiceContainer]:
    """A worker service that only waits, with ``init`` as its ``pool`` resource."""

    class Container(ServiceContainer):
        pool = providers.Resource(init)
        worker = providers.Object(idle)

    return Container


async def test_warmup_runs_before_ready_and_health_gates_readiness(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The value's warmup finishes before ready; while its health says not ok, not ready."""
    running = await mikros_service.start(idle_with(warm_resource), config)
    pool: Warm = running.container.pool()
    assert pool.warmed
    assert running.health.ready
    assert running.health.snapshot()["checks"] == {"pool": {"ok": True, "in_use": 0}}
    pool.ok = False
    await trio.sleep(1.5)  # the next reading
    assert not running.health.ready
    assert running.health.failing == {"pool"}
    assert running.health.snapshot()["checks"]["pool"]["ok"] is False
    pool.ok = True
    await trio.sleep(1.5)
    assert running.health.ready
    assert await running.stop() == 0
    assert "checks" not in running.health.snapshot()


async def test_http_probes_and_grpc_health_read_a_resource_health(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """/readyz says 503 naming the resource while its health is not ok; /healthz shows it."""
    from helpers import HttpContainer

    class Container(HttpContainer):  # type: ignore[misc, valid-type]
        pool = providers.Resource(warm_resource)

    running = await start_http(mikros_service, tmp_path, container=Container)
    pool: Warm = running.container.pool()
    async with client_for(running) as client:
        assert (await client.get("/readyz")).status_code == 200
        pool.ok = False
        answer = await client.get("/readyz")
        assert (answer.status_code, answer.json()) == (503, {"status": "unhealthy: pool"})
        checks = (await client.get("/healthz")).json()["checks"]
        assert checks == {"pool": {"ok": False, "in_use": 0}}
        assert (await client.get("/livez")).status_code == 200  # liveness does not follow it
        pool.ok = True
        assert (await client.get("/readyz")).status_code == 200
    await running.stop()


class Broken(Warm):
    def health(self) -> Mapping[str, Any]:
        raise OSError("the probe itself failed")


async def broken_resource() -> AsyncIterator[Broken]:
    yield Broken()


async def test_a_health_check_that_raises_reads_as_not_ok(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A resource whose health() raises is not ok, and probes still answer."""

    Container = idle_with(broken_resource)
    running = await mikros_service.start(Container, config)
    assert not running.health.ready
    assert running.health.snapshot()["checks"]["pool"] == {"ok": False, "error": "OSError"}
    await running.stop()


async def stuck_close() -> AsyncIterator[Pool]:
    pool = Pool("stuck")
    try:
        yield pool
    finally:
        try:
            await trio.sleep_forever()  # a close that never finishes on its own
        finally:
            pool.closed = True
            journal.append("close cancelled")


async def test_a_stuck_shutdown_is_cut_at_the_deadline_and_its_finally_runs(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A resource whose close hangs is cancelled at the stop deadline; its cleanup still runs."""

    Container = idle_with(stuck_close)
    running = await mikros_service.start(Container, config)
    began = trio.current_time()
    await running.stop()
    assert journal == ["close cancelled"]
    assert trio.current_time() - began <= 3.0 + 0.5  # the shutdown_timeout bounds it


def no_yield() -> Iterator[Pool]:
    return
    yield  # pragma: no cover - makes this a generator function


def yields_twice() -> Iterator[Pool]:
    yield Pool("a")
    yield Pool("b")


async def test_a_generator_that_never_yields_fails_the_start_by_name(
    config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A start failure names the resource and what it did wrong; exit 1."""

    Container = idle_with(no_yield)
    service = Service(Container, config)
    assert await service.run() == 1
    assert str(service.supervisor.failures[0]) == (
        "pool: failed to start: RuntimeError: resource 'pool': its generator ended without yielding"
    )


async def test_a_generator_that_yields_twice_is_a_stop_failure(
    config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A second yield at shutdown is reported against the resource, and the exit code says so."""

    Container = idle_with(yields_twice)
    service = Service(Container, config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        await trio.sleep(1)
        service.supervisor.stop()
    assert service.supervisor.exit_code == 1
    assert "yielded more than once" in str(service.supervisor.failures[0])


def test_an_initialiser_of_no_known_shape_is_a_config_error(config: Path) -> None:
    """providers.Resource(<not callable>) is refused before anything starts, naming the provider."""

    class Container(ServiceContainer):
        pool = providers.Resource(42)  # type: ignore[call-overload]
        worker = providers.Object(idle)

    with pytest.raises(ConfigError) as caught:
        Service(Container, config).build()
    text = str(caught.value)
    assert "Container.pool" in text
    assert "providers.Resource(42)" in text


def test_an_inline_resource_is_a_config_error(config: Path) -> None:
    """A Resource nested inside another provider would never start: refused, naming where."""

    class Container(ServiceContainer):
        repo = providers.Singleton(Repo, pool=providers.Resource(agen_pool, label="x"))
        worker = providers.Object(idle)

    with pytest.raises(ConfigError) as caught:
        Service(Container, config).build()
    assert "Container.repo" in str(caught.value)
    assert "declare it as an attribute" in str(caught.value)


def test_what_a_kind_runs_cannot_be_a_resource(config: Path) -> None:
    """The worker kind's provider as a Resource is refused, saying what to do instead."""

    async def worker_resource() -> AsyncIterator[object]:
        yield idle

    class Container(ServiceContainer):
        worker = providers.Resource(worker_resource)

    with pytest.raises(ConfigError) as caught:
        Service(Container, config).build()
    assert "Container.worker: is what a service kind serves" in str(caught.value)


async def test_overriding_a_resource_with_a_fake_starts_no_resource(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A test's override replaces the resource: the fake is used, the initialiser never runs."""
    container = container_for(agen_pool)()
    fake = Pool("fake")
    container.pool.override(fake)
    running = await mikros_service.start(container, config)
    await running.stop()
    assert journal == [
        "repo on_start with fake",
        "worker runs",
        "worker drained",
        "repo on_shutdown",
    ]
    assert "pool" not in running.health.components


async def test_a_resource_depending_on_a_resource_starts_after_it(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Resources wired into resources follow the wiring: the inner opens first, closes last."""

    async def outer(inner: Pool) -> AsyncIterator[Pool]:
        assert not inner.closed
        journal.append("outer open")
        yield Pool(f"outer of {inner.label}")
        assert not inner.closed
        journal.append("outer close")

    class Chained(ServiceContainer):
        inner_pool = providers.Resource(agen_pool, label="inner")
        outer_pool = providers.Resource(outer, inner=inner_pool)
        worker = providers.Object(idle)

    running = await mikros_service.start(Chained, config)
    await running.stop()
    assert journal == ["open", "outer open", "outer close", "close"]


# -- the escape hatch for asyncio-only drivers ------------------------------------------


async def asyncpg_pool(dsn: str) -> AsyncIterator[Any]:
    import asyncpg
    from trio_asyncio import aio_as_trio

    pool = await aio_as_trio(asyncpg.create_pool)(dsn, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await aio_as_trio(pool.close)()


@pytest.mark.postgres
async def test_an_asyncio_driver_runs_as_a_resource_inside_trio_asyncio(
    postgres_dsn: str, config: Path
) -> None:
    """asyncpg through trio-asyncio: opened and closed in order, and a Trio cancel reaches it."""
    import trio_asyncio
    from trio_asyncio import aio_as_trio

    class Container(ServiceContainer):
        db = providers.Resource(asyncpg_pool, dsn=postgres_dsn)
        worker = providers.Object(idle)

    # The loop must enclose the whole service: every task reaching the
    # driver finds the loop through its context, inherited from here.
    async with trio_asyncio.open_loop():
        service = Service(Container, config)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            pool = service.container.db()
            assert await aio_as_trio(pool.fetchval)("SELECT 41 + 1") == 42
            with trio.move_on_after(0.5) as scope:
                await aio_as_trio(pool.fetchval)("SELECT pg_sleep(30)")
            assert scope.cancelled_caught
            sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
            for _ in range(200):  # the server has no event to wait on: poll, bounded
                if not await aio_as_trio(pool.fetchval)(sleeping):
                    break
                await trio.sleep(0.05)
            else:
                raise AssertionError("pg_sleep(30) still runs on the server")
            service.stop()
    assert service.exit_code == 0
    assert pool.is_closing()


# -- a real process, started and stopped the way users do -----------------------------

RESOURCE_MAIN = """
import sys
from collections.abc import AsyncIterator

import trio
from dependency_injector import providers

import mikros_trio
from mikros_trio import ServiceContainer


async def pool(label: str) -> AsyncIterator[dict[str, str]]:
    print("pool open", label, flush=True)
    try:
        yield {"label": label}
    finally:
        await trio.sleep(0.2)
        print("pool closed", flush=True)


class Repo:
    def __init__(self, pool: dict[str, str]) -> None:
        self.pool = pool

    async def on_start(self) -> None:
        print("repo started with", self.pool["label"], flush=True)

    async def on_shutdown(self) -> None:
        print("repo stopped", flush=True)


async def loop(lifetime: mikros_trio.Lifetime) -> None:
    print("worker running", flush=True)
    await lifetime.wait_stopping()
    print("worker drained", flush=True)


class Container(ServiceContainer):
    pool = providers.Resource(pool, label=ServiceContainer.config.name)
    repo = providers.Singleton(Repo, pool=pool)
    worker = providers.Object(loop)


async def main() -> None:
    raise SystemExit(await mikros_trio.run(Container, sys.argv[1]))


trio.run(main)
"""


def test_a_real_process_opens_and_closes_its_resource_around_its_users(
    tmp_path: Path, spawn: Spawn
) -> None:
    """python main.py, then SIGTERM: the resource opens first and closes last, exit 0."""
    (tmp_path / "service.toml").write_text(
        'name = "resourceful"\ntypes = ["worker"]\nversion = "1.0.0"\n'
    )
    main = tmp_path / "main.py"
    main.write_text(RESOURCE_MAIN)
    child = spawn(sys.executable, main, tmp_path / "service.toml", cwd=tmp_path)
    child.wait_for("worker running")
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.report()
    lines = [
        line for line in child.stdout.splitlines() if line.startswith(("pool", "repo", "worker"))
    ]
    assert lines == [
        "pool open resourceful",
        "repo started with resourceful",
        "worker running",
        "worker drained",
        "repo stopped",
        "pool closed",
    ], child.report()
