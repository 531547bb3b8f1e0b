"""The one health state of a service, per component and overall.

The supervisor is the only writer; HTTP probes and ``grpc.health.v1`` are
readers. Readers that stream changes (gRPC ``Watch``) wait on
:meth:`Health.wait_changed`, which costs nothing while nobody waits: the
event is created lazily and only set when someone holds it.

Under ``workers = N`` each worker process has its own supervisor and
health, and probes must answer for the whole service: the worker's health
is then joined to :class:`Peers` (a status block shared by all workers,
see :mod:`._workers`), and ready only while every worker serves and the
parent is not shutting down. A worker that begins shutting down writes so
into the block before anything else, so every other worker's next probe
already says not ready.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

import trio

__all__ = ["ComponentState", "Health", "Peers", "Phase"]


class Phase(enum.Enum):
    """Where the whole service is in its life.

    ``STARTING`` until every component is ready and warm; ``SERVING`` while
    it takes work; ``DRAINING`` from the first moment shutdown begins (so
    readiness turns off before anything stops); ``STOPPED`` once every
    component has stopped.
    """

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class ComponentState(enum.Enum):
    """Where one component is: the same words as :class:`Phase`, plus failure."""

    PENDING = "pending"  # waiting for its dependencies to be ready
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class Peers(Protocol):
    """The other workers of the service, as this worker's health sees them."""

    @property
    def ready(self) -> bool:
        """Every worker serving, and the parent not shutting down."""
        ...

    def publish(self, phase: Phase) -> None:
        """Tell the others this worker's phase (called on every change, first)."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view of every worker, for ``/healthz``."""
        ...


class Health:
    """Health of a service: overall :class:`Phase` and each component's state.

    Liveness (:attr:`live`) stays true until the process is about to exit,
    draining included; readiness (:attr:`ready`) is true only while
    :attr:`phase` is ``SERVING``.
    """

    __slots__ = ("_changed", "_checks", "_components", "_failing", "_peers", "_phase", "_version")

    def __init__(self) -> None:
        self._phase = Phase.STARTING
        self._components: dict[str, ComponentState] = {}
        self._version = 0
        self._changed: trio.Event | None = None
        self._peers: Peers | None = None
        # Resources' own health reports (a pool's state), by component name,
        # and the names of those whose last reading was not ok.
        self._checks: dict[str, Callable[[], Mapping[str, Any]]] = {}
        self._failing: set[str] = set()

    @property
    def phase(self) -> Phase:
        """The service's overall phase."""
        return self._phase

    @property
    def ready(self) -> bool:
        """True only while serving: what ``/readyz`` and gRPC ``SERVING`` report.

        Under workers, only while every worker serves (see :class:`Peers`);
        never while a resource's health check (:attr:`failing`) says not ok
        (read at each call).
        """
        peers = self._peers
        if self._phase is not Phase.SERVING or (peers is not None and not peers.ready):
            return False
        # Read now, so a probe never answers from a stale reading; the
        # resource's own poll wakes the readers that stream changes.
        for name in self._checks:
            self._poll_check(name)
        return not self._failing

    @property
    def failing(self) -> frozenset[str]:
        """Components whose own health check said not ok when last read."""
        return frozenset(self._failing)

    @property
    def live(self) -> bool:
        """True until the service has stopped: what ``/livez`` reports."""
        return self._phase is not Phase.STOPPED

    @property
    def components(self) -> Mapping[str, ComponentState]:
        """Read-only view of every component's state, in registration order."""
        return MappingProxyType(self._components)

    @property
    def version(self) -> int:
        """Increases on every change; pass it to :meth:`wait_changed`."""
        return self._version

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view for ``/healthz``: overall phase and each component."""
        snapshot: dict[str, Any] = {
            "status": self._phase.value,
            "components": {name: state.value for name, state in self._components.items()},
        }
        if self._checks:
            # Read now, so the details (a pool's connections in use) are current.
            checks = self._checks.items()
            snapshot["checks"] = {name: read_check(check)[1] for name, check in checks}
        if self._peers is not None:
            snapshot["workers"] = self._peers.snapshot()
        return snapshot

    async def wait_changed(self, since: int) -> int:
        """Wait until the version moves past ``since``; return the new version."""
        if self._version > since:
            # Still a checkpoint, as Trio's own async functions are: a
            # reader looping on a stale version must not starve the others.
            await trio.lowlevel.checkpoint()
        while self._version <= since:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
        return self._version

    # -- writer side: the supervisor only ---------------------------------

    def _share(self, peers: Peers) -> None:
        """Answer for every worker from now on (a worker process, before it runs)."""
        self._peers = peers
        peers.publish(self._phase)

    def _peers_changed(self) -> None:
        """Another worker (or the parent) changed: wake the readers that stream changes."""
        self._bump()

    def _set_phase(self, phase: Phase) -> None:
        if phase is not self._phase:
            self._phase = phase
            if self._peers is not None:
                self._peers.publish(phase)
            self._bump()

    def _add_check(self, name: str, check: Callable[[], Mapping[str, Any]]) -> None:
        """Have component ``name``'s own health report read by probes from now on."""
        self._checks[name] = check
        self._poll_check(name)

    def _poll_check(self, name: str) -> None:
        """Re-read ``name``'s check; readiness follows it, and readers wake on a change."""
        check = self._checks.get(name)
        if check is None:
            return
        ok = read_check(check)[0]
        if ok == (name in self._failing):
            if ok:
                self._failing.discard(name)
            else:
                self._failing.add(name)
            self._bump()

    def _remove_check(self, name: str) -> None:
        self._checks.pop(name, None)
        if name in self._failing:
            self._failing.discard(name)
            self._bump()

    def _set_component(self, name: str, state: ComponentState) -> None:
        if self._components.get(name) is not state:
            self._components[name] = state
            self._bump()

    def _bump(self) -> None:
        self._version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None


def read_check(check: Callable[[], Mapping[str, Any]]) -> tuple[bool, dict[str, Any]]:
    """What a health check says: ``(ok, details)``. A check that raises is not ok."""
    try:
        details = dict(check())
    except Exception as exc:  # a probe must answer whatever the resource does
        return False, {"ok": False, "error": type(exc).__name__}
    return details.get("ok") is True, details
