"""The worker kind: a loop that runs until shutdown and is cut at the drain deadline."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from dependency_injector import providers

from mikros_trio import ConfigError, Lifetime, Service, ServiceContainer
from mikros_trio.testing import ServiceStarter

TOML = """
name = "w"
types = ["{kind}"]
version = "v1.0.0"
[lifecycle]
drain_timeout = 2.0
shutdown_timeout = 5.0
"""


def write(tmp_path: Path, kind: str = "worker") -> Path:
    path = tmp_path / "service.toml"
    path.write_text(TOML.format(kind=kind))
    return path


class Polite:
    """Finishes its iteration and returns once shutdown starts."""

    def __init__(self) -> None:
        self.saw_stopping = False
        self.iterations = 0

    async def run(self, lifetime: Lifetime) -> None:
        while not lifetime.stopping:
            self.iterations += 1
            await trio.sleep(0.1)
        self.saw_stopping = lifetime.trigger is not None


class Stubborn:
    """Ignores shutdown: only cancellation ends it."""

    def __init__(self) -> None:
        self.cancelled_at: float | None = None

    async def run(self, lifetime: Lifetime) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled_at = trio.current_time()
            raise


class PoliteContainer(ServiceContainer):
    worker = providers.Singleton(Polite)


class StubbornContainer(ServiceContainer):
    worker = providers.Singleton(Stubborn)


@pytest.mark.parametrize("kind", ["worker", "native"])
async def test_worker_sees_shutdown_and_returns(
    mikros_service: ServiceStarter, tmp_path: Path, kind: str, autojump_clock: trio.abc.Clock
) -> None:
    """The loop sees lifetime.stopping, returns, and the service exits 0 ('native' is an alias)."""
    running = await mikros_service.start(PoliteContainer, write(tmp_path, kind))
    await trio.sleep(1)
    assert await running.stop() == 0
    worker = running.container.worker()
    assert worker.saw_stopping
    assert worker.iterations >= 9
    assert running.phases("worker") == ["starting", "started", "stopping", "stopped"]


async def test_stubborn_worker_is_cancelled_at_the_drain_deadline(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A loop that ignores shutdown is cancelled exactly drain_timeout after stopping began."""
    running = await mikros_service.start(StubbornContainer, write(tmp_path))
    running.service.stop()
    stopping_at = trio.current_time()
    assert await running.wait() == 0
    worker = running.container.worker()
    assert worker.cancelled_at == pytest.approx(stopping_at + 2.0)
    assert "cut" in running.phases("worker")


async def test_worker_returning_ends_the_service(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A worker that returns on its own shuts the service down with exit 0."""

    async def once() -> None:
        await trio.sleep(1)

    class Once(ServiceContainer):
        worker = providers.Object(once)

    running = await mikros_service.start(Once, write(tmp_path))
    assert await running.wait() == 0
    assert running.service.supervisor.trigger is not None
    assert running.service.supervisor.trigger.reason == "worker finished"


async def test_worker_crash_exits_1(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A worker raising while serving fails the service (exit 1) with the error recorded."""

    async def boom(lifetime: Lifetime) -> None:
        await trio.sleep(1)
        raise RuntimeError("queue lost")

    class Boom(ServiceContainer):
        worker = providers.Object(boom)

    running = await mikros_service.start(Boom, write(tmp_path))
    assert await running.wait() == 1
    failure = running.service.supervisor.failures[0]
    assert failure.component == "worker"
    assert "queue lost" in str(failure)


async def test_sync_worker_is_rejected(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A worker that is not async fails to start with a message saying so."""

    def not_async(lifetime: Lifetime) -> None:
        return None

    class Sync(ServiceContainer):
        worker = providers.Object(not_async)

    running = await mikros_service.start(Sync, write(tmp_path))
    assert await running.wait() == 1
    assert "must be async" in str(running.service.supervisor.failures[0])


def test_worker_provider_name_comes_from_runtime(tmp_path: Path) -> None:
    """[runtime.worker] provider names the container provider the worker kind uses."""
    path = write(tmp_path)
    path.write_text(path.read_text() + '[runtime.worker]\nprovider = "poller"\n')

    class Named(ServiceContainer):
        poller = providers.Singleton(Polite)

    assert [c.name for c in Service(Named, path).supervisor.components] == ["logger", "worker"]
    with pytest.raises(ConfigError):
        Service(PoliteContainer, path).build()
