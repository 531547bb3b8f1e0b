"""The logger feature: one structured line per event, from every source, per service.

What it does: structlog is set up so that ``structlog.get_logger()`` and
``logging.getLogger()`` lines take the same road, a single handler on the
standard library's root logger, and come out with the same shape:
``timestamp`` (ISO 8601, UTC unless ``[log] local_timestamp``), ``level``,
``logger``, ``event``, then the service's ``service``, ``version``,
``product`` (when set) and ``deploy_env`` (``MIKROS_SERVICE_DEPLOY``,
``"local"`` when unset, as in Mikros), the static ``[log] attributes``, the
current call's ids (``request_id``, ``trace_id``…) and the line's own
fields. JSON lines when the output is not a terminal, structlog's coloured
console renderer when it is (``[log] format`` forces either).
``format = "mikros"`` writes JSON with Mikros Go's keys instead: ``time``,
``level`` (``INFO``, ``WARN``…), ``msg``, ``service.name``,
``service.type``, ``service.version``, ``service.env``,
``service.product``, then the same fields; no logger name (Go's lines
have none, and one log store holds both), an exception as ``error.message``
and ``stack``, an error line's caller as ``source``. On top of
that an observer gives each served call a request id and writes one access
line per HTTP request, gRPC call, worker iteration and script run, and a
line per lifecycle step of the service.

Design decisions:

- **Process-wide plumbing, per-service pipelines.** structlog and the
  logging root handler are configured once per process (both are global),
  but every service has its own :class:`LogPipeline` (level, renderer,
  output, identity). The handler picks the pipeline of the service whose
  task emitted the line through :func:`~mikros_trio.ext.current_telemetry`, so
  two services in one test process keep their own outputs and names; lines
  from outside any service go to the most recently started pipeline.
- **Everything through the standard library.** structlog hands its event
  dicts to stdlib loggers (``structlog.stdlib.LoggerFactory``), so levels,
  ``caplog`` and third-party handlers see structlog lines too, and one
  handler renders both kinds. The root logger's level follows ``[log]
  level`` (the lowest among running services) so libraries' debug calls
  stay a cheap level check; the handler adds itself and never removes the
  handlers others installed.
- **Ids read at write time.** A line takes the ids of
  :func:`~mikros_trio.ext.current_call` when it is written, so the order in
  which observers fill them in does not matter, and a handler's lines and
  its access line share the request id without anything being passed.
- **Request ids cross services.** A served call keeps an incoming
  ``x-request-id`` (or the header ``MIKROS_TRACKER_HEADER_NAME`` names, as
  in Mikros) when it is short and plain (at most 128 characters of
  ``A-Z a-z 0-9 _ . : / + = @ -``, so it cannot forge a header or a log
  field), else gets 32 random hex digits; HTTP responses echo it and the
  client calls made while serving send it on.
- **Levels of the access line.** ``info`` for a served call, ``error``
  when it failed (a 5xx, a server-side gRPC code, a failed iteration or
  script); a client's refusal (4xx, NOT_FOUND…) is the caller's business,
  not a problem of this service, so it stays ``info``. Client calls are
  ``debug`` (``warning`` when they fail): the served call's line and the
  handler's own handling already say what happened.
- **The access line skips the stdlib road.** It is on every request's hot
  path, so the observer builds its event dict and hands it to the
  pipeline's renderer directly: no ``LogRecord``, no handler lock.
- **Secrets never leave.** With secrets registered, a line's keys and
  text values are scanned once, together; when one shows a secret, every
  key and value is masked before the line is encoded (a mask knows each
  form of a secret, JSON-escaped included, not the JSON of its ``repr``).
  Console lines are masked again once rendered (the renderer lays out
  tracebacks itself). Without secrets none of this runs.
- **Python's own stderr output goes through the pipelines.** Warnings,
  exceptions escaping a thread and unraisable exceptions (a failing
  ``__del__``) are printed raw by ``warnings.showwarning``,
  ``threading.excepthook`` and ``sys.unraisablehook``: while a pipeline
  is live, ours write them as masked lines instead (see :class:`_Hooks`),
  and so does a log call whose arguments do not fit its format (logging's
  ``handleError`` prints them raw).
- **One write per interval, nothing lost at shutdown.** While the service
  runs, debug and info lines may wait ``flush_interval`` (10 ms by
  default) in the output's buffer, so a busy service makes one write
  system call per interval instead of one per line; warnings, errors and
  every line of the shutdown are flushed at once. A process killed
  outright (SIGKILL, the OOM killer) loses at most that interval's lines;
  ``flush_interval = 0`` flushes every line. A file is
  opened when the feature starts (or at the supervisor's first line, just
  before) and closed by a telemetry closer, after the supervisor's last
  line ("service stopped"). When the feature's component stops it only
  ends the deferred flushing: closers run later than any component.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Final, TypeAlias

import structlog
import trio

from mikros_trio._component import Component, Lifetime, Role
from mikros_trio._secrets import WEAK_LENGTH, Masker
from mikros_trio._telemetry import (
    QUIET,
    Call,
    Observer,
    Telemetry,
    current_call,
    current_telemetry,
)
from mikros_trio.errors import ConfigError, ConfigIssue
from mikros_trio.features.settings import LoggerSettings

if TYPE_CHECKING:
    from mikros_trio._container import BuildContext
    from mikros_trio._definition import Definition
    from mikros_trio._supervisor import LifecycleEvent

__all__ = [
    "ACCESS_LOGGER",
    "DEFAULT_DEPLOY",
    "LEVELS",
    "LIFECYCLE_LOGGER",
    "REQUEST_ID_HEADER",
    "TRACKER_HEADER_ENV",
    "LogPipeline",
    "build_logger",
    "deploy_env",
    "show_debug",
]

#: ``[log] level`` names and the stdlib levels they mean (Mikros' ``internal`` is debug).
LEVELS: Final = {
    "debug": logging.DEBUG,
    "internal": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_LEVEL_NAMES: Final = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


def _level_name(levelno: int) -> str:
    return _LEVEL_NAMES.get(levelno) or logging.getLevelName(levelno).lower()


_ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType | None]

#: The logger name of access lines (one per call) and of lifecycle lines.
ACCESS_LOGGER: Final = "mikros_trio.access"
LIFECYCLE_LOGGER: Final = "mikros_trio.lifecycle"

#: Keys a caller's line cannot take over: the ones every line starts with.
_HEAD = ("timestamp", "level", "logger", "event")

# A ``LogRecord``'s own attributes (plus what formatters add to it); any other
# attribute came from ``extra=`` and becomes a field of the line.
_RECORD_ATTRIBUTES: Final = frozenset(
    {*logging.makeLogRecord({}).__dict__, "message", "asctime", "taskName"}
)

# Marks the records structlog hands to the standard library (their msg is the event dict).
_FROM_STRUCTLOG: Final = "_mikros_trio_structlog"

# An incoming request id is kept only if it is short and made of characters
# that cannot break a header or a log line; anything else gets a new id.
_SANE_ID = re.compile(r"[\w.:/+=@-]{1,128}", re.ASCII)

# Characters some line readers break lines at, which the JSON encoder leaves raw.
_JSON_LINE_BREAKS: Final = {0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\u0085"}

# Plain-line heads (level, logger, event) a pipeline keeps rendered.
_HEADS_KEPT: Final = 1024

# Levels whose lines may wait for the periodic flush; others are flushed at once.
_DEFERRABLE: Final = frozenset({"debug", "info", "DEBUG", "INFO"})

#: ``format = "mikros"``: level names as Mikros Go's slog handler writes them.
_MIKROS_LEVELS: Final = {
    **{levelno: name.upper() for levelno, name in _LEVEL_NAMES.items()},
    logging.WARNING: "WARN",
    logging.CRITICAL: "FATAL",
}


def _mikros_level_name(levelno: int) -> str:
    return _MIKROS_LEVELS.get(levelno) or logging.getLevelName(levelno).upper()


#: The request id header when ``MIKROS_TRACKER_HEADER_NAME`` is unset, as in Mikros.
REQUEST_ID_HEADER: Final = "x-request-id"

#: Mikros' deploy environment when ``MIKROS_SERVICE_DEPLOY`` is unset (Go and Rust alike).
DEFAULT_DEPLOY: Final = "local"


# -- the line ---------------------------------------------------------------


class _Clock:
    """ISO 8601 timestamps with microseconds; the date-time part is cached per second.

    UTC (``…Z``) by default; ``local`` gives the local time and its UTC
    offset (``…-03:00``), as Mikros Rust's ``local_timestamp`` and Go's
    ``time.Now()`` write it. The offset is read per second, so a daylight
    saving change shows at the next second.
    """

    __slots__ = ("_cached", "_local")

    def __init__(self, *, local: bool = False) -> None:
        self._local = local
        # One tuple, swapped whole: threads never see a second with another's prefix.
        self._cached = (-1, "", "Z")

    def format(self, now: float) -> str:
        second = int(now)
        cached = self._cached
        if cached[0] != second:
            if self._local:
                moment = time.localtime(second)
                minutes = (moment.tm_gmtoff or 0) // 60
                sign = "-" if minutes < 0 else "+"
                offset = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
            else:
                moment, offset = time.gmtime(second), "Z"
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", moment), offset)
            self._cached = cached
        return f"{cached[1]}.{int((now - second) * 1e6):06d}{cached[2]}"


def _json_default(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return object.__repr__(value)


_encode_json = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), default=_json_default
).encode

#: How that encoder writes a string (``ensure_ascii=False``): the same escaping.
_encode_str: Callable[[str], str] = json.encoder.encode_basestring

_KEYS_JSON: dict[str, str] = {}


def _key_json(key: str) -> str:
    """``,"key":``, rendered once per key (few: the access line's and the ids')."""
    found = _KEYS_JSON.get(key)
    if found is None:
        found = f",{_encode_str(key)}:"
        if len(_KEYS_JSON) < 256:  # ids are named by observers: bounded all the same
            _KEYS_JSON[key] = found
    return found


_PLAIN: Final = frozenset({int, float, bool})


def _joined(event: str, ids: dict[str, str], fields: Sequence[tuple[str, str | float]]) -> str:
    """The text values of an access line, NUL-separated: one text to scan for secrets."""
    texts = [event, *ids.values()]
    texts += (value for _, value in fields if type(value) is str)
    return "\x00".join(texts)


def _shows_secret(line: dict[str, Any], masker: Masker) -> bool:
    """Whether ``line`` may show a secret: one scan of its keys and text values together.

    A structured value (a dict, a list, an object) is masked whatever it
    holds: :func:`_masked` walks it.
    """
    texts = [*line]  # keys too: a caller's extra= names them
    for key, value in line.items():
        if type(value) is str:
            texts.append(value)
        elif not (value is None or type(value) in _PLAIN or key == "exc_info"):
            return True
    return masker.shows("\x00".join(texts))


def _masked(line: dict[str, Any], mask: Callable[[str], str]) -> dict[str, Any]:
    """``line`` with every key and value masked, before it is encoded.

    Before, not after: a mask knows every escaped form of a secret, not a
    form escaped twice (the JSON of a repr). ``exc_info`` is left for the
    console renderer, whose output is masked whole.
    """
    masked: dict[str, Any] = {}
    for key, value in line.items():
        if type(value) is str:
            value = mask(value)
        elif not (value is None or type(value) in _PLAIN or key == "exc_info"):
            value = _scrub(value, mask)
        masked[mask(key)] = value
    return masked


def _scrub(value: Any, redact: Callable[[str], str]) -> Any:
    """``value`` with every string in it masked; other objects become masked strings."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {_scrub_key(key, redact): _scrub(item, redact) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item, redact) for item in value]
    return redact(_json_default(value))


def _scrub_key(key: Any, redact: Callable[[str], str]) -> Any:
    """A dict key as JSON can write it (bytes, tuples… become text), masked."""
    if key is None or isinstance(key, bool | int | float):
        return key
    return redact(key if isinstance(key, str) else _json_default(key))


def _exc_info(value: Any) -> _ExcInfo | None:
    """Normalise an ``exc_info`` field (True, an exception, a tuple) as logging does."""
    if value is None or value is False:
        return None
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and value[0] is not None:
        return value
    found = sys.exc_info()
    return found if found[0] is not None else None


class LogPipeline:
    """One service's log output: its level, identity fields, renderer and stream.

    The logger feature builds one per service and publishes it on the
    service's telemetry hub (``telemetry.get(LogPipeline)``). Lines reach
    it through logging/structlog (routed by the service their task runs
    in) or directly through :meth:`log`, which features use for lines on a
    hot path. Example::

        pipeline = running.service.telemetry.get(LogPipeline)
        pipeline.log(logging.INFO, "cache warmed", logger="my_app", entries=120)
    """

    def __init__(
        self,
        telemetry: Telemetry,
        *,
        level: str = "info",
        format: str = "auto",
        output: str = "stdout",
        attributes: dict[str, Any] | None = None,
        error_stack_trace: str = "default",
        access_log: bool = True,
        flush_interval: float = 0.0,
        local_timestamp: bool = False,
        display_errors: bool = True,
        request_header: str = REQUEST_ID_HEADER,
        kinds: Sequence[str] = (),
        product: str = "",
        deploy_env: str = "",
    ) -> None:
        self.telemetry = telemetry
        #: The ``[log] level`` as a stdlib level; the root logger goes no lower.
        self.config_levelno = LEVELS[level]
        #: Lines below this level are dropped (``verbose`` lowers it to debug).
        self.levelno = self.config_levelno
        self.output = output
        self.access_log = access_log
        #: Whether a failed call's access line carries its error (Mikros Rust's display_errors).
        self.display_errors = display_errors
        #: The header a served call's request id is read from and echoed in (lower case).
        self.request_header = request_header.lower()
        self._clock = _Clock(local=local_timestamp)
        #: Seconds a debug or info line may wait in the output's buffer (0: none).
        self.flush_interval = flush_interval
        # While the flusher runs (see flush_periodically): set to wake it, and
        # the thread whose lines it may defer (the service's Trio thread).
        self._wake: trio.Event | None = None
        self._loop_thread = 0
        # The stream holding deferred lines (sys.stdout may be swapped meanwhile).
        self._unflushed: IO[str] | None = None
        self.error_stack_trace = error_stack_trace
        self._file: IO[str] | None = None
        self._is_file = output not in ("stdout", "stderr")
        self._stream_name = "stderr" if self._is_file else output
        # Re-entrant: a finaliser that fails while this thread writes a line
        # (the collector runs at any allocation) reports through
        # sys.unraisablehook, which writes a line here too.
        self._lock = threading.RLock()
        self.live = False
        self.closed = False
        tty = self._is_terminal()
        #: ``"json"``, ``"mikros"`` or ``"console"``, decided once: never an ``isatty`` per line.
        self.format = ("console" if tty else "json") if format == "auto" else format
        mikros = self.format == "mikros"
        # The head's keys: time, level, logger (not in Mikros' lines), message.
        self._keys: tuple[str, str, str | None, str] = (
            ("time", "level", None, "msg") if mikros else _HEAD
        )
        self._level_name = _mikros_level_name if mikros else _level_name
        self._open_json = '{"time":"' if mikros else '{"timestamp":"'
        self._console: Callable[[Any, str, dict[str, Any]], Any] | None = None
        if self.format == "console":
            colors = tty and "NO_COLOR" not in os.environ
            self._console = structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False)
        # Identity fields of every line, in order, then the attributes.
        deploy = deploy_env or DEFAULT_DEPLOY
        static: dict[str, Any] = {}
        if mikros:
            # Mikros Go's fixed attributes, with its values (types joined by
            # commas, an unset deploy environment is "local", an empty product
            # is written): a query over Go and Python lines sees one shape.
            static["service.name"] = telemetry.service
            static["service.type"] = ",".join(kinds)
            static["service.version"] = telemetry.version
            static["service.env"] = deploy
            static["service.product"] = product
        else:
            if telemetry.service:
                static["service"] = telemetry.service
            if telemetry.version:
                static["version"] = telemetry.version
            if product:
                static["product"] = product
            if telemetry.service:  # a service's line, not the last-resort pipeline's
                static["deploy_env"] = deploy
        static.update(attributes or {})
        self._static = static
        # The same fields rendered once, for lines written by write_plain(),
        # and the keys an id must not repeat there.
        self._static_json = "," + _encode_json(static)[1:-1] if static else ""
        self._reserved = frozenset((*_HEAD, *(key for key in self._keys if key)))
        self._taken = self._reserved | frozenset(static)
        # (level, logger, event) -> write_plain's rendering of them (see _head).
        self._heads: dict[tuple[int, str, str], tuple[str, bool]] = {}

    def _is_terminal(self) -> bool:
        if self.output not in ("stdout", "stderr"):
            return False
        stream = getattr(sys, self.output)
        try:
            return stream is not None and bool(stream.isatty())
        except (AttributeError, ValueError):
            return False

    # -- life ----------------------------------------------------------

    def open(self) -> None:
        """Open the output (a file is opened for appending) and start taking lines.

        From now on lines of this service's tasks come here, and so do
        lines from outside any service (it is the latest pipeline).
        """
        if self.live or self.closed:
            return
        if self._is_file:
            with self._lock:
                self._open_file()
        self.live = True
        _ROUTER.add(self)

    def _open_file(self) -> IO[str]:
        if self._file is None:
            self._file = open(  # noqa: SIM115 - closed by close(), after the last line
                self.output, "a", encoding="utf-8", errors="backslashreplace"
            )
        return self._file

    def close(self) -> None:
        """Flush and close the output; later lines go to the next live pipeline. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.live = False
        _ROUTER.remove(self)
        with self._lock:
            self._flush_deferred()
            file, self._file = self._file, None
            if file is not None:
                file.close()
            else:
                self._flush_stream()

    async def flush_periodically(self) -> None:
        """Let debug and info lines wait up to ``flush_interval`` in the buffer, until cancelled.

        One write system call per interval instead of one per line, on a
        busy service. The wait starts at the first buffered line, so an
        idle service never wakes up for it. Warnings and errors, lines from
        other threads, and every line once this returns are flushed as
        they are written.
        """
        if self.flush_interval <= 0:
            return
        self._loop_thread = threading.get_ident()
        try:
            while True:
                wake = self._wake = trio.Event()
                await wake.wait()
                await trio.sleep(self.flush_interval)
                with self._lock:
                    self._flush_deferred()
        finally:
            with self._lock:
                self._wake = None
                self._flush_deferred()

    def flush(self) -> None:
        """Write out the lines waiting for the periodic flush now."""
        with self._lock:
            self._flush_deferred()

    def _flush_deferred(self) -> None:
        """Flush the stream holding deferred lines, if any (under the lock)."""
        stream, self._unflushed = self._unflushed, None
        if stream is not None:
            # The stream was closed under us: nothing left to flush.
            with contextlib.suppress(OSError, ValueError):
                stream.flush()

    def _flush_stream(self) -> None:
        stream = getattr(sys, self._stream_name, None)
        if stream is not None:
            # stdout closed under us: nothing left to flush.
            with contextlib.suppress(OSError, ValueError):
                stream.flush()

    # -- lines ---------------------------------------------------------

    def enabled(self, levelno: int) -> bool:
        """Whether a line at ``levelno`` would be written."""
        return levelno >= self.levelno

    def log(
        self,
        levelno: int,
        event: str,
        /,
        *,
        logger: str = "mikros_trio",
        exc_info: Any = None,
        **fields: Any,
    ) -> None:
        """Write one line at ``levelno`` straight through this pipeline (no stdlib logging).

        Carries the same fields as every other line: identity, attributes
        and the current call's ids.
        """
        if levelno < self.levelno:
            return
        line = self.head(levelno, logger, event, time.time())
        line.update(fields)
        self.emit(line, _exc_info(exc_info))

    def head(self, levelno: int, logger: str, event: Any, now: float) -> dict[str, Any]:
        """The first fields of a line: time, level, logger, event, identity, call ids."""
        time_key, level_key, logger_key, event_key = self._keys
        line: dict[str, Any] = {
            time_key: self._clock.format(now),
            level_key: self._level_name(levelno),
        }
        if logger_key is not None:
            line[logger_key] = logger
        line[event_key] = event
        line.update(self._static)
        call = current_call()
        if call is not None and call.ids:
            line.update(call.ids)
        return line

    def write_plain(
        self,
        levelno: int,
        logger: str,
        event: str,
        ids: dict[str, str],
        fields: Sequence[tuple[str, str | float]],
        keys: frozenset[str] | None = None,
    ) -> None:
        """Write a line of plain fields (strings and floats) after the head and ``ids``.

        The same line as ``head()`` + ``ids`` + ``fields`` through :meth:`emit`,
        rendered straight to JSON text: no dict, no encoder object. It is
        the access line's road (one per call), so it stays short: the
        console format, and keys that would repeat another field, take
        :meth:`emit`'s. ``keys``, when given, holds every key ``fields``
        may use (a caller's fixed vocabulary: one set test per line).
        """
        masker = self.telemetry.masker
        # One scan of every value at once (NUL is in no form of a secret, so
        # none spans two values): a line showing a secret takes emit's road,
        # which masks each value before encoding it.
        slow = self._console is not None or (
            masker is not None and masker.shows(_joined(event, ids, fields))
        )
        if ids and not slow:
            # An id named like another field of the line: emit's road too.
            slow = not self._taken.isdisjoint(ids) or (
                any(key in ids for key, _ in fields) if keys is None else not keys.isdisjoint(ids)
            )
        if slow:
            line = self.head(levelno, logger, event, time.time())
            line.update(ids)
            line.update(fields)
            self.emit(line)
            return
        # The rest of the line is the code's own text (names, keys, the
        # configured identity): nothing else to mask.
        head = self._heads.get((levelno, logger, event))
        if head is None:
            head = self._head(levelno, logger, event)
        known = _KEYS_JSON
        parts = [self._open_json, self._clock.format(time.time()), head[0]]
        append = parts.append
        for key, text in ids.items():
            append(known.get(key) or _key_json(key))
            append(_encode_str(text))
        for key, value in fields:
            append(known.get(key) or _key_json(key))
            # float.__repr__ is what the JSON encoder writes for a float.
            append(_encode_str(value) if isinstance(value, str) else float.__repr__(value))
        append("}")
        self._write("".join(parts), head[1])

    def _head(self, levelno: int, logger: str, event: str) -> tuple[str, bool]:
        """A plain line's text from the level to the identity fields, and whether it is urgent.

        Kept for the next line alike (access lines repeat their method and
        status), up to a bound: an event holding a raw path may never repeat.
        """
        name = self._level_name(levelno)
        named = "" if self._keys[2] is None else f',"logger":{_encode_str(logger)}'
        text = (
            f'","level":{_encode_str(name)}{named},'
            f'"{self._keys[3]}":{_encode_str(event)}{self._static_json}'
        )
        head = (text, name not in _DEFERRABLE)
        if len(self._heads) < _HEADS_KEPT:
            self._heads[levelno, logger, event] = head
        return head

    def emit(self, line: dict[str, Any], exc_info: _ExcInfo | None = None) -> None:
        """Render ``line`` (and the exception, per ``[log] error_stack_trace``) and write it."""
        if exc_info is not None:
            self._add_exception(line, exc_info)
        masker = self.telemetry.masker
        if masker is not None and _shows_secret(line, masker):
            line = _masked(line, masker.mask)
        console = self._console
        if console is None:
            text = _encode_json(line)
        else:
            text = str(console(None, "", line))
            if masker is not None:
                # The console renderer lays out the traceback itself: mask what it wrote.
                text = masker.mask(text)
        self._write(text, line.get("level") not in _DEFERRABLE)

    def _add_exception(self, line: dict[str, Any], exc_info: _ExcInfo) -> None:
        mode = self.error_stack_trace
        if self._keys[2] is None:
            # Mikros' keys: the error's text as its logger.Error field writes
            # it, the stack (both modes but disabled) as Go main's structured one.
            line["error.message"] = "".join(traceback.format_exception_only(exc_info[1])).strip()
            if mode != "disabled":
                line["stack"] = "".join(traceback.format_exception(*exc_info)).rstrip()
        elif mode == "disabled":
            line["exception"] = "".join(traceback.format_exception_only(exc_info[1])).strip()
        elif self._console is not None:
            line["exc_info"] = exc_info  # the console renderer lays the traceback out
        elif mode == "structured":
            transform = structlog.tracebacks.ExceptionDictTransformer(
                show_locals=False, use_rich=False
            )
            line["exception"] = transform(exc_info)
        else:
            line["exception"] = "".join(traceback.format_exception(*exc_info)).rstrip()

    def _write(self, text: str, urgent: bool = True) -> None:
        if self._console is None and ("\u2028" in text or "\u2029" in text or "\x85" in text):
            # Valid in JSON strings, but line breaks to Python's splitlines()
            # and JavaScript: a client's path must not split a line in two.
            text = text.translate(_JSON_LINE_BREAKS)
        with self._lock:
            stream = self._file
            if stream is None:
                if self._is_file and not self.closed:
                    # A line before the feature started (the supervisor's
                    # first lifecycle step): open now, the closer will close.
                    stream = self._open_file()
                else:
                    # Looked up per line, as print() does: pytest's capture
                    # and a user's redirection of sys.stdout are honoured. A
                    # closed file falls back to stderr.
                    stream = getattr(sys, self._stream_name, None)
                    if stream is None:
                        return
            try:
                stream.write(text + "\n")
            except UnicodeEncodeError:
                stream.write(text.encode("ascii", "backslashreplace").decode("ascii") + "\n")
            wake = self._wake
            if wake is None or urgent or threading.get_ident() != self._loop_thread:
                if self._unflushed is not None and self._unflushed is not stream:
                    self._flush_deferred()
                self._unflushed = None
                stream.flush()  # everything before this line too, in order
            else:
                self._unflushed = stream
                if not wake.is_set():
                    wake.set()

    def write_record(self, record: logging.LogRecord) -> None:
        """Write a standard-library record (one structlog made, or any other)."""
        message = record.msg
        exc_info: _ExcInfo | None = None
        if getattr(record, _FROM_STRUCTLOG, False) and isinstance(message, dict):
            line = self.head(record.levelno, record.name, message.get("event"), record.created)
            reserved = self._reserved
            for key, value in message.items():
                if key == "exc_info":
                    exc_info = _exc_info(value)
                elif key not in reserved:
                    line[key] = value
        else:
            line = self.head(record.levelno, record.name, record.getMessage(), record.created)
            structlog.contextvars.merge_contextvars(None, "", line)
            for key, value in record.__dict__.items():
                if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                    line[key] = value
            if record.stack_info:
                line["stack"] = record.stack_info
        if exc_info is None and record.exc_info and record.exc_info[0] is not None:
            exc_info = record.exc_info
        if self._keys[2] is None and record.levelno >= logging.ERROR:
            # Mikros Go's error lines name their caller: function, "dir/file", line.
            path = Path(record.pathname)
            line["source"] = {
                "function": f"{record.module}.{record.funcName}",
                "file": f"{path.parent.name}/{path.name}",
                "line": record.lineno,
            }
        self.emit(line, exc_info)

    def __repr__(self) -> str:
        state = "live" if self.live else "closed" if self.closed else "built"
        return f"<LogPipeline {self.telemetry.service!r} {self.format} -> {self.output} {state}>"


# -- process-wide routing ---------------------------------------------------


class _Router:
    """The pipelines taking lines in this process, and the process-wide set-up."""

    def __init__(self) -> None:
        self.live: list[LogPipeline] = []
        self._handler = _Handler()
        self._default: LogPipeline | None = None
        # The root level before the first service started; None until then.
        self._initial_level: int | None = None

    def add(self, pipeline: LogPipeline) -> None:
        self.install()
        if not self.live:
            _HOOKS.install()
        self.live.append(pipeline)
        self._set_root_level()

    def remove(self, pipeline: LogPipeline) -> None:
        if pipeline in self.live:
            self.live.remove(pipeline)
            self._set_root_level()
            if not self.live:
                _HOOKS.uninstall()
            masker = pipeline.telemetry.masker
            if masker is not None:
                # A line written after the service is gone (the exit's last
                # warnings, a test process going on) still masks its secrets.
                hub = self._fallback().telemetry
                hub.masker = (hub.masker or Masker()).with_secrets(masker.secrets)

    def route(self) -> LogPipeline:
        """The pipeline of the service this code runs in, else the latest live one."""
        telemetry = current_telemetry()
        if telemetry is not None:
            try:
                pipeline = telemetry.get(LogPipeline)
            except LookupError:
                pass
            else:
                if pipeline.live:
                    return pipeline
        if self.live:
            return self.live[-1]
        return self._fallback()

    def _fallback(self) -> LogPipeline:
        if self._default is None:
            # Lines after every service has closed (a test process goes
            # on): plain, to stderr, as Python's last-resort handler would.
            self._default = LogPipeline(Telemetry(), output="stderr")
        return self._default

    def _set_root_level(self) -> None:
        root = logging.getLogger()
        if self.live:
            root.setLevel(min(p.config_levelno for p in self.live))
        elif self._initial_level is not None:
            root.setLevel(self._initial_level)  # every service is gone: as we found it

    def install(self) -> None:
        """Configure structlog once per process; make sure the root handler is in place.

        The handler is checked at every service start: ``basicConfig(force=True)``
        or a test harness may have removed it since.
        """
        root = logging.getLogger()
        if self._handler not in root.handlers:
            root.addHandler(self._handler)
        if self._initial_level is not None:
            return
        self._initial_level = root.level
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.PositionalArgumentsFormatter(),
                _to_stdlib,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=_BoundLogger,
            cache_logger_on_first_use=True,
        )


class _BoundLogger(structlog.stdlib.BoundLogger):
    """structlog's stdlib logger, with the level check before any event dict is built.

    Filtered calls (a ``debug`` in production) then cost one level lookup,
    as they do with stdlib loggers, instead of a pass through the processors.
    """

    def _proxy_to_logger(
        self, method_name: str, event: str | None = None, *event_args: str, **event_kw: Any
    ) -> Any:
        logger = self._logger
        level = _STRUCTLOG_LEVELS.get(method_name, logging.CRITICAL)
        if logger.disabled or level < logger.getEffectiveLevel():
            return None
        return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)


_STRUCTLOG_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def _to_stdlib(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> tuple[Any, ...]:
    """Last structlog processor: hand the event dict to the stdlib logger as the record's msg."""
    return (event_dict,), {"extra": {_FROM_STRUCTLOG: True}}


class _Handler(logging.Handler):
    """The root handler: every record goes to the pipeline of the service that emitted it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            pipeline = _ROUTER.route()
            if record.levelno >= pipeline.levelno:
                pipeline.write_record(record)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """Report a line that could not be written (``log.info("%d", "x")``), masked.

        The standard library's version prints the record's message and
        arguments, raw, to stderr: the arguments are often the very values
        the line was about.
        """
        with contextlib.suppress(Exception):  # nothing left to report it with
            _ROUTER.route().log(
                logging.ERROR,
                f"a log line from {record.name} could not be written",
                exc_info=sys.exc_info(),
                message=str(record.msg),
                arguments=repr(record.args),
                source=f"{record.pathname}:{record.lineno}",
            )


_ROUTER = _Router()


# -- Python's own printers: warnings, thread and unraisable exceptions --------


class _Hooks:
    """Routes what Python prints to stderr itself through the pipelines, masked.

    ``warnings.showwarning``, ``threading.excepthook`` and
    ``sys.unraisablehook`` write a warning or an exception (its message and
    traceback) raw to stderr, where no masking and no JSON reach it. While
    any pipeline is live they are replaced by hooks that write a line
    (``py.warnings`` at warning, ``mikros_trio`` at error, with the
    traceback) to the pipeline of the service the code runs for; the
    previous hooks come back when the last pipeline closes, unless someone
    replaced ours meanwhile.

    A previous hook that is not Python's own printer (pytest's, which turns
    thread and unraisable exceptions into test failures and records
    warnings; a user's) is called after ours: a test harness keeps seeing
    what it watches for. Python's own printer is not: it is the raw stderr
    output being replaced.
    """

    def __init__(self) -> None:
        self._saved: tuple[Any, Any, Any] | None = None

    def install(self) -> None:
        if self._saved is not None:
            return
        self._saved = (warnings.showwarning, threading.excepthook, sys.unraisablehook)
        warnings.showwarning = self.showwarning
        threading.excepthook = self.excepthook
        sys.unraisablehook = self.unraisablehook

    def uninstall(self) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        if warnings.showwarning == self.showwarning:
            warnings.showwarning = saved[0]
        if threading.excepthook == self.excepthook:
            threading.excepthook = saved[1]
        if sys.unraisablehook == self.unraisablehook:
            sys.unraisablehook = saved[2]

    def _previous(self, index: int) -> Any:
        saved = self._saved
        return None if saved is None else saved[index]

    def showwarning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: IO[str] | None = None,
        line: str | None = None,
    ) -> None:
        previous = self._previous(0)
        if file is not None and previous is not None:
            # A caller naming its own file asked for that file (as logging.captureWarnings).
            previous(message, category, filename, lineno, file, line)
            return
        with contextlib.suppress(Exception):  # a warning must never break the code warning
            logging.getLogger("py.warnings").warning(
                "%s: %s",
                category.__name__,
                message,
                extra={"category": category.__name__, "source": f"{filename}:{lineno}"},
            )
        if previous is not None and _records_warnings(previous):
            previous(message, category, filename, lineno, file, line)

    def excepthook(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:  # as Python's hook: a thread may exit so
            with contextlib.suppress(Exception):
                thread = args.thread.name if args.thread is not None else "unknown"
                logging.getLogger("mikros_trio").error(
                    "uncaught exception in thread %s",
                    thread,
                    exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
                )
        previous = self._previous(1)
        if previous is not None and previous is not threading.__excepthook__:
            previous(args)

    def unraisablehook(self, unraisable: Any) -> None:
        with contextlib.suppress(Exception):
            try:
                where = repr(unraisable.object) if unraisable.object is not None else ""
            except Exception:
                where = object.__repr__(unraisable.object)
            heading = unraisable.err_msg or "Exception ignored in"
            value = unraisable.exc_value or unraisable.exc_type()
            logging.getLogger("mikros_trio").error(
                "%s: %s" if where else "%s",
                heading,
                *((where,) if where else ()),
                exc_info=(unraisable.exc_type, value, unraisable.exc_traceback),
            )
        previous = self._previous(2)
        if previous is not None and previous is not sys.__unraisablehook__:
            previous(unraisable)


#: Python's own ``warnings.showwarning``: whatever it calls writes the warning out.
_PYTHON_SHOWWARNING: Final = getattr(warnings, "_showwarning_orig", warnings.showwarning)


def _records_warnings(previous: Any) -> bool:
    """Whether ``previous`` keeps warnings somewhere rather than printing them raw.

    Any hook but Python's own does what its owner wants. Python's own hook
    records into a list inside ``warnings.catch_warnings(record=True)``
    (how pytest watches warnings) and prints to stderr otherwise.
    """
    if previous is not _PYTHON_SHOWWARNING:
        return True
    write = getattr(warnings, "_showwarnmsg_impl", None)
    return isinstance(getattr(write, "__self__", None), list)


_HOOKS = _Hooks()


# -- the observer: request ids, access lines, lifecycle lines ---------------


#: Every key of an access line after the ids (see ``_LogObserver.finished``).
_ACCESS_FIELDS: Final = frozenset(
    {"kind", "side", "name", "method", "target", "path", "status", "duration_ms"}
    | {"error_kind", "error"}
)


def _new_request_id() -> str:
    """A fresh random request id: 32 lower-case hex digits.

    From the ``random`` module, not ``os.urandom``: an id to correlate log
    lines needs uniqueness, not secrecy, and skips a system call per request.
    """
    return f"{random.getrandbits(128):032x}"


class _LogObserver(Observer):
    """Gives server and internal calls a request id and writes the access and lifecycle lines."""

    def __init__(self, pipeline: LogPipeline) -> None:
        self._pipeline = pipeline
        self._access = pipeline.access_log
        self._errors = pipeline.display_errors
        self._header = pipeline.request_header

    def started(self, call: Call) -> None:
        side = call.side
        header = self._header
        if side == "server":
            incoming = call.header(header)
            request_id = (
                incoming
                if incoming is not None and _SANE_ID.fullmatch(incoming)
                else _new_request_id()
            )
            call.ids["request_id"] = request_id
            if call.kind == "http":
                call.outgoing[header] = request_id
        elif side == "internal":
            # A worker iteration or script run is a unit of work as a
            # request is: its lines, and the services it calls, share an id.
            call.ids["request_id"] = _new_request_id()
        elif side == "client":
            # The request id goes on to the services this call reaches, so
            # their lines and ours share it.
            served = current_call()
            if served is not None:
                forwarded = served.ids.get("request_id")
                if forwarded is not None:
                    call.outgoing[header] = forwarded

    def finished(self, call: Call) -> None:
        if not self._access:
            return
        pipeline = self._pipeline
        kind, side, status = call.kind, call.side, call.status
        if call.failed:
            levelno = logging.ERROR if side != "client" else logging.WARNING
        elif side == "client" or call.state.get(QUIET):
            levelno = logging.DEBUG  # a quiet call: a periodic worker's idle tick
        else:
            levelno = logging.INFO
        if levelno < pipeline.levelno:
            return
        name, target, method = call.name, call.target, call.method
        if method:
            event = f"{method} {target or name} {status}"
        elif kind == "grpc":
            event = f"{name} {status}"
        else:  # a worker iteration, a script run: its component's name, when not the kind's
            event = f"{kind} {status}" if name == kind else f"{kind} {name} {status}"
        # The call's ids, even though it is no longer current (a client call
        # never is), after those of the call running now, as on any line.
        ids = call.ids
        current = current_call()
        if current is not None and current is not call and current.ids:
            ids = {**current.ids, **ids}
        fields: list[tuple[str, str | float]] = [("kind", kind)]
        if side == "client":
            fields.append(("side", side))
        fields.append(("name", name))
        if method:
            fields.append(("method", method))
        if target and target != name:
            fields.append(("target" if side == "client" else "path", target))
        fields.append(("status", status))
        fields.append(("duration_ms", round(call.duration * 1000.0, 3)))
        if self._errors:
            if call.error_kind is not None:
                fields.append(("error_kind", str(call.error_kind)))
            error = call.error
            if error is not None:
                fields.append(("error", f"{type(error).__name__}: {error}"))
        pipeline.write_plain(levelno, ACCESS_LOGGER, event, ids, fields, _ACCESS_FIELDS)

    def event(self, event: LifecycleEvent) -> None:
        pipeline = self._pipeline
        phase = event.phase
        if event.component == "service":
            levelno = logging.WARNING if phase == "forced" else logging.INFO
            if levelno < pipeline.levelno:
                return
            text = f"service {phase} ({event.detail})" if event.detail else f"service {phase}"
        elif phase in ("failed", "cut"):
            return  # the supervisor logs these itself, with the cause
        else:
            # Each component's steps only at [log] level debug: --verbose
            # prints them already, as the event log.
            if pipeline.config_levelno > logging.DEBUG:
                return
            levelno = logging.DEBUG
            text = f"{event.component} {phase}"
        line = pipeline.head(levelno, LIFECYCLE_LOGGER, text, time.time())
        line["component"] = event.component
        line["phase"] = phase
        if event.detail:
            line["detail"] = event.detail
        pipeline.emit(line)


# -- the feature --------------------------------------------------------------


class _LoggerComponent(Component):
    """Opens the service's log output first thing and runs its periodic flush.

    Stopping ends the periodic flush only: the lines of the rest of the
    shutdown still need the output, which a telemetry closer shuts after
    the supervisor's last line. Only a cancellation (nobody will run the
    closers) closes it here.
    """

    role = Role.PROCESSING

    def __init__(self, name: str, pipeline: LogPipeline) -> None:
        self.name = name
        self.pipeline = pipeline

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        pipeline = self.pipeline
        pipeline.open()
        for name in pipeline.telemetry.weak_secrets:
            pipeline.log(
                logging.WARNING,
                f"{name} is a secret of fewer than {WEAK_LENGTH} characters: every occurrence "
                "of that text is masked in every line, and a value so short is easily guessed",
                secret=name,
            )
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipeline.flush_periodically)
                await lifetime.wait_stopping()
                # Shutdown lines are few and the last ones matter: per line again.
                nursery.cancel_scope.cancel()
        except BaseException:
            pipeline.close()
            raise


def build_logger(context: BuildContext) -> Sequence[Component]:
    """The logger feature: a :class:`LogPipeline` for the service, its observer and component.

    ``[log]`` gives the level, format, attributes and ``error_stack_trace``;
    ``[features.logger]`` the output and whether to write access lines.
    """
    settings: LoggerSettings = context.settings
    definition = context.definition
    log = definition.log
    request_header = _request_header(definition)
    output = settings.output
    if output not in ("stdout", "stderr"):
        folder = Path(output).parent
        if not folder.is_dir():
            raise ConfigError(
                [
                    ConfigIssue(
                        context.definition.source,
                        f"features.{context.name}.output",
                        f'the folder of the log file {output!r} does not exist ("stdout", '
                        '"stderr" or a file path in an existing folder)',
                    )
                ]
            )
    pipeline = LogPipeline(
        context.telemetry,
        level=log.level,
        format=log.format,
        output=output,
        attributes=dict(log.attributes),
        error_stack_trace=log.stack_trace_mode,
        access_log=settings.access_log,
        flush_interval=settings.flush_interval,
        local_timestamp=log.local_timestamp,
        display_errors=log.display_errors,
        request_header=request_header,
        kinds=definition.kinds,
        product=definition.product,
        deploy_env=deploy_env(definition),
    )
    context.telemetry.publish(pipeline)
    context.telemetry.add_observer(_LogObserver(pipeline))
    context.telemetry.add_closer(pipeline.close)
    if context.telemetry.verbose:
        show_debug(context.telemetry)
    return [_LoggerComponent(context.name, pipeline)]


#: Names a request id header may have: an HTTP token that is also a gRPC metadata key.
_HEADER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)

#: The environment variable naming the request id header (Mikros Go and Rust).
TRACKER_HEADER_ENV: Final = "MIKROS_TRACKER_HEADER_NAME"


def _request_header(definition: Definition) -> str:
    """The request id header: ``MIKROS_TRACKER_HEADER_NAME`` or ``x-request-id``, lower case.

    Lower case because gRPC metadata keys must be; HTTP compares them
    ignoring case. A name that could not be a header and a gRPC key alike
    is a configuration error (exit code 2), not a header silently dropped.
    """
    name = definition.mikros_env(TRACKER_HEADER_ENV) or REQUEST_ID_HEADER
    lowered = name.lower()
    if (
        not _HEADER_NAME.fullmatch(name)
        or lowered.endswith("-bin")
        or lowered.startswith(("grpc-", ":"))
    ):
        raise ConfigError(
            [
                ConfigIssue(
                    definition.source,
                    TRACKER_HEADER_ENV,
                    f"environment variable {TRACKER_HEADER_ENV} names the request id header: "
                    "expected up to 64 of A-Z a-z 0-9 _ . -, not starting with grpc- nor "
                    f"ending with -bin, got {name!r}",
                )
            ]
        )
    return lowered


def deploy_env(definition: Definition) -> str:
    """The deploy environment given by ``MIKROS_SERVICE_DEPLOY``, ``""`` when unset.

    The one place it is read, for the log lines and the tracing resource;
    they write :data:`DEFAULT_DEPLOY` for ``""``, as Mikros does.
    """
    return definition.deploy_env


def show_debug(telemetry: Telemetry) -> None:
    """``--verbose``: the framework's debug lines (and lifecycle steps) reach the output."""
    logging.getLogger("mikros_trio").setLevel(logging.DEBUG)
    # A registry without the logger feature has no pipeline to open up.
    with contextlib.suppress(LookupError):
        telemetry.get(LogPipeline).levelno = logging.DEBUG
