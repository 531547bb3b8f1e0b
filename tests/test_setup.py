"""The README's set-up: two commands, virtualenvs only, and CI runs the test one exactly.

Running the commands themselves takes minutes (the test one is the whole
suite), so they are checked by hand on Debian's python3 when they change;
these tests pin their shape and that ``.ci/run`` has not drifted from them.
"""

from __future__ import annotations

import re
import shlex

from helpers import REPO

README = REPO / "README.md"
CI_RUN = REPO / ".ci" / "run"


def _setup_commands() -> list[str]:
    """The command lines of the ```sh block in the README's "Set up" section."""
    text = README.read_text()
    section = re.search(r"(?ms)^## Set up\n(.*?)(?=^## )", text)
    assert section is not None, "README.md has no '## Set up' section"
    block = re.search(r"(?ms)^```sh\n(.*?)^```", section.group(1))
    assert block is not None, "the Set up section has no ```sh block"
    lines = block.group(1).splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _ci_commands() -> list[str]:
    """The last two command lines of .ci/run (comments and blank lines skipped)."""
    lines = [line for line in CI_RUN.read_text().splitlines() if line.strip()]
    commands = [line for line in lines if not line.lstrip().startswith("#")]
    return commands[-2:]


def test_readme_has_two_setup_commands() -> None:
    """The Set up block holds exactly two command lines: install and run, install and test."""
    commands = _setup_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("examples/worker/main.py")
    assert commands[1].endswith("nox -s tests")


def test_setup_commands_install_only_into_a_venv() -> None:
    """No pip or nox runs on the bare python3: Debian's refuses ``pip install`` outside a venv."""
    for command in _setup_commands():
        for part in command.split("&&"):
            argv = shlex.split(part)
            if argv[0] == "python3":
                assert argv[1:3] == ["-m", "venv"], part  # python3 only makes the venv
            else:
                assert argv[0].startswith(".venv/bin/"), part


def test_ci_runs_the_readme_test_command_then_builds_the_docs() -> None:
    """.ci/run runs the README's test command, character for character, then the docs build."""
    assert _ci_commands() == [_setup_commands()[1], ".venv/bin/nox -s docs"]
