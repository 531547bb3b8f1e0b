"""Shared fixtures: the examples and the CLI run as real child processes."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import pytest
from helpers import Child, Spawn


@pytest.fixture(name="spawn")
def fixture_spawn() -> Iterator[Spawn]:
    """Start child processes from the repository root; all are killed and closed at teardown.

    ``env`` adds to (or, with an empty value, removes from) the inherited
    environment, which never carries ``MIKROS_TRIO_VERBOSE`` unless asked.
    """
    children: list[Child] = []

    def spawn(*args: str | os.PathLike[str], env: Mapping[str, str] = {}) -> Child:  # noqa: B006 - read only
        merged = {k: v for k, v in os.environ.items() if k != "MIKROS_TRIO_VERBOSE"}
        merged.update(env)
        merged = {k: v for k, v in merged.items() if v}
        child = Child([os.fspath(a) for a in args], merged)
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.close()
