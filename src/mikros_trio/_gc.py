"""The garbage collector while services serve: ``[lifecycle] gc_freeze`` and ``gc_threshold``.

A server allocates and frees thousands of small containers per second, and
CPython's defaults before 3.13 (a generation-0 collection every 700 net
allocations) make two costs grow with load:

- with many requests in flight, each young collection finds their objects
  alive and promotes them, so older generations fill with objects that die
  soon after, and full collections follow;
- every full collection rescans everything built at start: modules, the
  container, the app, the features' libraries.

So once every component is ready, the service raises the generation-0
threshold to at least ``gc_threshold`` (2000 is Python 3.13's own default)
and moves the objects built so far to the collector's permanent generation
(:func:`gc.freeze`), where collections no longer visit them. Both settings
are process-wide, so with several services in one process (tests) the
first one ready applies them and the last one to finish restores the
interpreter's threshold and unfreezes, which lets start-up objects that
became garbage meanwhile be collected again.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_serving = 0
_saved_threshold: tuple[int, ...] | None = None
_froze = False


class GcTuning:
    """One service's hold on the process's collector settings; :meth:`release` is idempotent."""

    __slots__ = ("_held",)

    def __init__(self, *, freeze: bool, threshold: int) -> None:
        global _serving, _saved_threshold, _froze
        self._held = True
        with _lock:
            _serving += 1
            current = gc.get_threshold()
            # Never lower a threshold the user (or a newer Python) set higher.
            if threshold > current[0]:
                if _saved_threshold is None:
                    _saved_threshold = current
                gc.set_threshold(threshold, *current[1:])
            if freeze:
                # Later services freeze what they built too; one unfreeze
                # at the end releases everything.
                gc.freeze()
                _froze = True

    def release(self) -> None:
        """Give the settings back; the last service serving restores them."""
        global _serving, _saved_threshold, _froze
        if not self._held:
            return
        self._held = False
        with _lock:
            _serving -= 1
            if _serving:
                return
            if _saved_threshold is not None:
                gc.set_threshold(*_saved_threshold)
                _saved_threshold = None
            if _froze:
                gc.unfreeze()
                _froze = False
