"""Third-party kinds and features, registered through real entry points."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import trio

from mikros_trio import ConfigError, ServiceContainer
from mikros_trio._definition import definition_schema
from mikros_trio._registry import (
    FEATURES_GROUP,
    KINDS_GROUP,
    Registry,
    default_registry,
    load_registry,
)
from mikros_trio.cli import main
from mikros_trio.ext import load_definition
from mikros_trio.testing import start_service

EXTENSIONS = Path(__file__).parent / "extensions"

Install = Callable[[str, Mapping[str, Mapping[str, str]]], None]

BUILT_IN_FEATURES = ["logger", "errors", "env", "metrics", "tracing"]

SERVICE_TOML = """
name = "ticker"
types = ["cron"]
version = "1.0.0"
[features.audit]
enabled = true
level = "high"
[runtime.cron]
every = 1.0
[lifecycle]
drain_timeout = 1.0
shutdown_timeout = 3.0
"""

GOOD = {
    KINDS_GROUP: {"cron": "mikros_trio_testext:cron"},
    FEATURES_GROUP: {"audit": "mikros_trio_testext:audit"},
}


def write_distribution(
    root: Path, name: str, groups: Mapping[str, Mapping[str, str]], version: str = "1.0"
) -> Path:
    """Write an installed-looking ``<name>-<version>.dist-info`` under ``root``; return root."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines.extend(f"{key} = {value}" for key, value in entries.items())
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    return root


@pytest.fixture(name="install")
def _install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """Returns install(name, groups): puts a fake distribution on sys.path for this test."""
    monkeypatch.syspath_prepend(str(EXTENSIONS))
    default_registry.cache_clear()

    def install(name: str, groups: Mapping[str, Mapping[str, str]]) -> None:
        monkeypatch.syspath_prepend(str(write_distribution(tmp_path / name, name, groups)))

    yield install
    default_registry.cache_clear()


@pytest.fixture(name="registry")
def _registry(install: Install) -> Registry:
    """The registry with the test extension's distribution installed."""
    install("mikros-trio-testext", GOOD)
    return load_registry()


@pytest.fixture(name="journal")
def _journal() -> Iterator[list[str]]:
    """The extension's module-level journal, emptied around the test."""
    import mikros_trio_testext

    mikros_trio_testext.JOURNAL.clear()
    yield mikros_trio_testext.JOURNAL
    mikros_trio_testext.JOURNAL.clear()


def config_file(tmp_path: Path, text: str = SERVICE_TOML) -> Path:
    """Write ``text`` as service.toml in ``tmp_path``."""
    path = tmp_path / "service.toml"
    path.write_text(text)
    return path


def test_entry_points_add_the_kind_and_feature(registry: Registry) -> None:
    """The loader finds cron and audit next to the built-ins, built-ins first."""
    assert list(registry.kinds)[:4] == ["worker", "script", "http", "grpc"]
    assert registry.kind("cron") is not None
    assert registry.kinds["cron"].factory == "mikros_trio_testext:build_cron"
    assert list(registry.features) == [*BUILT_IN_FEATURES, "audit"]


def test_service_toml_using_them_loads(registry: Registry, tmp_path: Path) -> None:
    """types = ["cron"] and [features.audit] decode into the extension's settings."""
    definition = load_definition(config_file(tmp_path), registry=registry)
    assert [t.kind for t in definition.types] == ["cron"]
    assert definition.runtime["cron"].every == 1.0
    assert definition.features["audit"].settings.level == "high"
    assert definition.enabled_features(registry) == ("logger", "errors", "env", "audit")


def test_feature_settings_are_validated(registry: Registry, tmp_path: Path) -> None:
    """A bad value in [features.audit] is a ConfigError at features.audit.level."""
    text = SERVICE_TOML.replace('level = "high"', 'level = "bogus"')
    with pytest.raises(ConfigError) as caught:
        load_definition(config_file(tmp_path, text), registry=registry)
    assert [issue.path for issue in caught.value.issues] == ["features.audit.level"]


def test_kind_settings_reject_unknown_keys(registry: Registry, tmp_path: Path) -> None:
    """A misspelt key in [runtime.cron] is an error suggesting the right one."""
    text = SERVICE_TOML.replace("every = 1.0", "evry = 1")
    with pytest.raises(ConfigError) as caught:
        load_definition(config_file(tmp_path, text), registry=registry)
    (issue,) = caught.value.issues
    assert issue.path.startswith("runtime.cron")
    assert '"every"' in issue.message


async def test_runs_under_the_supervisor(
    registry: Registry, tmp_path: Path, journal: list[str], autojump_clock: trio.abc.Clock
) -> None:
    """audit starts after the logger and before cron, stops in reverse; health lists all; exit 0."""
    async with start_service(ServiceContainer, config_file(tmp_path), registry=registry) as running:
        assert running.health.ready
        assert list(running.health.components) == ["logger", "audit", "cron"]
        started = [e.component for e in running.events if e.phase == "started"]
        assert started == ["logger", "audit", "cron"]
        await trio.sleep(3.5)
        code = await running.stop()
    assert code == 0
    assert journal == ["audit start high", "cron start", "cron stop after 4 ticks", "audit stop"]
    assert running.phases("cron")[-1] == running.phases("audit")[-1] == "stopped"
    stopped = [e.component for e in running.events if e.phase == "stopped"]
    assert stopped[:3] == ["cron", "audit", "logger"]


def test_check_and_schema_see_them(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mikros-trio check` and `schema` use the default registry, which loads entry points."""
    path = config_file(tmp_path)
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kinds: cron" in out
    assert "features: logger, errors, env, audit" in out
    # The file alone builds the features, third-party ones included: the
    # order the supervisor starts them in (test_runs_under_the_supervisor).
    assert re.findall(r"(?m)^\s+\d+\. (.+)$", out) == ["logger", "audit", "cron"]
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "cron" in schema["properties"]["runtime"]["properties"]


def test_schema_has_the_third_party_tables(registry: Registry) -> None:
    """definition_schema(registry) types [runtime.cron] and [features.audit]."""
    properties = definition_schema(registry)["properties"]
    assert "cron" in properties["types"]["items"]["pattern"]
    cron = properties["runtime"]["properties"]["cron"]
    assert "every" in cron["properties"]
    audit = properties["features"]["properties"]["audit"]
    assert audit["properties"]["level"]["enum"] == ["low", "high"]
    assert "enabled" in audit["properties"]


def test_name_clashing_with_a_built_in_is_an_error(install: Install) -> None:
    """An entry point named `worker` does not shadow the built-in worker: it is an error."""
    install("clasher", {KINDS_GROUP: {"worker": "mikros_trio_testext:worker"}})
    with pytest.raises(ConfigError) as caught:
        load_registry()
    (issue,) = caught.value.issues
    assert issue.source == "<entry point worker>"
    assert "already taken by the built-in kind 'worker'" in issue.message
    assert "clasher" in issue.message


def test_two_distributions_claiming_a_name_is_an_error(install: Install) -> None:
    """Two distributions claiming the same kind name is an error naming both."""
    install("mikros-trio-testext", GOOD)
    install("copycat", {KINDS_GROUP: {"cron": "mikros_trio_testext:cron"}})
    with pytest.raises(ConfigError) as caught:
        load_registry()
    (issue,) = caught.value.issues
    assert issue.source == "<entry point cron>"
    assert "already taken by entry point 'cron'" in issue.message


def test_broken_entry_point_is_an_error(install: Install) -> None:
    """An entry point whose module is missing fails loudly, naming it and its distribution."""
    install("broken-ext", {FEATURES_GROUP: {"ghost": "no_such_module_here:ghost"}})
    with pytest.raises(ConfigError) as caught:
        load_registry()
    (issue,) = caught.value.issues
    assert issue.source == "<entry point ghost>"
    assert "ModuleNotFoundError" in issue.message
    assert "broken-ext" in issue.message
    assert FEATURES_GROUP in issue.message


def test_entry_point_must_load_a_spec(install: Install) -> None:
    """An entry point loading something else, or a spec of the wrong group, is an error."""
    install(
        "confused",
        {
            KINDS_GROUP: {"not_a_spec": "mikros_trio_testext:not_a_spec"},
            FEATURES_GROUP: {"cron": "mikros_trio_testext:cron"},
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_registry()
    messages = sorted(issue.message for issue in caught.value.issues)
    assert len(messages) == 2
    assert "must load a FeatureSpec for a feature, got KindSpec" in messages[0]
    assert "must load a KindSpec for a kind, got object" in messages[1]


def test_default_registry_is_cached(install: Install) -> None:
    """default_registry() is loaded once; cache_clear() makes it see new entry points."""
    before = default_registry()
    assert default_registry() is before
    install("mikros-trio-testext", GOOD)
    assert "cron" not in default_registry().kinds
    default_registry.cache_clear()
    assert "cron" in default_registry().kinds
