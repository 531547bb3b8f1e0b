"""The script kind: one shot, its result is the exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from dependency_injector import providers

from mikros_trio import Lifetime, ServiceContainer
from mikros_trio.testing import ServiceStarter

TOML = """
name = "s"
types = ["script"]
version = "0.1.0"
"""


@pytest.fixture(name="config")
def _config(tmp_path: Path) -> Path:
    path = tmp_path / "service.toml"
    path.write_text(TOML)
    return path


def container_for(script: Any) -> type[ServiceContainer]:
    class Container(ServiceContainer):
        pass

    Container.script = providers.Object(script)  # type: ignore[attr-defined]
    return Container


async def returns(value: Any) -> Any:
    await trio.sleep(0.5)
    return value


@pytest.mark.parametrize(
    ("value", "code"), [(None, 0), (0, 0), (3, 3), (255, 255), (256, 1), (True, 1), ("x", 1)]
)
async def test_return_value_is_the_exit_code(
    mikros_service: ServiceStarter,
    config: Path,
    value: Any,
    code: int,
    autojump_clock: trio.abc.Clock,
) -> None:
    """None → 0, an int 0..255 → itself, anything else → 1."""

    async def script() -> Any:
        return await returns(value)

    running = await mikros_service.start(container_for(script), config)
    assert await running.wait() == code


async def test_exception_exits_1(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A script that raises exits 1 and the failure names the error."""

    async def script() -> None:
        raise ValueError("bad input")

    running = await mikros_service.start(container_for(script), config)
    assert await running.wait() == 1
    assert "ValueError: bad input" in str(running.service.supervisor.failures[0])


async def test_stop_cancels_the_script_at_once(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A programmatic stop cancels a running script immediately (no drain) and exits 1."""
    cancelled: list[float] = []

    async def script(lifetime: Lifetime) -> None:
        try:
            await trio.sleep(60)
        except trio.Cancelled:
            cancelled.append(trio.current_time())
            raise

    running = await mikros_service.start(container_for(script), config)
    await trio.sleep(1)
    stopped_at = trio.current_time()
    assert await running.stop() == 1
    assert cancelled == [stopped_at]
