"""The seam between kinds and features: calls, observers and a service's telemetry hub.

Kinds describe each unit of work they run as a :class:`Call` (an HTTP
request, a gRPC call served or made, a periodic worker iteration, a script
run) and hand it to the service's :class:`Telemetry`, which tells every
:class:`Observer` that features registered: the logger writes the access
line, metrics count and time it, tracing opens and closes its span. Kinds
never import a feature, and a third-party feature observes exactly what the
built-ins do.

While a served call runs, :func:`current_call` returns it (a context
variable, so the handler's child tasks see it too): log lines read its ids
from there, which is how a handler's lines and its access line share a
request id without anything being passed around.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._secrets import Masker

if TYPE_CHECKING:
    from ._supervisor import LifecycleEvent
    from .errors import ErrorKind

__all__ = [
    "DB_SYSTEMS",
    "HTTP_METHODS",
    "QUIET",
    "UNMATCHED",
    "Call",
    "Endpoint",
    "Observer",
    "Telemetry",
    "current_call",
    "current_telemetry",
    "redact_current",
]

log = logging.getLogger("mikros_trio")

T = TypeVar("T")

#: An extra HTTP path a feature serves next to the probes (``/metrics``):
#: a callable returning ``(status, content type, body)``.
Endpoint = Callable[[], tuple[int, str, bytes]]

#: ``Call.name`` of an HTTP request no route matched: a bounded label for
#: metrics and span names, never the raw path.
UNMATCHED = "(unmatched)"

#: The standard HTTP methods. Features label or name calls by one of these
#: and lump any other token a client sends together, so labels stay bounded.
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)

#: Database systems whose client calls are database calls: the call's ``kind``
#: is the system (OpenTelemetry's ``db.system`` value), its ``name`` the
#: operation, its ``target`` the database, ``state["peer"]`` the server's
#: (host, port). Metrics and traces name and label them by these.
DB_SYSTEMS = frozenset({"postgresql", "redis"})

#: ``Call.state`` key of a call that may turn out to have done nothing (a
#: periodic worker's idle tick): ``False`` while it runs, ``True`` once it
#: did nothing. The logger writes a quiet call at debug; tracing holds the
#: spans of its children while it may turn quiet and drops them all if it does.
QUIET: Final = "quiet"

_CALL: ContextVar[Call | None] = ContextVar("mikros_trio_call", default=None)
_TELEMETRY: ContextVar[Telemetry | None] = ContextVar("mikros_trio_telemetry", default=None)


def current_call() -> Call | None:
    """The served call (request, RPC, iteration, script run) this code runs for, if any."""
    return _CALL.get()


def current_telemetry() -> Telemetry | None:
    """The telemetry hub of the service this code runs in, if any."""
    return _TELEMETRY.get()


def redact_current(text: str) -> str:
    """``text`` with the secrets of the service this code runs in masked (as is outside one).

    For output a service writes outside its features, such as the
    ``--verbose`` event log.
    """
    telemetry = _TELEMETRY.get()
    return text if telemetry is None else telemetry.redact(text)


#: Header name -> its lower-case forms (bytes, text): the few names observers look up.
_HEADER_FORMS: dict[str, tuple[bytes, str]] = {}


def _header_forms(name: str) -> tuple[bytes, str]:
    text = name.lower()
    forms = (text.encode("latin-1"), text)
    if len(_HEADER_FORMS) < 64:  # bounded, whoever calls header()
        _HEADER_FORMS[name] = forms
    return forms


class Call:
    """One unit of work, as observers see it.

    Set by the kind: ``kind`` (``"http"``, ``"grpc"``, ``"worker"``,
    ``"script"``…), ``side`` (``"server"`` for work served, ``"client"`` for
    a call made to another service, ``"internal"`` for worker iterations
    and scripts), ``name`` (low-cardinality: the route rule, the gRPC full
    method, the component), ``method`` (HTTP method), ``target`` (the raw
    path, for logs only), and at the end ``status`` (``"200"``, ``"OK"``,
    ``"NOT_FOUND"``, ``"ok"``, ``"error"``), ``failed``, ``error`` and
    ``error_kind``. Observers add log fields to :attr:`ids`
    (``request_id``, ``trace_id``…), outgoing headers to :attr:`outgoing`
    (client side), and keep their own per-call state in :attr:`state`.
    """

    __slots__ = (
        "_headers",
        "duration",
        "error",
        "error_kind",
        "failed",
        "ids",
        "kind",
        "method",
        "name",
        "outgoing",
        "side",
        "start",
        "state",
        "status",
        "target",
    )

    def __init__(
        self,
        kind: str,
        side: str,
        name: str,
        *,
        method: str = "",
        target: str = "",
        headers: Sequence[tuple[Any, Any]] = (),
    ) -> None:
        self.kind = kind
        self.side = side
        self.name = name
        self.method = method
        self.target = target
        self._headers = headers
        self.ids: dict[str, str] = {}
        self.outgoing: dict[str, str] = {}
        self.state: dict[object, Any] = {}
        self.status = ""
        self.failed = False
        self.error: BaseException | None = None
        self.error_kind: ErrorKind | None = None
        self.start = time.perf_counter()
        self.duration = 0.0

    def header(self, name: str) -> str | None:
        """The incoming header or metadata value called ``name``, or ``None``.

        Names are compared in lower case, which is how both ASGI (HTTP/1.1
        and HTTP/2) and gRPC metadata deliver them, so no header is decoded
        just to be compared.
        """
        forms = _HEADER_FORMS.get(name)
        if forms is None:
            forms = _header_forms(name)
        for key, value in self._headers:
            if key in forms:
                return value.decode("latin-1") if isinstance(value, bytes) else str(value)
        return None

    def __repr__(self) -> str:
        return f"<Call {self.kind} {self.side} {self.name!r} {self.status or 'running'}>"


class Observer:
    """Base of what features register to see calls and lifecycle events.

    Every method is optional and must be quick and must not raise (an
    exception is logged and the call goes on). ``started`` runs in
    registration order, ``finished`` in reverse, so the first observer
    wraps all the others.
    """

    def started(self, call: Call) -> None:
        """A call began (``call.start`` is set)."""

    def finished(self, call: Call) -> None:
        """A call ended (``status``, ``duration``, ``failed`` are set)."""

    def event(self, event: LifecycleEvent) -> None:
        """The supervisor reached a lifecycle step."""


class Telemetry:
    """A service's hub: its observers, extra HTTP endpoints, secrets and feature objects.

    One per :class:`~mikros_trio.Service`, created before any feature or
    kind is built; builders receive it as ``context.telemetry`` and the
    container as the ``telemetry`` provider. ``verbose`` is the run's
    ``--verbose``: features with output open it to the framework's debug
    lines.
    """

    def __init__(self, service: str = "", version: str = "", *, verbose: bool = False) -> None:
        self.service = service
        self.version = version
        self.verbose = verbose
        self.observers: list[Observer] = []
        #: Extra paths served with the probes (on the admin port when there is one).
        self.endpoints: dict[str, Endpoint] = {}
        #: What masks secrets in output; ``None`` while there are none, so
        #: a hot path pays one identity check (see :meth:`add_secrets`).
        self.masker: Masker | None = None
        self._objects: dict[type[Any], Any] = {}
        self._closers: list[Callable[[], Awaitable[None] | None]] = []

    # -- registration (build time) ------------------------------------

    def add_observer(self, observer: Observer) -> None:
        """Have ``observer`` see every call and lifecycle event from now on."""
        self.observers.append(observer)

    def add_endpoint(self, path: str, endpoint: Endpoint) -> None:
        """Serve ``endpoint`` at ``path`` next to the probes."""
        self.endpoints[path] = endpoint

    def add_closer(self, closer: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``closer`` once the supervisor has stopped everything, before the exit.

        Closers flush what features buffered (log files, spans) and run in
        reverse registration order; each may be sync or async.
        """
        self._closers.append(closer)

    async def close(self) -> None:
        """Run every closer (last registered first); one failing does not skip the others."""
        closers, self._closers = self._closers, []
        for closer in reversed(closers):
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("closing %r failed", closer)

    def publish(self, obj: Any) -> None:
        """Make a feature's object reachable by type (:meth:`get`), e.g. for tests."""
        self._objects[type(obj)] = obj

    def published(self) -> tuple[Any, ...]:
        """Every object features published, in the order they were."""
        return tuple(self._objects.values())

    def get(self, kind: type[T]) -> T:
        """The object a feature published with type ``kind``; ``LookupError`` if none."""
        try:
            found: T = self._objects[kind]
        except KeyError:
            message = f"no {kind.__name__} in this service (is its feature enabled?)"
            raise LookupError(message) from None
        return found

    def add_secrets(self, values: Iterable[str], *, name: str = "a secret") -> None:
        """Values that must never appear in output, in any form; :meth:`redact` masks them.

        Each value's forms (its ``repr``, bytes, JSON, URL-quoted, hex and
        base64 encodings, and for a URL or DSN its password: see
        :mod:`mikros_trio._secrets`) are derived here, once, into a new
        :attr:`masker`. ``name`` (the variable it came from) is what a
        warning about a too short value says, never the value.
        """
        masker = (self.masker or Masker()).with_secrets((value, name) for value in values)
        if masker:
            self.masker = masker

    def redact(self, text: str) -> str:
        """``text`` with every form of every secret value replaced by ``***``."""
        masker = self.masker
        return text if masker is None else masker.mask(text)

    @property
    def has_secrets(self) -> bool:
        """Whether any value needs masking (lets log processors skip the scan)."""
        return self.masker is not None

    @property
    def weak_secrets(self) -> tuple[str, ...]:
        """Names of secrets short enough that masking them hides ordinary text too."""
        return () if self.masker is None else self.masker.weak

    # -- calls (run time) ---------------------------------------------

    def begin(
        self,
        kind: str,
        side: str,
        name: str,
        *,
        method: str = "",
        target: str = "",
        headers: Sequence[tuple[Any, Any]] = (),
    ) -> Call:
        """Start a call and tell every observer."""
        call = Call(kind, side, name, method=method, target=target, headers=headers)
        for observer in self.observers:
            try:
                observer.started(call)
            except Exception:
                log.exception("observer %r failed on a call's start", observer)
        return call

    def end(
        self,
        call: Call,
        status: str,
        *,
        failed: bool = False,
        error: BaseException | None = None,
    ) -> None:
        """Finish ``call`` with ``status`` and tell every observer, in reverse order."""
        call.duration = time.perf_counter() - call.start
        call.status = status
        call.failed = failed or call.failed
        if error is not None:
            call.error = error
        for observer in reversed(self.observers):
            try:
                observer.finished(call)
            except Exception:
                log.exception("observer %r failed on a call's end", observer)

    @staticmethod
    def enter(call: Call) -> Token[Call | None]:
        """Make ``call`` the current call of this task (and of tasks it spawns)."""
        return _CALL.set(call)

    @staticmethod
    def leave(token: Token[Call | None]) -> None:
        """Undo :meth:`enter`."""
        _CALL.reset(token)

    def activate(self) -> Token[Telemetry | None]:
        """Make this the current service's hub for this task and the tasks it spawns."""
        return _TELEMETRY.set(self)

    @staticmethod
    def deactivate(token: Token[Telemetry | None]) -> None:
        """Undo :meth:`activate`."""
        _TELEMETRY.reset(token)

    def event(self, event: LifecycleEvent) -> None:
        """Hand a lifecycle event to every observer."""
        for observer in self.observers:
            try:
                observer.event(event)
            except Exception:
                log.exception("observer %r failed on a lifecycle event", observer)
