"""The in-process harness: real lifecycle, overrides, stop at the end."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
from dependency_injector import providers

from helpers import HttpContainer, http_port, write_http_toml
from mikros_trio import ConfigError, Lifetime, Phase, ServiceContainer
from mikros_trio.testing import ServiceStarter, start_service

TOML = """
name = "h"
types = ["worker"]
version = "1.0.0"
envs = ["HARNESS_TOKEN"]
"""


class Resource:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def on_start(self) -> None:
        self.calls.append("on_start")

    async def on_shutdown(self) -> None:
        self.calls.append("on_shutdown")


async def idle(lifetime: Lifetime) -> None:
    await lifetime.wait_stopping()


class Container(ServiceContainer):
    resource = providers.Singleton(Resource)
    worker = providers.Object(idle)


@pytest.fixture(name="config")
def _config(tmp_path: Path) -> Path:
    path = tmp_path / "service.toml"
    path.write_text(TOML)
    return path


async def test_context_manager_stops_the_service(
    config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """start_service yields a ready service and stops it, hooks once each, on exit."""
    async with start_service(Container, config, environ={"HARNESS_TOKEN": "x"}) as running:
        assert running.health.phase is Phase.SERVING
        assert not running.finished
        resource = running.container.resource()
    assert running.finished
    assert running.exit_code == 0
    assert resource.calls == ["on_start", "on_shutdown"]


async def test_config_errors_surface_before_start(
    config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A missing required env raises ConfigError from start_service; nothing starts."""
    with pytest.raises(ConfigError) as caught:
        async with start_service(Container, config, environ={}):
            pytest.fail("the service must not start")
    assert "HARNESS_TOKEN" in str(caught.value)


async def test_unknown_override_is_rejected(config: Path, autojump_clock: trio.abc.Clock) -> None:
    """Overriding a provider the container lacks is an error naming the known ones."""
    with pytest.raises(KeyError, match="resource"):
        async with start_service(Container, config, overrides={"nope": 1}):
            pytest.fail("the service must not start")


async def test_fixture_gives_events_and_health(
    mikros_service: object, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The fixture's handle exposes the event log and per-component health."""
    from mikros_trio.testing import ServiceStarter

    assert isinstance(mikros_service, ServiceStarter)
    running = await mikros_service.start(Container, config, environ={"HARNESS_TOKEN": "x"})
    assert running.health.snapshot()["status"] == "serving"
    assert running.phases("resource") == ["starting", "started"]
    assert running.ports == {}


async def test_ephemeral_ports_win_over_per_service_port_variables(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A developer's per-service port variables (ours, Go's, Rust's) do not pin a test's port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        environ = {
            **os.environ,
            "WEB__MIKROS_HTTP_PORT": busy,
            "web__MIKROS_HTTP_PORT": busy,
            "MIKROS_HTTP_PORT_web": busy,
            "MIKROS_HTTP_PORT": busy,
        }
        running = await mikros_service.start(
            HttpContainer, write_http_toml(tmp_path), environ=environ
        )
        assert http_port(running) not in (0, int(busy))
        await running.stop()
