"""Every public exception of mikros_trio, in one place.

Configuration problems and runtime problems are different families on
purpose: a :class:`ConfigError` means nothing has started and the process
exits with code 2; a :class:`ComponentError` means a component failed while
the service ran (the supervisor records it, and the exit code is 1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ComponentError",
    "ConfigError",
    "ConfigIssue",
    "MikrosTrioError",
]


class MikrosTrioError(Exception):
    """Base class of every exception mikros_trio raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem found in a service's configuration.

    ``source`` is the file (or ``"<container>"`` for problems found while
    wiring), ``path`` the dotted key path inside it (``"runtime.http.port"``;
    empty for the whole document), ``message`` says what was expected.
    """

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return f"{where}: {self.message}"


class ConfigError(MikrosTrioError):
    """Raised before anything starts when the configuration cannot be used.

    Carries *every* issue found, not only the first, so a user fixes them in
    one pass. Covers service.toml syntax and values, missing required
    environment variables, and component graph errors (cycles, unknown
    names). The CLI prints the issues, one per line, and exits with code 2.
    """

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        if not self.issues:
            raise ValueError("ConfigError needs at least one issue")
        super().__init__(self.render())

    def render(self) -> str:
        """All issues, one per line, in the order they were found."""
        count = len(self.issues)
        head = "1 configuration error" if count == 1 else f"{count} configuration errors"
        return head + ":\n" + "\n".join(f"  {issue}" for issue in self.issues)


class ComponentError(MikrosTrioError):
    """A component misbehaved at run time: it crashed, timed out or broke its contract.

    ``component`` names it; the original exception, if any, is the
    ``__cause__``.
    """

    def __init__(self, component: str, message: str) -> None:
        self.component = component
        super().__init__(f"{component}: {message}")
