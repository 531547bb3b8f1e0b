"""The in-process harness: real lifecycle, overrides, stop at the end."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
from dependency_injector import providers

from helpers import (
    BOUND,
    EchoRequest,
    HttpContainer,
    Store,
    http_port,
    port,
    start,
    start_http,
    write_http_toml,
)
from mikros_trio import ConfigError, Lifetime, RPCError, ServiceContainer
from mikros_trio.ext import Phase
from mikros_trio.testing import ServiceStarter, start_service
from protos import testsvc_grpc

pytest_plugins = ["pytester"]

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


async def test_http_client_talks_to_the_running_service(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """http_client() reaches the service's HTTP port with relative URLs, overrides visible."""
    running = await start_http(
        mikros_service, tmp_path, overrides={"store": Store({"pen": "blue"})}
    )
    with trio.fail_after(BOUND):
        async with running.http_client(headers={"x-test": "1"}) as client:
            assert str(client.base_url) == f"http://127.0.0.1:{http_port(running)}"
            found = await client.get("/items/pen")
            missing = await client.get("/items/nope")
    assert (found.status_code, found.json()) == (200, {"key": "pen", "value": "blue"})
    assert missing.status_code == 404
    assert client.is_closed


async def test_grpc_channel_talks_to_the_running_service(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """grpc_channel() is a purerpc channel to the gRPC port that generated stubs call through."""
    running = await start(mikros_service, tmp_path)
    with trio.fail_after(BOUND):
        async with running.grpc_channel() as channel:
            stub = testsvc_grpc.EchoStub(channel)
            reply = await stub.Unary(EchoRequest(text="hi"))
        assert reply.text == "hi"
        with pytest.raises(RPCError):
            await stub.Unary(EchoRequest(text="closed"))
    assert port(running) == running.ports["grpc"]


async def test_clients_name_the_listeners_there_are(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Asking for a listener the service lacks is a KeyError naming those it has."""
    running = await start_http(mikros_service, tmp_path)
    with pytest.raises(KeyError, match=r"no listener named 'grpc' \(listening: http\)"):
        async with running.grpc_channel():
            pytest.fail("no gRPC listener")
    config = tmp_path / "worker"
    config.mkdir()
    (config / "service.toml").write_text(TOML)
    worker = await mikros_service.start(
        Container, config / "service.toml", environ={"HARNESS_TOKEN": "x"}
    )
    with pytest.raises(KeyError, match=r"\(listening: none\)"):
        async with worker.http_client():
            pytest.fail("no HTTP listener")


# A fresh project as a user has it: no trio_mode, strict markers, warnings as
# errors, an async fixture built on mikros_service and the autojump clock.
PROJECT_INI = """
[pytest]
addopts = --strict-markers --strict-config -p no:cacheprovider
filterwarnings = error
"""

PROJECT_SERVICE = """
import trio
from dependency_injector import providers
from mikros_trio import Lifetime, ServiceContainer


class Counter:
    def __init__(self) -> None:
        self.ticks = 0


class Ticker:
    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    async def run(self, lifetime: Lifetime) -> None:
        while not lifetime.stopping:
            self.counter.ticks += 1
            with trio.move_on_after(1.0):
                await lifetime.wait_stopping()


class Container(ServiceContainer):
    counter = providers.Singleton(Counter)
    worker = providers.Factory(Ticker, counter=counter)
"""

PROJECT_TOML = """
name = "ticker"
types = ["worker"]
version = "1.0.0"
"""

PROJECT_TESTS = """
from pathlib import Path

import pytest
import trio

from service import Container, Counter

CONFIG = Path(__file__).parent / "service.toml"


@pytest.fixture
async def running(mikros_service):
    return await mikros_service.start(Container, CONFIG, overrides={"counter": Counter()})


async def test_direct(mikros_service, autojump_clock):
    running = await mikros_service.start(Container, CONFIG)
    await trio.sleep(10.5)
    assert running.container.counter().ticks == 11


async def test_through_a_fixture(running):
    assert running.health.ready
    assert await running.stop() == 0


async def test_without_the_fixture():
    await trio.sleep(0)
"""


def write_project(pytester: pytest.Pytester, tests: str = PROJECT_TESTS) -> None:
    pytester.makeini(PROJECT_INI)
    pytester.makepyfile(service=PROJECT_SERVICE, test_ticker=tests)
    (pytester.path / "service.toml").write_text(PROJECT_TOML)


def test_a_fresh_project_needs_no_trio_mode(pytester: pytest.Pytester) -> None:
    """Async tests using mikros_service, directly or through a fixture, run on Trio unconfigured.

    An async test that does not use it is left alone (pytest refuses it as before).
    """
    write_project(pytester)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_without_the_fixture*async def functions*"])


def test_trio_mode_projects_still_work(pytester: pytest.Pytester) -> None:
    """With trio_mode set, every async test runs once on Trio, ours included."""
    write_project(pytester)
    pytester.makeini(PROJECT_INI + "trio_mode = true\n")
    pytester.runpytest_subprocess().assert_outcomes(passed=3)


def test_a_sync_test_is_told_to_be_async(pytester: pytest.Pytester) -> None:
    """A sync test requesting mikros_service fails with one line saying what to write."""
    write_project(pytester, "def test_sync(mikros_service):\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*test_sync: mikros_service starts a service on Trio; write the test as `async def`"]
    )
    result.stdout.no_fnmatch_line("*Traceback*")


def test_without_pytest_trio_the_error_says_what_to_install(pytester: pytest.Pytester) -> None:
    """pytest-trio absent: the test fails naming the plugin and the command to install it."""
    write_project(pytester, "async def test_async(mikros_service):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:trio")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*test_async: mikros_service needs the pytest-trio plugin; install it*pytest-trio*"]
    )
