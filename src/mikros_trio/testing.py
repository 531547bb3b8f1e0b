"""Start a whole service in-process for a test, with the real lifecycle.

Registered as a pytest plugin (entry point ``pytest11``), it provides the
``mikros_service`` fixture; :func:`start_service` is the same thing as an
async context manager for use outside pytest. Network kinds bind ephemeral
ports (their ``MIKROS_*_PORT`` variable is set to ``0``), provider
overrides are applied before anything starts and removed afterwards, and
the service is stopped — gracefully, through its real shutdown sequence —
when the test ends. It runs on pytest-trio (``autojump_clock`` included):
an ``async def`` test that uses the fixture, directly or through another
fixture, is marked ``trio`` here, so the project needs no ``trio_mode``.

Example::

    async def test_uses_fake_repo(mikros_service):
        running = await mikros_service.start(
            Container, "service.toml", overrides={"repo": FakeRepo()}
        )
        async with running.http_client() as client:
            assert (await client.get("/items/7")).status_code == 404
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from dependency_injector import providers

from ._container import ServiceContainer
from ._definition import ClientSettings, Definition
from ._health import Health
from ._registry import Registry, default_registry
from ._service import Service
from ._supervisor import LifecycleEvent

if TYPE_CHECKING:
    import httpx

    from .grpc import ClientChannel

__all__ = ["RunningService", "ServiceStarter", "start_service"]


class RunningService:
    """A service started by the harness: its state, and a way to stop it."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._done = trio.Event()
        self._exit_code: int | None = None

    @property
    def container(self) -> ServiceContainer:
        """The container the service runs from (overrides applied)."""
        return self.service.container

    @property
    def definition(self) -> Definition:
        """The loaded definition."""
        return self.service.definition

    @property
    def health(self) -> Health:
        """The live health state."""
        return self.service.health

    @property
    def events(self) -> list[LifecycleEvent]:
        """The lifecycle event log so far."""
        return self.service.events

    @property
    def ports(self) -> dict[str, int]:
        """Bound ports by component name, as the kinds published them."""
        return {name: address[1] for name, address in self.service.supervisor.addresses.items()}

    @property
    def finished(self) -> bool:
        """True once the service has stopped."""
        return self._done.is_set()

    @property
    def exit_code(self) -> int | None:
        """The exit code once finished, else ``None``."""
        return self._exit_code

    def phases(self, component: str) -> list[str]:
        """The phases ``component`` went through, in order."""
        return [event.phase for event in self.events if event.component == component]

    async def wait(self) -> int:
        """Wait until the service stops on its own; return its exit code."""
        await self._done.wait()
        assert self._exit_code is not None
        return self._exit_code

    async def stop(self) -> int:
        """Shut down gracefully and wait for it; return the exit code. Idempotent."""
        self.service.stop("stopped by the test harness")
        return await self.wait()

    def _port(self, name: str) -> int:
        ports = self.ports
        if name not in ports:
            listening = ", ".join(sorted(ports)) or "none"
            raise KeyError(f"no listener named {name!r} (listening: {listening})")
        return ports[name]

    @asynccontextmanager
    async def http_client(
        self, name: str = "http", **options: Any
    ) -> AsyncIterator[httpx.AsyncClient]:
        """An ``httpx.AsyncClient`` whose ``base_url`` is the listener ``name``; closed on exit.

        ``options`` go to ``httpx.AsyncClient`` (``headers``, ``timeout``…).
        Proxy variables from the environment are ignored (``trust_env``
        false) unless ``options`` say otherwise: the service is local.
        """
        import httpx

        options.setdefault("trust_env", False)
        base_url = f"http://127.0.0.1:{self._port(name)}"
        async with httpx.AsyncClient(base_url=base_url, **options) as client:
            yield client

    @asynccontextmanager
    async def grpc_channel(self, name: str = "grpc") -> AsyncIterator[ClientChannel]:
        """A channel to the gRPC listener ``name`` for generated stubs; closed on exit.

        It is the :class:`~mikros_trio.grpc.ClientChannel` services use for
        ``[clients.*]`` (a failure raises the typed Mikros error when called
        through :func:`mikros_trio.grpc.call`), with telemetry of its own,
        so the test's calls do not count as the service's.
        """
        from .grpc import ClientChannel

        address = ClientSettings(host="127.0.0.1", port=self._port(name))
        definition = dataclasses.replace(self.definition, clients={name: address})
        async with ClientChannel(name, definition) as channel:
            yield channel

    async def _run(self, *, task_status: trio.TaskStatus[Service]) -> None:
        try:
            await self.service.run(task_status=task_status)
        finally:
            self._exit_code = self.service.exit_code
            self._done.set()


def _apply_overrides(
    container: ServiceContainer, overrides: Mapping[str, Any]
) -> list[providers.Provider[Any]]:
    applied = []
    for name, value in overrides.items():
        provider = container.providers.get(name)
        if provider is None:
            known = ", ".join(sorted(container.providers))
            raise KeyError(f"override {name!r}: the container has no such provider ({known})")
        provider.override(
            value if isinstance(value, providers.Provider) else providers.Object(value)
        )
        applied.append(provider)
    return applied


def _prepare(
    container: ServiceContainer | type[ServiceContainer],
    config: str | os.PathLike[str] | Definition | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    registry: Registry | None = None,
    ephemeral_ports: bool = True,
) -> tuple[RunningService, list[providers.Provider[Any]]]:
    """Apply overrides and build the service; configuration errors raise here, plainly."""
    instance = container() if isinstance(container, type) else container
    registry = registry or default_registry()
    env = dict(os.environ if environ is None else environ)
    if ephemeral_ports:
        port_envs = [spec.port_env for spec in registry.kinds.values()]
        port_envs += [spec.port_env for spec in registry.features.values()]
        for name in port_envs:
            if name is None:
                continue
            # Per-service forms (ours and Go's ``…__NAME``, Rust's
            # ``NAME_<service>``) are read first: a developer's would pin a port.
            for key in [k for k in env if k.endswith("__" + name) or k.startswith(name + "_")]:
                del env[key]
            env[name] = "0"
    applied = _apply_overrides(instance, overrides or {})
    try:
        config_arg = config if config is None or isinstance(config, Definition) else Path(config)
        service = Service(instance, config_arg, environ=env, registry=registry)
        service.build()
    except BaseException:
        _reset(applied)
        raise
    return RunningService(service), applied


def _reset(applied: list[providers.Provider[Any]]) -> None:
    for provider in applied:
        provider.reset_last_overriding()


async def _serve(
    running: RunningService,
    applied: list[providers.Provider[Any]],
    *,
    task_status: trio.TaskStatus[RunningService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a prepared service to its end, then remove its overrides.

    One task does it, so it can live in any nursery: the caller's
    (``start_service``) or the fixture's (``mikros_service``).
    """
    try:
        await running._run(task_status=_Forward(task_status, running))
    finally:
        _reset(applied)


class _Forward:
    """Report the :class:`RunningService` (not the Service) as the started value."""

    __slots__ = ("_running", "_status")

    def __init__(self, status: trio.TaskStatus[RunningService], running: RunningService) -> None:
        self._status = status
        self._running = running

    def started(self, value: Any = None) -> None:
        self._status.started(self._running)


@asynccontextmanager
async def start_service(
    container: ServiceContainer | type[ServiceContainer],
    config: str | os.PathLike[str] | Definition | None = None,
    **options: Any,
) -> AsyncIterator[RunningService]:
    """Start the service, yield it once ready (or finished), stop it on exit.

    ``config`` is the service.toml (a path or a parsed definition); by
    default the one beside the container's module, as for
    :class:`~mikros_trio.Service`.

    Options: ``overrides`` maps provider names to replacement values
    (wrapped in ``providers.Object``) or providers; ``environ`` replaces the
    process environment for the definition (required envs, port
    overrides); ``registry``; ``ephemeral_ports`` (default true).
    """
    running, applied = _prepare(container, config, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve, running, applied)
        try:
            yield running
        finally:
            running.service.stop("stopped by the test harness")


class ServiceStarter:
    """What the ``mikros_service`` fixture gives a test: ``await starter.start(...)``."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._started: list[RunningService] = []

    async def start(
        self,
        container: ServiceContainer | type[ServiceContainer],
        config: str | os.PathLike[str] | Definition | None = None,
        **options: Any,
    ) -> RunningService:
        """Start a service for this test; it is stopped when the test ends.

        ``options`` are those of :func:`start_service`.
        """
        running, applied = _prepare(container, config, **options)
        await self._nursery.start(_serve, running, applied)
        self._started.append(running)
        return running

    async def _stop_all(self) -> None:
        for running in reversed(self._started):
            await running.stop()


@pytest.fixture(name="mikros_service")
async def _mikros_service() -> AsyncIterator[ServiceStarter]:
    """Starts services for a test and stops them, in reverse, when it ends."""
    async with trio.open_nursery() as nursery:
        starter = ServiceStarter(nursery)
        yield starter
        await starter._stop_all()


# The plugin's hooks. pytest-trio runs a test on Trio when it carries the
# ``trio`` marker (``trio_mode`` only adds that marker to every async test);
# marking the tests that use ``mikros_service`` is enough for the fixture
# and every async fixture of those tests to run on Trio too.

_FIXTURE = "mikros_service"


def _is_async(item: pytest.Function) -> bool:
    test = item.obj
    hypothesis = getattr(test, "hypothesis", None)
    if hypothesis is not None:
        test = hypothesis.inner_test
    return inspect.iscoroutinefunction(test)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark async tests using ``mikros_service`` for pytest-trio (trylast: after trio_mode)."""
    if not config.pluginmanager.hasplugin("trio"):
        return  # the marker is pytest-trio's: setup says what to install
    for item in items:
        if not isinstance(item, pytest.Function) or _FIXTURE not in item.fixturenames:
            continue
        if _is_async(item) and item.get_closest_marker("trio") is None:
            item.add_marker(pytest.mark.trio)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Refuse, in words, what cannot run: a sync test, or no pytest-trio."""
    if not isinstance(item, pytest.Function) or _FIXTURE not in item.fixturenames:
        return
    if not _is_async(item):
        pytest.fail(
            f"{item.nodeid}: {_FIXTURE} starts a service on Trio; write the test as `async def`",
            pytrace=False,
        )
    if not item.config.pluginmanager.hasplugin("trio"):
        pytest.fail(
            f"{item.nodeid}: {_FIXTURE} needs the pytest-trio plugin; install it "
            "(`pip install pytest-trio`) in the environment that runs pytest",
            pytrace=False,
        )
