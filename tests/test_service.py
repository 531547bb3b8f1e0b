"""``mikros_trio.run``: the garbage collector paused while the service builds, and given back."""

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
