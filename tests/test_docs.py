"""The documentation's code includes resolve, so the tutorial stays the tested example's code.

The site (``nox -s docs``) includes code with pymdownx.snippets:
``--8<-- "path:section"`` takes the lines between ``# --8<-- [start:section]``
and ``# --8<-- [end:section]`` in that file, ``--8<-- "path:a:b"`` lines a
to b. The build fails on a missing file, but a line range that slid by a
few lines, or a section marker left unclosed, would still build. These
checks catch that here, without the doc tools installed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import REPO

DOCS = REPO / "docs"

#: A snippet line: ``--8<-- "path"``, optionally ``:name`` or ``:first:last``.
INCLUDE = re.compile(r'^\s*--8<--\s+"(?P<path>[^":]+)(?::(?P<spec>[^"]+))?"\s*$')

#: A section marker, in any comment syntax (``#`` for Python and TOML).
MARKER = re.compile(r"--8<-- \[(?P<edge>start|end):(?P<name>[\w-]+)\]")

#: How a line that opens a whole definition begins.
OPENS = re.compile(r"\s*(@|def |async def |class )")


def _includes() -> list[tuple[str, str, str | None]]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        for line in page.read_text().splitlines():
            match = INCLUDE.match(line)
            if match:
                found.append((str(page.relative_to(REPO)), match["path"], match["spec"]))
    return found


def _sections(path: Path) -> dict[str, tuple[int, int]]:
    """Each section's start and end line numbers; an unbalanced marker fails the test."""
    opened: dict[str, int] = {}
    closed: dict[str, tuple[int, int]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for match in MARKER.finditer(line):
            name = match["name"]
            if match["edge"] == "start":
                assert name not in {*opened, *closed}, f"{path}: {name} opened twice"
                opened[name] = number
            else:
                assert name in opened, f"{path}:{number}: [end:{name}] without a start"
                closed[name] = (opened.pop(name), number)
    assert not opened, f"{path}: sections never closed: {sorted(opened)}"
    return closed


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _check_range(path: Path, first: int, last: int) -> None:
    """Lines first..last are whole definitions: they open one and end where it ends."""
    lines = path.read_text().splitlines()
    assert 1 <= first <= last <= len(lines), f"{path}:{first}:{last} is outside the file"
    body = lines[first - 1 : last]
    assert OPENS.match(body[0]), f"{path}:{first} does not open a definition: {body[0]!r}"
    depth = _indent(body[0])
    shallower = [line for line in body if line.strip() and _indent(line) < depth]
    assert not shallower, f"{path}:{first}:{last} leaves the definition: {shallower[0]!r}"
    after = next((line for line in lines[last:] if line.strip()), None)
    assert after is None or _indent(after) <= depth, (
        f"{path}:{first}:{last} stops inside a definition, before {after!r}"
    )


def test_docs_include_code() -> None:
    """The pages include code at all (else the checks below would pass on nothing)."""
    assert len(_includes()) >= 10


@pytest.mark.parametrize(("page", "target", "spec"), _includes())
def test_include_resolves(page: str, target: str, spec: str | None) -> None:
    """Every include names a file that exists, and a section it marks or whole definitions."""
    path = REPO / target
    assert path.is_file(), f"{page}: {target} does not exist"
    sections = _sections(path)  # balanced markers, whatever the include takes
    if spec is None:
        return
    if re.fullmatch(r"\d+:\d+", spec):
        first, last = map(int, spec.split(":"))
        _check_range(path, first, last)
    else:
        assert spec in sections, f"{page}: {target} has no section {spec!r}: {sorted(sections)}"
        start, end = sections[spec]
        assert end - start > 1, f"{page}: section {spec!r} of {target} is empty"
