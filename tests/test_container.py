"""The container layer: lifecycle discovery, wiring edges, overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from dependency_injector import providers

from helpers import write_worker_toml
from mikros_trio import ConfigError, Lifetime, Service, ServiceContainer
from mikros_trio.ext import Component, FeatureSpec, Registry, Role, default_registry
from mikros_trio.testing import ServiceStarter


@pytest.fixture(name="config")
def _config(tmp_path: Path) -> Path:
    return write_worker_toml(tmp_path)


class Journal:
    """Shared record of what ran, in order."""

    def __init__(self) -> None:
        self.lines: list[str] = []


class Repo:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.label = "real"

    async def on_start(self) -> None:
        self.journal.lines.append(f"repo {self.label} on_start")

    async def on_shutdown(self) -> None:
        self.journal.lines.append(f"repo {self.label} on_shutdown")


class FakeRepo(Repo):
    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.label = "fake"


class Cache:
    def __init__(self, repo: Repo) -> None:
        self.repo = repo

    def on_start(self) -> None:  # sync hooks are allowed
        self.repo.journal.lines.append("cache on_start")

    def on_shutdown(self) -> None:
        self.repo.journal.lines.append("cache on_shutdown")


class Loop:
    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    async def run(self, lifetime: Lifetime) -> None:
        journal = self.cache.repo.journal
        journal.lines.append(f"worker sees repo {self.cache.repo.label}")
        await lifetime.wait_stopping()
        journal.lines.append("worker drained")


class Container(ServiceContainer):
    journal = providers.Singleton(Journal)
    repo = providers.Singleton(Repo, journal=journal)
    cache = providers.Singleton(Cache, repo=repo)
    worker = providers.Factory(Loop, cache=cache)


async def test_wiring_orders_start_and_stop(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A provider injected into another starts before it and stops after it."""
    running = await mikros_service.start(Container, config)
    assert await running.stop() == 0
    journal = running.container.journal()
    assert journal.lines == [
        "repo real on_start",
        "cache on_start",
        "worker sees repo real",
        "worker drained",
        "cache on_shutdown",
        "repo real on_shutdown",
    ]


async def test_override_is_what_the_running_service_uses(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A provider overridden before start is the one the running service and its hooks use."""
    container = Container()
    container.repo.override(providers.Singleton(FakeRepo, journal=container.journal))
    running = await mikros_service.start(container, config)
    await running.stop()
    lines = container.journal().lines
    assert "worker sees repo fake" in lines
    assert "repo fake on_start" in lines
    assert "repo real on_start" not in lines


async def test_harness_override_by_value(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The harness's overrides={name: value} replaces a provider for one test, then resets."""
    journal = Journal()
    fake = FakeRepo(journal)
    running = await mikros_service.start(Container, config, overrides={"repo": fake})
    assert running.container.repo() is fake
    await running.stop()
    assert journal.lines[0] == "repo fake on_start"
    assert journal.lines[-1] == "repo fake on_shutdown"
    assert running.container.repo() is not fake  # override removed after the service


def test_factories_are_not_lifecycle_components(config: Path) -> None:
    """Only Singleton/Object providers with hooks become components; factories do not."""

    class WithFactory(Container):
        extra = providers.Factory(Repo, journal=Container.journal)

    service = Service(WithFactory, config)
    names = [c.name for c in service.supervisor.components]
    assert names == ["logger", "worker", "repo", "cache"]


class Ticker(Component):
    """A Component subclass of the user's, placed in the container."""

    role = Role.PROCESSING
    depends_on = ("repo",)

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.journal.lines.append("ticker run")
        task_status.started()
        await lifetime.wait_stopping()
        self.journal.lines.append("ticker stopped")

    async def warmup(self) -> None:
        self.journal.lines.append("ticker warmup")


async def test_component_in_the_container_runs_as_itself(
    mikros_service: ServiceStarter, config: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A Singleton of a Component subclass runs its own run() and warmup(), in graph order."""

    class WithTicker(Container):
        ticker = providers.Singleton(Ticker, journal=Container.journal)

    running = await mikros_service.start(WithTicker, config)
    assert running.service.supervisor.plan.waves() == [
        ["logger"],
        ["repo"],
        ["cache", "ticker"],
        ["worker"],
    ]
    assert await running.stop() == 0
    lines = running.container.journal().lines
    assert lines.index("repo real on_start") < lines.index("ticker run")
    assert lines.index("ticker run") < lines.index("ticker warmup")
    assert lines.index("ticker stopped") < lines.index("repo real on_shutdown")


def test_factory_of_a_component_is_a_config_error(config: Path) -> None:
    """A Factory of a Component (a new one per call, none run) is refused, saying what to use."""

    class WithFactory(Container):
        ticker = providers.Factory(Ticker, journal=Container.journal)

    with pytest.raises(ConfigError) as caught:
        Service(WithFactory, config).build()
    (issue,) = caught.value.issues
    assert issue.path == "WithFactory.ticker"
    assert "use providers.Singleton" in issue.message


def test_components_table_adds_edges(tmp_path: Path) -> None:
    """[components.<name>] depends_on adds an edge the wiring does not have."""

    class Audit:
        async def on_start(self) -> None: ...

    class WithAudit(Container):
        audit = providers.Singleton(Audit)

    path = write_worker_toml(tmp_path, '[components.repo]\ndepends_on = ["audit"]\n')
    waves = Service(WithAudit, path).supervisor.plan.waves()
    assert waves == [["logger"], ["audit"], ["repo"], ["cache"], ["worker"]]


def test_components_table_naming_nothing_is_an_error(tmp_path: Path) -> None:
    """[components.<name>] for a provider the container lacks is a config error at that path."""
    path = write_worker_toml(tmp_path, '[components.ghost]\ndepends_on = ["repo"]\n')
    with pytest.raises(ConfigError) as caught:
        Service(Container, path).build()
    assert [issue.path for issue in caught.value.issues] == ["components.ghost"]


def test_missing_kind_provider_is_a_config_error(config: Path) -> None:
    """A worker service whose container has no `worker` provider fails at build, naming the key."""

    class NoWorker(ServiceContainer):
        repo = providers.Singleton(Repo, journal=providers.Singleton(Journal))

    with pytest.raises(ConfigError) as caught:
        Service(NoWorker, config).build()
    issue = caught.value.issues[0]
    assert issue.path == "runtime.worker.provider"
    assert "NoWorker" in issue.message


def test_build_constructs_nothing(config: Path) -> None:
    """Building (what `check` does) never constructs a component."""
    built: list[str] = []

    class Loud(Repo):
        def __init__(self, journal: Journal) -> None:
            built.append("repo")
            super().__init__(journal)

    class LoudContainer(Container):
        repo = providers.Singleton(Loud, journal=Container.journal)

    Service(LoudContainer, config).build()
    assert built == []


def test_config_exposes_the_file(config: Path) -> None:
    """container.config holds service.toml values; container.definition the Definition."""
    service = Service(Container, config)
    service.build()
    assert service.container.config.name() == "svc"
    assert service.container.config.lifecycle.drain_timeout() == 1.0
    assert service.container.definition() is service.definition


def test_a_missing_optional_dependency_is_a_config_error_naming_the_extra(config: Path) -> None:
    """A feature whose package is not installed fails the build, naming the extra to install."""

    @dataclass(frozen=True)
    class Nothing:
        pass

    registry = Registry(
        kinds=default_registry().kinds,
        features={
            "fancy": FeatureSpec(
                "fancy", Nothing, "no_such_package_here:build", always_on=True, extra="fancy"
            )
        },
    )
    with pytest.raises(ConfigError) as caught:
        Service(Container, config, registry=registry).build()
    (issue,) = caught.value.issues
    assert issue.path == "features.fancy"
    assert "'no_such_package_here' package, which is not installed" in issue.message
    assert "pip install 'mikros-trio[fancy]'" in issue.message
