"""The watchdog: deadlines the Trio loop cannot hold up.

The supervisor bounds every phase with cancel-scope deadlines, but Trio
can only cancel at a checkpoint: a hook that shields itself
(``trio.CancelScope(shield=True)``) or blocks the thread (``time.sleep``)
keeps the process alive past any deadline. When the process belongs to
the service (:func:`mikros_trio.run`, the CLI), the supervisor also arms
this watchdog: a daemon thread with a deadline of its own. If the deadline
plus :data:`MARGIN` passes and the loop has not re-armed or disarmed it,
the watchdog logs what is stuck and where, flushes the logs and ends the
process with os._exit. It never runs in-process (tests), where ending the
process would end the test run.

It is the one thread the framework starts itself (besides
``trio.to_thread``'s): a deadline kept by the loop is no deadline when the
loop is what is stuck.

The margin gives the loop the first chance: a responsive loop acts at the
deadline itself (cancelling, recording the failure) and exits on its own
well within it.

:meth:`Watchdog.arm` only assigns one attribute and writes one byte to a
pipe, both safe in a signal handler, which runs between two bytecodes of
the main thread, possibly in the middle of the loop's own code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

__all__ = ["EXIT_CODE", "MARGIN", "Alarm", "Watchdog"]

log = logging.getLogger("mikros_trio")

#: Exit code when a deadline ended the process, as timeout(1) uses.
EXIT_CODE = 124

#: Seconds the watchdog waits past a deadline before it acts.
MARGIN = 1.0

#: Longest the last words (log lines, flushes) may take before the exit: a
#: blocked thread may hold a lock they need, and the exit must not wait on it.
LAST_WORDS_LIMIT = 0.5


@dataclass(frozen=True, slots=True)
class Alarm:
    """When the watchdog acts (``deadline``, its clock), the exit ``code`` and ``why``."""

    deadline: float
    code: int
    why: str


class Watchdog:
    """Ends the process when an armed deadline passes by :data:`MARGIN`.

    ``report`` returns lines saying what is stuck and where (the supervisor
    sets it), ``flush`` writes out buffered log lines; both run on the
    watchdog's side thread, bounded by :data:`LAST_WORDS_LIMIT`. ``clock``
    and ``exit`` are injectable so the deadline logic is testable without
    a thread (:meth:`due`, :meth:`fire`); :meth:`start` starts the thread,
    from the loop, never from a signal handler. Failure contract: whatever
    report and flush do (raise, hang), the process ends with the alarm's
    code.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        exit: Callable[[int], NoReturn] = os._exit,
        margin: float = MARGIN,
    ) -> None:
        self.report: Callable[[], Sequence[str]] = list
        self.flush: Callable[[], None] = _flush_standard_streams
        self._clock = clock
        self._exit = exit
        self._margin = margin
        self._alarm: Alarm | None = None
        self._thread: threading.Thread | None = None
        self._wake_read, self._wake_write = -1, -1

    @property
    def alarm(self) -> Alarm | None:
        """What the watchdog will do next, or ``None`` while disarmed."""
        return self._alarm

    def arm(self, delay: float, code: int, why: str, *, sooner: bool = False) -> None:
        """Act ``delay`` seconds from now plus the margin, unless re-armed or disarmed first.

        With ``sooner``, keep the current alarm if it comes earlier.
        Signal-safe: one assignment and one byte written to a pipe.
        """
        deadline = self._clock() + max(delay, 0.0) + self._margin
        current = self._alarm
        if sooner and current is not None and current.deadline <= deadline:
            return
        self._alarm = Alarm(deadline, code, why)
        self._wake()

    def start(self) -> None:
        """Start the watching thread (idempotent); until then an alarm is never acted on."""
        if self._thread is not None:
            return
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        thread = threading.Thread(target=self._watch, name="mikros-watchdog", daemon=True)
        self._thread = thread
        thread.start()

    def disarm(self) -> None:
        """Forget the alarm (the loop met its deadline)."""
        self._alarm = None
        self._wake()

    def due(self) -> Alarm | None:
        """The alarm, if its time has come."""
        alarm = self._alarm
        return alarm if alarm is not None and self._clock() >= alarm.deadline else None

    def fire(self, alarm: Alarm) -> NoReturn:
        """Log what is stuck, flush, and end the process with ``alarm.code``."""
        words = threading.Thread(
            target=self._last_words, args=(alarm,), name="mikros-watchdog-words", daemon=True
        )
        try:
            words.start()
            words.join(LAST_WORDS_LIMIT)
        except RuntimeError:
            # At interpreter shutdown no thread can start: speak from this one.
            self._last_words(alarm)
        self._exit(alarm.code)

    def _last_words(self, alarm: Alarm) -> None:
        with contextlib.suppress(Exception):
            log.critical(
                "watchdog: %s; the service did not end within %g s after it: "
                "ending the process with exit code %d",
                alarm.why,
                self._margin,
                alarm.code,
            )
            for line in self.report():
                log.critical("watchdog: still running: %s", line)
        with contextlib.suppress(Exception):
            self.flush()

    # -- the thread ----------------------------------------------------------

    def _wake(self) -> None:
        # A full pipe already wakes the thread; no pipe means no thread yet.
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_write, b"!")

    def _watch(self) -> None:
        while True:
            alarm = self._alarm
            timeout = None if alarm is None else max(alarm.deadline - self._clock(), 0.0)
            ready, _, _ = select.select([self._wake_read], [], [], timeout)
            if ready:
                os.read(self._wake_read, 4096)  # re-armed: read the new alarm
            alarm = self.due()
            if alarm is not None:
                self.fire(alarm)


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
