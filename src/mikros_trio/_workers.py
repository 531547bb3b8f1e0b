"""``workers = N``: one parent process, N worker processes each running the whole service.

The parent never runs the service itself. It has validated everything
(config, environment, container, graph: errors exit 2 before any worker
starts), then:

1. opens every listening socket the service declares, one set per worker
   slot, all bound to the same address with ``SO_REUSEPORT`` (see
   :mod:`._listen`: the kernel spreads connections over the slots; a slot's
   socket outlives its worker, so a replacement inherits it);
2. starts each worker as ``python -m mikros_trio.cli run TARGET`` in a
   process group of its own (a terminal's Ctrl-C reaches the parent only,
   which forwards it once), with its slot's sockets, one end of a socket
   pair (wake-ups both ways; its end-of-file tells a worker the parent is
   gone) and the path of the status board;
3. reports ready once every worker is ready, and not ready while any is not;
4. restarts a worker that dies (non-zero exit, killed), after a backoff
   that doubles from :data:`BACKOFF_FIRST` to :data:`BACKOFF_MAX`; a worker
   that fails before it is ready while the service has never been ready,
   or :data:`MAX_START_FAILURES` times in a row later, ends the service with
   its exit code: a deterministic failure (a port in use, a broken hook)
   is not retried forever;
5. on SIGTERM, SIGINT or SIGHUP turns readiness off in every worker at
   once, stops restarting, and forwards the signal; a second one is
   forwarded too, and forces the workers out as it forces a single
   process (the parent then exits 128 + N); workers still alive
   ``shutdown_timeout`` + :data:`KILL_MARGIN` after the first signal are
   killed (their code counts as 124);
6. exits with the largest exit code of its workers' last runs, or with the
   code of the worker it gave up on.

A worker that exits 0 on its own (its work is done, or someone sent it
SIGTERM directly) ends the service as a single process would end.

The status board is a small file mapped by every process: byte 0 is the
parent's (1 serving, 2 shutting down), byte 1 + i worker i's phase. A
worker's ``/readyz`` compares those bytes to "all serving": no message, no
lock, and a worker that begins shutting down is seen by every other
worker's next probe.

Metrics: with the metrics feature on, workers record into
prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, a
folder the parent owns), and a scrape of any worker adds them all up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import trio

from . import _listen
from ._definition import _WORKERS_MAX, Definition, parse_port
from ._health import Phase
from ._runtime_settings import GrpcSettings, HttpSettings
from ._supervisor import SIGNALS, LifecycleEvent
from ._watchdog import EXIT_CODE, MARGIN
from .features.settings import METRICS_PORT_ENV, MetricsSettings

if TYPE_CHECKING:
    from ._service import Service

__all__ = [
    "MAX_WORKERS",
    "Board",
    "WorkerLink",
    "listen_addresses",
    "run_workers",
    "worker_count",
    "worker_link",
]

log = logging.getLogger("mikros_trio.workers")

#: Largest ``workers`` (the schema's bound, and the CLI's).
MAX_WORKERS = _WORKERS_MAX
#: Seconds before the first restart of a worker; doubled at each crash in a row.
BACKOFF_FIRST = 0.1
#: Longest wait before a restart.
BACKOFF_MAX = 5.0
#: A worker that ran this many seconds before dying starts the backoff over.
STABLE_AFTER = 10.0
#: Failures before ready in a row, once the service has been ready, that end it.
MAX_START_FAILURES = 3
#: Seconds past shutdown_timeout the parent waits before killing a worker:
#: the worker's own watchdog acts at shutdown_timeout + MARGIN.
KILL_MARGIN = 2 * MARGIN

#: Seconds between repeats of a forcing signal to the workers still alive.
FORCE_REPEAT = 0.05

_PHASE_BYTES = {Phase.STARTING: 0, Phase.SERVING: 1, Phase.DRAINING: 2, Phase.STOPPED: 3}
_PARENT_SERVING, _PARENT_STOPPING = 1, 2
_NAMES = {code: phase.value for phase, code in _PHASE_BYTES.items()}


def worker_count(setting: int) -> int:
    """``setting`` as a number of processes: 0 is one per CPU this process may run on."""
    if setting:
        return setting
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- the status board ------------------------------------------------------------------


class Board:
    """The status block every process of the service maps: who serves, who stops.

    The parent creates it (:meth:`create`); a worker opens it with its slot
    and a ``notify`` callable that wakes the parent. Writes are single
    bytes, reads one slice: nothing to lock.
    """

    def __init__(
        self, path: Path, count: int, slot: int | None = None, notify: Callable[[], object] = list
    ) -> None:
        self.count = count
        self.slot = slot
        self._notify = notify
        self._size = count + 1
        self._serving = bytes([_PARENT_SERVING]) + bytes([_PHASE_BYTES[Phase.SERVING]]) * count
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), self._size)

    @classmethod
    def create(cls, path: Path, count: int) -> Board:
        path.write_bytes(bytes([_PARENT_SERVING]) + bytes(count))
        return cls(path, count)

    # -- Peers (a worker's health reads these) --

    @property
    def ready(self) -> bool:
        """Every worker serving, and the parent not shutting down."""
        return self._map[: self._size] == self._serving

    def publish(self, phase: Phase) -> None:
        assert self.slot is not None
        self._map[1 + self.slot] = _PHASE_BYTES[phase]
        self._notify()

    def snapshot(self) -> dict[str, Any]:
        phases = [_NAMES.get(b, "unknown") for b in self._map[1 : self._size]]
        return {
            "count": self.count,
            "serving": phases.count("serving"),
            "stopping": self._map[0] == _PARENT_STOPPING,
            "phases": phases,
        }

    # -- the parent's side --

    def phase_of(self, slot: int) -> int:
        return self._map[1 + slot]

    def set_phase(self, slot: int, phase: Phase) -> None:
        self._map[1 + slot] = _PHASE_BYTES[phase]

    def stopping(self) -> None:
        self._map[0] = _PARENT_STOPPING

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()


# -- the worker's side -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerLink:
    """What a worker process got from its parent: its slot, the board, the channel."""

    slot: int
    count: int
    board_path: Path
    channel: int  # file descriptor of this worker's end of the socket pair

    async def run(self, service: Service) -> int:
        """Run ``service`` as worker ``slot``: health joined to the board, the parent watched."""
        sender = socket.socket(fileno=os.dup(self.channel))
        sender.setblocking(False)

        def notify() -> None:
            # A full buffer already wakes the parent; a gone parent is seen by the reader.
            with contextlib.suppress(OSError):
                sender.send(b"!")

        board = Board(self.board_path, self.count, self.slot, notify)
        service.health._share(board)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_parent, service)
                code = await service.run()
                nursery.cancel_scope.cancel()
        finally:
            sender.close()
        if code != 0 and service.supervisor.failures:
            # The parent names the cause when it gives up on this worker.
            with contextlib.suppress(OSError):
                failure = service.supervisor.failures[0]
                self.board_path.with_name(f"failure-{self.slot}").write_text(str(failure))
        return code

    async def _watch_parent(self, service: Service) -> None:
        channel = trio.socket.from_stdlib_socket(socket.socket(fileno=self.channel))
        with channel:
            while True:
                try:
                    data = await channel.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    # Nobody would forward signals, restart or answer for the
                    # others any more: stop as if told to.
                    service.stop("the parent process is gone")
                    return
                service.health._peers_changed()


def worker_link() -> WorkerLink | None:
    """The link to the parent when this process is one of its workers, else None."""
    text = os.environ.get(_listen.WORKER_ENV)
    if not text:
        return None
    data = json.loads(text)
    return WorkerLink(
        int(data["slot"]), int(data["count"]), Path(data["board"]), int(data["channel"])
    )


# -- the parent ----------------------------------------------------------------------------


def listen_addresses(definition: Definition) -> list[tuple[str, int]]:
    """Every ``(host, port)`` the service's built-in kinds and features listen on."""
    addresses: list[tuple[str, int]] = []
    for kind in definition.kinds:
        settings = definition.runtime.get(kind)
        port = definition.port(kind)
        if isinstance(settings, HttpSettings) and port is not None:
            addresses.append((settings.host, port))
            if settings.admin_port is not None:
                addresses.append((settings.host, settings.admin_port))
        elif isinstance(settings, GrpcSettings) and port is not None:
            addresses.append((settings.host, port))
    metrics = definition.features.get("metrics")
    if metrics is not None and metrics.enabled and "http" not in definition.kinds:
        assert isinstance(metrics.settings, MetricsSettings)
        text = definition.environ.get(METRICS_PORT_ENV)
        port = parse_port(text.strip()) if text is not None else None
        addresses.append((metrics.settings.host, metrics.settings.port if port is None else port))
    return addresses


def metrics_enabled(definition: Definition) -> bool:
    metrics = definition.features.get("metrics")
    return metrics is not None and metrics.enabled


@dataclass
class _Slot:
    index: int
    sockets: list[socket.socket] = field(default_factory=list)
    process: trio.Process | None = None
    code: int = 0  # the exit code of its last run, as the parent counts it
    failures: int = 0  # exits before ready, in a row
    crashes: int = 0  # deaths in a row, for the backoff
    ready_seen: bool = False
    killed: bool = False  # by the parent, at the shutdown deadline
    spawning: bool = False
    keys: dict[str, list[int]] = field(default_factory=dict)  # address key → its fds
    sender: socket.socket | None = None  # the parent's end of the channel, for wake-ups


class _Pool:
    def __init__(
        self,
        command: Sequence[str],
        definition: Definition,
        count: int,
        on_event: Callable[[LifecycleEvent], None] | None,
    ) -> None:
        self.command = list(command)
        self.definition = definition
        self.count = count
        self.on_event = on_event
        self.slots = [_Slot(i) for i in range(count)]
        self.shutdown_timeout = definition.lifecycle.shutdown_timeout
        self.ready = False
        self.ever_ready = False
        self.reason: str | None = None  # why the shutdown began, once it has
        self.signal: int | None = None  # the signal that began the shutdown
        self.forced: int | None = None  # the second signal, once one came
        # The code of a worker the parent gave up on: the service's, whatever
        # the others make of the SIGTERM that follows (one already failing
        # takes it as a second signal, 143).
        self.verdict: int | None = None
        self.folder = Path(tempfile.mkdtemp(prefix="mikros-trio-"))
        self.board = Board.create(self.folder / "board", count)
        self.metrics = self.folder / "metrics" if metrics_enabled(definition) else None
        if self.metrics is not None:
            self.metrics.mkdir()
        self._wake_backoff = trio.Event()
        self._kill_at = trio.CancelScope()
        self._outer: trio.Nursery | None = None

    def stopping(self) -> bool:
        """Has the shutdown begun? (A method: it changes under every await.)"""
        return self.reason is not None

    def event(self, phase: str, detail: str = "") -> None:
        if self.on_event is not None:
            self.on_event(LifecycleEvent(trio.current_time(), "workers", phase, detail))

    # -- sockets --

    def open_sockets(self) -> dict[str, int]:
        """Each slot's sockets for every address; returns address key → bound port."""
        ports: dict[str, int] = {}
        for host, port in listen_addresses(self.definition):
            key = _listen.address_key(host, port)
            if key in ports:
                continue
            bound = port
            for slot in self.slots:
                group = _listen.bind_group(host, bound, reuse_port=True)
                bound = group[0].getsockname()[1]
                for sock in group:
                    sock.set_inheritable(True)
                slot.sockets.extend(group)
                slot.keys.setdefault(key, []).extend(s.fileno() for s in group)
            ports[key] = bound
        return ports

    def close_sockets(self) -> None:
        """Drop the parent's copies: a draining worker's close then really closes."""
        for slot in self.slots:
            if not slot.spawning:  # the spawn in flight closes its own after the fork
                _close_all(slot)

    # -- running --

    async def run(self) -> int:
        async with trio.open_nursery() as outer:
            self._outer = outer
            outer.start_soon(self._kill_late)
            async with trio.open_nursery() as nursery:
                for slot in self.slots:
                    nursery.start_soon(self._keep, slot)
            # Every worker has ended: a signal from now on has none to force.
            # Cleared before the nursery closes, since a signal's handler
            # runs between any two steps, the nursery's own exit included.
            self._outer = None
            outer.cancel_scope.cancel()
        self.event("stopped", f"exit code {self.exit_code}")
        return self.exit_code

    @property
    def exit_code(self) -> int:
        if self.verdict is not None:
            return self.verdict
        worst = max(slot.code for slot in self.slots)
        # Forced, as a single process is: 128 + N even if every worker
        # happened to end cleanly before the signal reached it.
        return worst if self.forced is None else max(worst, 128 + self.forced)

    async def _keep(self, slot: _Slot) -> None:
        """Run slot's worker; restart it while the service goes on."""
        while not self.stopping():
            started = trio.current_time()
            returncode = await self._run_once(slot)
            code = self._code(returncode)
            slot.code = code
            self.board.set_phase(slot.index, Phase.STOPPED if self.stopping() else Phase.STARTING)
            self._forget_metrics(slot)
            if self.stopping():
                if returncode == -signal.SIGKILL and slot.killed:
                    slot.code = EXIT_CODE
                return
            self._refresh()
            pid = slot.process.pid if slot.process is not None else "?"
            how = _describe_exit(returncode)
            if code == 0:
                log.info("worker %d (pid %s) exited 0: stopping the service", slot.index, pid)
                self.begin_shutdown(f"worker {slot.index} finished", None)
                return
            if not slot.ready_seen:
                slot.failures += 1
                limit = MAX_START_FAILURES if self.ever_ready else 1
                if slot.failures >= limit:
                    cause = self._failure_text(slot)
                    log.error(
                        "worker %d (pid %s) %s before it was ready%s: giving up, "
                        "stopping the service (exit code %d)",
                        slot.index,
                        pid,
                        how,
                        f" ({cause})" if cause else "",
                        code,
                    )
                    self.verdict = code
                    self.begin_shutdown(f"worker {slot.index} could not start", None)
                    return
            lived = trio.current_time() - started
            slot.crashes = 1 if lived >= STABLE_AFTER else slot.crashes + 1
            delay = min(BACKOFF_FIRST * 2 ** (slot.crashes - 1), BACKOFF_MAX)
            log.warning(
                "worker %d (pid %s) %s; restarting it in %.1f s", slot.index, pid, how, delay
            )
            self.event("restart", f"worker {slot.index} {how}")
            with trio.move_on_after(delay):
                await self._wake_backoff.wait()

    def _failure_text(self, slot: _Slot) -> str:
        path = self.folder / f"failure-{slot.index}"
        try:
            text = path.read_text().strip()
        except OSError:
            return ""
        path.unlink(missing_ok=True)
        return text.splitlines()[0] if text else ""

    async def _run_once(self, slot: _Slot) -> int:
        parent_end, child_end = socket.socketpair()
        slot.ready_seen = False
        env = dict(os.environ)
        env[_listen.WORKER_ENV] = json.dumps(
            {
                "slot": slot.index,
                "count": self.count,
                "board": str(self.folder / "board"),
                "channel": child_end.fileno(),
            }
        )
        env[_listen.ENV] = json.dumps(slot.keys)
        if self.metrics is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics)
        fds = [child_end.fileno(), *(s.fileno() for s in slot.sockets)]
        slot.spawning = True
        try:
            process = await trio.lowlevel.open_process(
                self.command,
                env=env,
                pass_fds=fds,
                # Its own group: a terminal's Ctrl-C reaches the parent, which forwards it once.
                process_group=0,
            )
        finally:
            slot.spawning = False
            child_end.close()
            if self.stopping():
                _close_all(slot)
        slot.process = process
        if self.stopping() and self.signal is not None:
            process.send_signal(self.signal)  # shutdown began while it was being spawned
        sender = socket.socket(fileno=os.dup(parent_end.fileno()))
        sender.setblocking(False)
        slot.sender = sender
        try:
            with trio.socket.from_stdlib_socket(parent_end) as channel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._listen, slot, channel)
                    returncode = await process.wait()
                    nursery.cancel_scope.cancel()
        finally:
            slot.sender = None
            sender.close()
        return returncode

    async def _listen(self, slot: _Slot, channel: trio.socket.SocketType) -> None:
        while True:
            try:
                data = await channel.recv(4096)
            except OSError:
                return
            if not data:
                return
            serving = self.board.phase_of(slot.index) == _PHASE_BYTES[Phase.SERVING]
            if serving and not slot.ready_seen:
                slot.ready_seen = True
                slot.failures = 0
            self._refresh()

    def _refresh(self) -> None:
        """Re-read the board: report ready/not ready, and wake every worker's readers."""
        ready = self.board.ready and not self.stopping()
        if ready and not self.ready:
            self.ready = self.ever_ready = True
            pids = ", ".join(str(s.process.pid) for s in self.slots if s.process is not None)
            log.info("all %d workers ready (pids %s)", self.count, pids)
            self.event("ready", f"{self.count} workers")
        elif self.ready and not ready:
            self.ready = False
            if not self.stopping():
                log.warning("not ready: a worker is not serving")
                self.event("not ready")
        for slot in self.slots:
            if slot.sender is not None:
                with contextlib.suppress(OSError):
                    slot.sender.send(b"!")

    def _code(self, returncode: int) -> int:
        if returncode >= 0:
            return returncode
        signum = -returncode
        # Killed by the very signal it was asked to stop with: it had not yet
        # set up its handlers (it was starting), and stopped as asked.
        if self.stopping() and self.forced is None and signum == self.signal:
            return 0
        return 128 + signum

    def _forget_metrics(self, slot: _Slot) -> None:
        if self.metrics is not None and slot.process is not None:
            from prometheus_client import multiprocess

            with contextlib.suppress(OSError):
                # Live gauges (in flight) of a dead worker no longer count.
                pid = slot.process.pid
                multiprocess.mark_process_dead(pid, str(self.metrics))  # type: ignore[no-untyped-call]

    # -- shutdown --

    def begin_shutdown(self, reason: str, signum: int | None) -> None:
        if self.stopping():
            return
        self.reason = reason
        self.signal = signum
        self.board.stopping()
        self._refresh()
        log.info("shutting down (%s)", reason)
        self.event("shutdown", reason)
        self.close_sockets()
        self._wake_backoff.set()
        self._signal_all(signum if signum is not None else signal.SIGTERM)
        if self.signal is None:
            self.signal = signal.SIGTERM
        self._kill_at.deadline = trio.current_time() + self.shutdown_timeout + KILL_MARGIN

    def on_signal(self, signum: int) -> None:
        if not self.stopping():
            self.begin_shutdown(signal.Signals(signum).name, signum)
            return
        # A second signal: the workers force their exit as a single process does.
        if self.forced is not None:
            return  # already forcing
        self.forced = signum
        log.warning("forced exit by %s: forwarding it to every worker", signal.Signals(signum).name)
        self.event("forced", signal.Signals(signum).name)
        if self._outer is not None:
            self._outer.start_soon(self._force_all, signum)

    async def _force_all(self, signum: int) -> None:
        """Send ``signum`` to every worker until all have ended (the kill deadline bounds it).

        Once is not enough: a signal sent while the same one is still
        pending in a worker (the forwarded first one) merges with it, and
        the worker would see one signal, a graceful stop. Any signal after
        a worker's shutdown began forces it, so repeating is harmless.
        """
        while any(s.process is not None and s.process.returncode is None for s in self.slots):
            self._signal_all(signum)
            await trio.sleep(FORCE_REPEAT)

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError, OSError):
                    slot.process.send_signal(signum)

    async def _kill_late(self) -> None:
        with self._kill_at:
            await trio.sleep_forever()
        if not self._kill_at.cancelled_caught:
            return  # every worker ended first
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                log.error(
                    "worker %d (pid %d) still running %g s after the shutdown began: killing it",
                    slot.index,
                    process.pid,
                    self.shutdown_timeout + KILL_MARGIN,
                )
                slot.killed = True
                with contextlib.suppress(ProcessLookupError, OSError):
                    process.kill()

    def cleanup(self) -> None:
        self.close_sockets()
        self.board.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _close_all(slot: _Slot) -> None:
    for sock in slot.sockets:
        sock.close()
    slot.sockets.clear()


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


@contextlib.contextmanager
def _parent_log() -> Iterator[None]:
    """The parent's lines go to stderr, plain: no service (and no logger feature) runs here."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mikros-trio workers: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.flush()


def _raise_fd_limit() -> None:
    # The parent holds a socket per address per worker, and a channel and a
    # process handle per worker: lift the soft limit as far as allowed.
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_workers(
    command: Sequence[str],
    definition: Definition,
    count: int,
    *,
    on_event: Callable[[LifecycleEvent], None] | None = None,
) -> int:
    """Run ``count`` workers of the service, each started with ``command``; the exit code."""
    with _parent_log():
        _raise_fd_limit()
        pool = _Pool(command, definition, count, on_event)
        token = trio.lowlevel.current_trio_token()

        def handler(signum: int, frame: FrameType | None) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(pool.on_signal, signum)

        for signum in SIGNALS:
            signal.signal(signum, handler)
        try:
            try:
                ports = pool.open_sockets()
            except OSError as error:
                log.error("%s", error.strerror or error)
                return 1
            pool.event("starting", f"{count} workers")
            where = ", ".join(f"{key.rsplit(':', 1)[0]}:{port}" for key, port in ports.items())
            log.info("starting %d workers%s", count, f" on {where}" if where else "")
            return await pool.run()
        finally:
            pool.cleanup()
            # Every worker has ended: a signal from now on has nothing to
            # stop, and must not kill the parent before it exits with the
            # workers' code (Python's finalization puts back the default
            # action of handled signals, not of ignored ones).
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
