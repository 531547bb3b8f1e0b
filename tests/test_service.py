"""``mikros_trio.run``: where it finds service.toml; the garbage collector paused while building."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import Spawn

# A script service that reports whether the collector ran while its
# [service] table was decoded (during the build) and while it serves.
_SERVICE = """
import gc, json, sys
from dataclasses import dataclass
from pathlib import Path

import trio
from dependency_injector import providers

import mikros_trio
from mikros_trio import ServiceContainer

BUILDING = []


@dataclass(frozen=True)
class Settings:
    flag: int = 0

    def __post_init__(self) -> None:
        BUILDING.append(gc.isenabled())


class Report:
    async def run(self) -> int:
        print(json.dumps({"building": BUILDING, "serving": gc.isenabled()}), flush=True)
        return 0


class Container(ServiceContainer):
    service_model = Settings
    script = providers.Factory(Report)


if sys.argv[1] == "user-disabled":
    gc.disable()
trio.run(mikros_trio.run, Container, Path(__file__).with_name("service.toml"))
"""

_TOML = """
name = "gc-check"
types = ["script"]
version = "v0.1.0"
product = "TESTS"

[service]
flag = 1

[lifecycle]
gc_freeze = {freeze}
"""


@pytest.mark.parametrize(
    ("collector", "freeze", "serving"),
    [("enabled", "true", True), ("enabled", "false", True), ("user-disabled", "true", False)],
)
def test_the_collector_is_paused_while_building_and_given_back(
    spawn: Spawn, tmp_path: Path, collector: str, freeze: str, serving: bool
) -> None:
    """No collection while the service builds; after it, the collector is as the user left it."""
    (tmp_path / "main.py").write_text(_SERVICE)
    (tmp_path / "service.toml").write_text(_TOML.format(freeze=freeze))
    child = spawn(sys.executable, tmp_path / "main.py", collector)
    assert child.wait() == 0, child.report()
    reports = [line for line in child.stdout.splitlines() if line.startswith('{"building"')]
    assert [json.loads(line) for line in reports] == [{"building": [False], "serving": serving}]


# A script service whose main.py names no service.toml: run finds it.
_FINDS = """
import sys

import trio
from dependency_injector import providers

import mikros_trio
from mikros_trio import ServiceContainer


class Report:
    def __init__(self, settings: dict[str, object]) -> None:
        self.settings = settings

    async def run(self) -> int:
        print("found", self.settings["origin"], flush=True)
        return 0


class Container(ServiceContainer):
    script = providers.Factory(Report, settings=ServiceContainer.settings)


if __name__ == "__main__":
    trio.run(mikros_trio.run, Container)
"""

_FOUND_TOML = """
name = "finds"
types = ["script"]
version = "v0.1.0"
product = "TESTS"

[service]
origin = "{origin}"
"""


def test_run_finds_the_service_toml_beside_the_container_module(
    spawn: Spawn, tmp_path: Path
) -> None:
    """``trio.run(mikros_trio.run, Container)`` from elsewhere reads the file beside main.py."""
    folder = tmp_path / "service"
    folder.mkdir()
    (folder / "main.py").write_text(_FINDS)
    (folder / "service.toml").write_text(_FOUND_TOML.format(origin="beside"))
    (tmp_path / "service.toml").write_text(_FOUND_TOML.format(origin="cwd"))
    child = spawn(sys.executable, folder / "main.py", cwd=tmp_path)
    assert child.wait() == 0, child.report()
    assert "found beside" in child.stdout


def test_run_falls_back_to_the_working_directory(spawn: Spawn, tmp_path: Path) -> None:
    """A container module with no service.toml beside it reads the working directory's."""
    package = tmp_path / "app"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(_FINDS)
    (tmp_path / "service.toml").write_text(_FOUND_TOML.format(origin="cwd"))
    child = spawn(sys.executable, "-m", "app.main", cwd=tmp_path)
    assert child.wait() == 0, child.report()
    assert "found cwd" in child.stdout


def test_run_without_any_service_toml_names_the_one_it_looked_for(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Neither beside the module nor in the working directory: exit 2 naming the first place."""
    (tmp_path / "main.py").write_text(_FINDS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    child = spawn(sys.executable, tmp_path / "main.py", cwd=elsewhere)
    assert child.wait() == 2, child.report()
    assert str(tmp_path / "service.toml") in child.stderr
    assert "Traceback" not in child.stderr
