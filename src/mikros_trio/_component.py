"""The component contract: what the supervisor runs.

A component is anything with a name, a role and an async ``run``. ``run``
does its setup, reports readiness with ``task_status.started()``, serves
until :attr:`Lifetime.stopping`, then drains and returns. The supervisor
bounds each phase with deadlines on the component's cancel scope, so a
component never needs timeouts of its own.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ._health import Health

__all__ = ["Component", "Lifetime", "Role", "ShutdownTrigger"]


class Role(enum.Enum):
    """Which side of the ready barrier a component stands on.

    Work-processing components (features, clients, resources) start before
    every work-generating one (servers, workers, scripts) and stop after
    them all, so nothing accepts work that cannot yet, or no longer, be
    done.
    """

    PROCESSING = "processing"
    GENERATING = "generating"


@dataclass(frozen=True, slots=True)
class ShutdownTrigger:
    """Why shutdown began: ``reason`` in words, ``signal`` when a signal did it."""

    reason: str
    signal: int | None = None
    time: float = 0.0


class Lifetime:
    """A component's view of the service's life, handed to ``run``.

    It tells the component when to stop taking work (:attr:`stopping`,
    :meth:`wait_stopping`) and lets it ask the whole service to stop
    (:meth:`stop`). One instance per component.
    """

    __slots__ = ("_event", "_on_stop", "_supervisor_state", "deadline", "name")

    def __init__(
        self,
        name: str,
        on_stop: Callable[[str, int | None], None],
        state: _SupervisorView,
    ) -> None:
        self.name = name
        #: Trio time at which the graceful phase is cut; ``inf`` until stopping.
        self.deadline = float("inf")
        self._event = trio.Event()
        self._on_stop = on_stop
        self._supervisor_state = state

    @property
    def stopping(self) -> bool:
        """True once this component has been asked to stop taking work."""
        return self._event.is_set()

    async def wait_stopping(self) -> None:
        """Return once this component has been asked to stop taking work."""
        await self._event.wait()

    @property
    def health(self) -> Health:
        """The service's health state (read only)."""
        return self._supervisor_state.health

    @property
    def trigger(self) -> ShutdownTrigger | None:
        """Why the service is shutting down, or ``None`` while it is not."""
        return self._supervisor_state.trigger

    def stop(self, reason: str = "stop requested", *, exit_code: int | None = None) -> None:
        """Ask the whole service to shut down; ``exit_code`` proposes the process's result.

        Idempotent: only the first request picks the trigger.
        """
        self._on_stop(f"{self.name}: {reason}", exit_code)

    def publish_address(self, host: str, port: int) -> None:
        """Record where this component listens (tests read bound ephemeral ports here)."""
        self._supervisor_state.addresses[self.name] = (host, port)

    def _begin_stopping(self, deadline: float) -> None:
        self.deadline = deadline
        self._event.set()


class _SupervisorView(abc.ABC):
    """What a :class:`Lifetime` may read from its supervisor."""

    @property
    @abc.abstractmethod
    def health(self) -> Health: ...

    @property
    @abc.abstractmethod
    def trigger(self) -> ShutdownTrigger | None: ...

    addresses: dict[str, tuple[str, int]]


class Component(abc.ABC):
    """Base class of everything the supervisor runs.

    Subclasses set :attr:`name` (unique in the service), :attr:`role`, and
    optionally :attr:`depends_on` (names that must be ready first and stop
    after) and :attr:`enhanced_by` (names that start right after this one
    and stop right before it; dependents need not name them). Example::

        class Ticker(Component):
            role = Role.GENERATING

            async def run(self, lifetime, *, task_status=trio.TASK_STATUS_IGNORED):
                task_status.started()
                while not lifetime.stopping:
                    await trio.sleep(1)
    """

    name: str
    role: Role = Role.PROCESSING
    depends_on: tuple[str, ...] = ()
    enhanced_by: tuple[str, ...] = ()

    @abc.abstractmethod
    async def run(
        self,
        lifetime: Lifetime,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Set up, call ``task_status.started()``, serve until stopping, drain, return."""

    async def warmup(self) -> None:  # noqa: B027 - optional hook; the default does nothing
        """Runs after every component is ready and before the service reports ready."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.role.value}>"
