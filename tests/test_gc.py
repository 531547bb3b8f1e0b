"""The collector while services serve: ``[lifecycle] gc_freeze`` and ``gc_threshold``."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from dependency_injector import providers

from mikros_trio import ConfigError, Lifetime, Service, ServiceContainer
from mikros_trio.ext import load_definition
from mikros_trio.testing import ServiceStarter

TOML = """
name = "{name}"
types = ["worker"]
version = "v1.0.0"
[lifecycle]
{lifecycle}
"""


class Idle:
    async def run(self, lifetime: Lifetime) -> None:
        await lifetime.wait_stopping()


class Container(ServiceContainer):
    worker = providers.Singleton(Idle)


def write(tmp_path: Path, lifecycle: str = "", name: str = "w") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TOML.format(name=name, lifecycle=lifecycle))
    return path


@pytest.fixture(autouse=True)
def interpreter_defaults() -> Iterator[None]:
    """Each test starts from Python 3.11's defaults and nothing frozen, and leaves them so."""
    saved = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    yield
    gc.unfreeze()
    gc.set_threshold(*saved)


async def test_serving_raises_the_threshold_and_freezes_then_restores(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Once ready: threshold 2000 and start-up objects frozen; after stop: 700 and none frozen."""
    running = await mikros_service.start(Container, write(tmp_path))
    assert gc.get_threshold() == (2000, 10, 10)
    assert gc.get_freeze_count() > 0
    assert await running.stop() == 0
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


async def test_a_higher_threshold_is_never_lowered(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A threshold already above gc_threshold (the user's, or a newer Python's) stays."""
    gc.set_threshold(50_000, 20, 20)
    running = await mikros_service.start(Container, write(tmp_path, "gc_threshold = 5000"))
    assert gc.get_threshold() == (50_000, 20, 20)
    assert await running.stop() == 0
    assert gc.get_threshold() == (50_000, 20, 20)


async def test_switched_off_leaves_the_collector_alone(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """gc_freeze = false and gc_threshold = 0: nothing changes while serving."""
    lifecycle = "gc_freeze = false\ngc_threshold = 0"
    running = await mikros_service.start(Container, write(tmp_path, lifecycle))
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0
    assert await running.stop() == 0


async def test_the_last_service_to_stop_restores(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """With two services in one process, settings hold until both have stopped."""
    first = await mikros_service.start(Container, write(tmp_path, name="a"))
    second = await mikros_service.start(Container, write(tmp_path, "gc_threshold = 3000", "b"))
    assert gc.get_threshold() == (3000, 10, 10)
    assert await first.stop() == 0
    assert gc.get_threshold() == (3000, 10, 10)
    assert gc.get_freeze_count() > 0
    assert await second.stop() == 0
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


async def test_start_up_garbage_is_collected_after_the_service_stops(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A cycle frozen at ready and dropped while serving is collected once the service stops."""

    class Node:
        other: object = None

    first, second = Node(), Node()
    first.other, second.other = second, first
    alive = weakref.ref(first)
    running = await mikros_service.start(Container, write(tmp_path))
    del first, second
    gc.collect()
    assert alive() is not None  # frozen: out of the collector's sight
    assert await running.stop() == 0
    gc.collect()
    assert alive() is None


def test_a_negative_threshold_is_a_config_error(tmp_path: Path) -> None:
    """gc_threshold below 0 is reported with its key path."""
    with pytest.raises(ConfigError, match=r"lifecycle\.gc_threshold"):
        load_definition(write(tmp_path, "gc_threshold = -1"))


async def test_a_service_that_never_got_ready_changes_nothing(tmp_path: Path) -> None:
    """A start that fails (an on_start hook raises) leaves the collector as it was."""

    class Broken:
        async def on_start(self) -> None:
            raise RuntimeError("no database")

    class Waiting(Idle):
        def __init__(self, broken: Broken) -> None:
            self.broken = broken

    class BrokenContainer(ServiceContainer):
        broken = providers.Singleton(Broken)
        worker = providers.Singleton(Waiting, broken=broken)

    service = Service(BrokenContainer, write(tmp_path), environ={})
    with trio.fail_after(5):
        code = await service.run()
    assert code == 1
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0
