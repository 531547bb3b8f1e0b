"""Shared fixtures: the examples and the CLI run as real child processes."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from helpers import REPO, Child, Spawn


@pytest.fixture(name="spawn")
def fixture_spawn() -> Iterator[Spawn]:
    """Start child processes from the repository root; all are killed and closed at teardown.

    ``env`` adds to the inherited environment (``None`` removes a name);
    ``MIKROS_TRIO_VERBOSE`` is never inherited, only set on purpose.
    """
    children: list[Child] = []

    def spawn(
        *args: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        cwd: Path = REPO,
    ) -> Child:
        merged: dict[str, str | None] = {**os.environ, "MIKROS_TRIO_VERBOSE": None, **(env or {})}
        environ = {name: value for name, value in merged.items() if value is not None}
        child = Child([os.fspath(a) for a in args], environ, cwd)
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.close()
