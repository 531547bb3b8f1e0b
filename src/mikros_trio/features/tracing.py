"""The tracing feature (``[features.tracing] enabled = true``): OpenTelemetry spans.

One span per unit of work the kinds report through the telemetry seam: a
SERVER span per HTTP request and gRPC call served, a CLIENT span per gRPC
call made through ``mikros_trio.grpc.client`` channels, an INTERNAL span
per periodic worker iteration and per script run. W3C trace context
(``traceparent``, ``tracestate``) is read from incoming HTTP headers and
gRPC metadata and written into outgoing gRPC metadata, so one request
through several services is one trace.

Design decisions:

- **One SDK ``TracerProvider`` per service, never the global one.**
  Several services run in one process (every test does it), each with its
  own resource (``service.name``, ``service.version``, the product as
  ``service.namespace``, ``deployment.environment.name``), sampler and
  exporter; setting the global provider would make the last one win. User
  code gets the service's tracer from :class:`Tracing`, published on the
  hub. What *is* shared is the OpenTelemetry context (a context variable),
  which is exactly what propagation inside one task tree needs.
- **Server and internal spans are made current; client spans are not.**
  A served call's span is attached to the OpenTelemetry context in
  ``started()`` (run by the kind in the task that then runs the handler),
  so the handler, its child tasks and any gRPC call it makes see it as the
  parent. ``finished()`` detaches it only when it runs in the task that
  attached it: a context token cannot be reset from another task's
  context, and a span attached in a task dies with that task anyway. A
  client span is a child of whatever is current and is never attached: it
  ends in whatever task sees the response end, and nothing runs "inside"
  it on our side.
- **A periodic worker's idle tick makes no span, nor do its children.**
  While an iteration that may turn out idle runs, the spans of the calls
  it makes (a database poll) wait in its call (at most 256); it exports
  them with its own, or drops them all when it ends quiet.
- **Span status follows the Mikros error kind.** ERROR (with a
  description) for server faults (``call.failed``) and the internal, RPC
  and custom kinds; UNSET for the caller's mistakes (validation, not found,
  permission, condition), which are the server doing its job. The kind is
  always recorded as ``mikros.error.kind``. An unexpected exception also
  gets an ``exception`` event with its message and stack trace.
- **Every span is masked before any processor sees it.** The provider's
  own processor, which every exporter's processor (and any a user adds)
  hangs from, hands on a copy of each finished span whose name,
  attributes, events (names and attributes), links' attributes and status
  description went through the hub's secret masking, like every other
  output: spans leave the machine. That covers the call spans, the spans
  user code starts with :attr:`Tracing.tracer` and what the SDK records
  for them (an escaping exception's event), for every exporter. The copy
  is made only for a span that shows a secret (one scan of its texts).
- **Exporter from settings, overridden by ``OTEL_TRACES_EXPORTER``** read
  from the service's environment (``Definition.environ``, which the test
  harness sets per service). ``memory`` keeps finished spans for tests
  (:meth:`Tracing.spans`), ``console`` writes one JSON object per line to
  stderr, ``otlp`` sends OTLP/HTTP (protobuf) through a batch processor and
  needs the ``otlp`` extra, ``none`` makes spans (ids for logs, propagation)
  and drops them. The batch processor's thread starts with the feature's
  component, not at build, so ``mikros-trio check`` starts nothing.
- **Flushed at exit.** A hub closer force-flushes and shuts the provider
  down after every component stopped, so the spans of the last requests
  are sent. For the OTLP exporter that is blocking network I/O, so it runs
  in a worker thread, bounded by ``flush_timeout``; past it the thread is
  abandoned rather than holding the exit.
- **Calls record into a lean span; the SDK gets a ``ReadableSpan``.** The
  SDK's own span (a lock, attribute re-validation, the sampler and
  processor machinery per call) was most of tracing's cost per request,
  and tracing the largest feature cost in bench/http_overhead.py. A call's
  span is a :class:`_CallSpan` instead: OpenTelemetry's ``Span`` API over
  plain fields, current while the call runs (handlers set attributes, add
  events, start children as with any span), handed to the provider's
  processors as the SDK's ``ReadableSpan`` when it ends, and not built at
  all when nothing would see it (``none``). Sampling is decided here, exactly as
  ``ParentBased(TraceIdRatioBased(ratio))``; spans started with
  :attr:`Tracing.tracer` are ordinary SDK spans.

Database calls (a client call whose kind is the database system,
``postgresql`` or ``redis``) get a CLIENT span named ``"{operation}
{database}"`` with ``db.system``, ``db.operation``, ``db.name``,
``server.address`` and ``server.port``; never the statement or its
parameters.

Attributes follow the OpenTelemetry semantic conventions: HTTP spans are
named ``"{method} {route}"`` once the route is known (``"{method}"``
otherwise; a non-standard method is ``HTTP`` / ``_OTHER``) with
``http.request.method``, ``url.path``, ``http.route`` and
``http.response.status_code``; gRPC spans are named ``pkg.Service/Method``
with ``rpc.system``, ``rpc.service``, ``rpc.method`` and
``rpc.grpc.status_code``; call ids go into ``call.ids`` as ``trace_id`` and
``span_id`` (lower-case hex) for the logger.
"""

from __future__ import annotations

import logging
import random
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from mikros_trio._component import Component, Lifetime
from mikros_trio._container import BuildContext
from mikros_trio._definition import Definition
from mikros_trio._secrets import Masker
from mikros_trio._telemetry import (
    DB_SYSTEMS,
    HTTP_METHODS,
    QUIET,
    UNMATCHED,
    Call,
    Observer,
    Telemetry,
    current_call,
)
from mikros_trio.errors import ConfigError, ConfigIssue, ErrorKind, ServiceError
from mikros_trio.features.logger import DEFAULT_DEPLOY, deploy_env
from mikros_trio.features.settings import TracingSettings

__all__ = ["EXPORTERS", "Tracing", "build_tracing"]

log = logging.getLogger("mikros_trio")

#: The values ``[features.tracing] exporter`` and ``OTEL_TRACES_EXPORTER`` accept.
EXPORTERS = ("otlp", "console", "memory", "none")

#: The standard variable that overrides the configured exporter.
_EXPORTER_ENV = "OTEL_TRACES_EXPORTER"

#: Kinds that are the caller's mistake: the span stays UNSET, as for a 4xx.
_CALLER_KINDS = frozenset(
    {ErrorKind.VALIDATION, ErrorKind.NOT_FOUND, ErrorKind.PERMISSION, ErrorKind.CONDITION}
)

#: gRPC status names (what the kinds report) to their numeric codes.
_GRPC_CODES: dict[str, int] = {
    name: code
    for code, name in enumerate(
        (
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        )
    )
}


#: Bound on the per-method cache: method names come from declared services,
#: but nothing unbounded may grow from what callers send.
_CACHE_LIMIT = 1024


#: Key of the children's spans an enclosing call holds (see ``_holder``), and their bound.
_HELD: Final = object()
_HOLD_LIMIT: Final = 256

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """A service's tracing, published on its telemetry hub.

    ``provider`` is the service's own SDK ``TracerProvider`` (not the
    global one), ``tracer`` a tracer from it for spans of your own,
    ``exporter`` the span exporter (``None`` for ``exporter = "none"``) and
    ``exporter_name`` which one was chosen. Spans you start inside a
    handler are children of the request's span, which is current there::

        tracing = container.telemetry().get(Tracing)
        with tracing.tracer.start_as_current_span("load-profile"):
            ...

    With the memory exporter, :meth:`spans` returns the finished spans::

        spans = running.service.telemetry.get(Tracing).spans()
        assert [span.name for span in spans] == ["GET /items/<item_id>"]
    """

    __slots__ = ("exporter", "exporter_name", "provider", "tracer")

    def __init__(
        self,
        provider: TracerProvider,
        exporter: SpanExporter | None,
        exporter_name: str,
    ) -> None:
        self.provider = provider
        self.tracer: trace.Tracer = provider.get_tracer("mikros_trio")
        self.exporter = exporter
        self.exporter_name = exporter_name

    def spans(self) -> tuple[ReadableSpan, ...]:
        """The finished spans, oldest first; needs the memory exporter (``RuntimeError`` else)."""
        return tuple(self._memory().get_finished_spans())

    def clear(self) -> None:
        """Forget the finished spans kept so far (memory exporter only)."""
        self._memory().clear()

    def _memory(self) -> InMemorySpanExporter:
        if not isinstance(self.exporter, InMemorySpanExporter):
            raise RuntimeError(
                f"this service exports spans to {self.exporter_name!r}; finished spans are kept "
                f'only with [features.tracing] exporter = "memory" or {_EXPORTER_ENV}=memory'
            )
        return self.exporter

    def __repr__(self) -> str:
        return f"<Tracing exporter={self.exporter_name!r}>"


#: A call's incoming ``traceparent``, already looked up, and the call for the rest.
_Carrier = tuple[str, Call]


class _CallGetter(Getter[_Carrier]):
    """Lets the W3C propagator read a call's incoming headers or metadata.

    ``traceparent`` was read once already (to skip extraction when there
    is none, the common case at the edge); other keys are looked up.
    """

    def get(self, carrier: _Carrier, key: str) -> list[str] | None:
        if key == "traceparent":
            return [carrier[0]]
        value = carrier[1].header(key)
        return None if value is None else [value]

    def keys(self, carrier: _Carrier) -> list[str]:
        # A call offers lookups only; the TraceContext propagator never lists keys.
        return []


_GETTER = _CallGetter()

#: The parent of a server span without a valid incoming one: none (a new trace).
_ROOT = otel_context.Context()


def _current_task() -> object:
    """The running Trio task, or ``None`` outside Trio (one thread, one context)."""
    try:
        return trio.lowlevel.current_task()
    except RuntimeError:
        return None


#: Attribute value types OpenTelemetry accepts (and sequences of one of them).
_PRIMITIVES = (str, bool, int, float)


def _valid(value: object) -> bool:
    if isinstance(value, _PRIMITIVES):
        return True
    return isinstance(value, list | tuple) and all(isinstance(v, _PRIMITIVES) for v in value)


class _CallSpan(Span):
    """The span of one call: OpenTelemetry's ``Span`` API over plain fields.

    The SDK's own span takes a lock, re-validates attributes and runs the
    sampler and processor machinery on every call, most of the tracing
    feature's cost per request. This span records into slots instead, and
    becomes the SDK's ``ReadableSpan`` only when a processor will see it
    (not at all with the ``none`` exporter). It is the current span while
    its call runs, so handlers enrich it as any span: ``set_attribute``,
    ``add_event``, ``set_status``, ``update_name``, ``record_exception``;
    spans they start are its children. The observer ends it when the call
    ends (``end()`` from user code only stops further recording).
    """

    __slots__ = (
        "_context",
        "attributes",
        "end_time",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "start_time",
        "status",
    )

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
    ) -> None:
        self._context = context
        self.name = name
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.events: list[Event] = []
        self.links: list[trace.Link] = []
        self.status = _UNSET
        self.start_time = time.time_ns()
        self.end_time: int | None = None

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self.end_time is None and key and _valid(value):
            self.attributes[key] = value

    def add_event(
        self,
        name: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        timestamp: int | None = None,
    ) -> None:
        if self.end_time is None:
            self.events.append(Event(name, attributes, timestamp))

    def add_link(
        self, context: SpanContext, attributes: Mapping[str, AttributeValue] | None = None
    ) -> None:
        if self.end_time is None and context.is_valid:
            self.links.append(trace.Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: OK is final, and UNSET never overrides what was set.
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if not isinstance(status, Status):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, AttributeValue] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        event: dict[str, AttributeValue] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        event.update(attributes or {})
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is None:
            self.end_time = end_time if end_time is not None else time.time_ns()

    def readable(self, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
        """The finished span as exporters take it."""
        return ReadableSpan(
            self.name,
            context=self._context,
            parent=self.parent,
            resource=resource,
            attributes=self.attributes,
            events=self.events,
            links=self.links,
            kind=self.kind,
            status=self.status,
            start_time=self.start_time,
            end_time=self.end_time,
            instrumentation_scope=scope,
        )


class _MaskingProcessor(SynchronousMultiSpanProcessor):
    """The provider's processor: every processor under it gets finished spans masked.

    Exporters (and processors a user adds to the provider) hang from it,
    so no span leaves with a secret in its name, attributes, events, links
    or status description, whoever started it.
    """

    def __init__(self, telemetry: Telemetry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # untyped in the SDK
        self._telemetry = telemetry
        # Every span carries the same resource (the service's, and what the
        # SDK read from OTEL_RESOURCE_ATTRIBUTES in the process environment):
        # it is scanned, and masked, once, not per span.
        self._resource_scan: tuple[Resource, Masker, bool] | None = None
        self._resources: tuple[Resource, Resource] | None = None

    def on_end(self, span: ReadableSpan) -> None:
        masker = self._telemetry.masker
        if masker is not None and (
            masker.shows(_span_text(span)) or self._resource_shows(span.resource, masker)
        ):
            span = self._masked(span, masker.mask)
        super().on_end(span)

    def _resource_shows(self, resource: Resource, masker: Masker) -> bool:
        seen = self._resource_scan
        if seen is None or seen[0] is not resource or seen[1] is not masker:
            texts: list[str] = []
            _add_texts(texts, resource.attributes)
            seen = self._resource_scan = (resource, masker, masker.shows("\x00".join(texts)))
        return seen[2]

    def _masked(self, span: ReadableSpan, mask: Callable[[str], str]) -> ReadableSpan:
        status = span.status
        if status.description:
            status = Status(status.status_code, mask(status.description))
        return ReadableSpan(
            mask(span.name),
            context=span.context,
            parent=span.parent,
            resource=self._masked_resource(span.resource, mask),
            attributes=_masked_attributes(span.attributes, mask),
            events=[
                Event(mask(event.name), _masked_attributes(event.attributes, mask), event.timestamp)
                for event in span.events
            ],
            links=[
                trace.Link(link.context, _masked_attributes(link.attributes, mask))
                for link in span.links
            ],
            kind=span.kind,
            status=status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

    def _masked_resource(self, resource: Resource, mask: Callable[[str], str]) -> Resource:
        seen = self._resources
        if seen is None or seen[0] is not resource:
            attributes = _masked_attributes(resource.attributes, mask) or {}
            seen = self._resources = (resource, Resource(attributes, resource.schema_url))
        return seen[1]


def _span_text(span: ReadableSpan) -> str:
    """Every text of a span but its resource's, NUL-separated (in no form): one text to scan."""
    texts = [span.name]
    description = span.status.description
    if description:
        texts.append(description)
    _add_texts(texts, span.attributes)
    for event in span.events:
        texts.append(event.name)
        _add_texts(texts, event.attributes)
    for link in span.links:
        _add_texts(texts, link.attributes)
    return "\x00".join(texts)


def _add_texts(texts: list[str], attributes: Mapping[str, Any] | None) -> None:
    """Append the keys and text values of ``attributes`` (at any depth) to ``texts``."""
    if not attributes:
        return
    for key, value in attributes.items():
        texts.append(key)
        if type(value) is str:
            texts.append(value)
        elif not isinstance(value, bool | int | float):
            _add_value_texts(texts, value)


def _add_value_texts(texts: list[str], value: Any) -> None:
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, bytes):
        texts.append(value.decode("utf-8", "backslashreplace"))
    elif isinstance(value, Mapping):
        _add_texts(texts, value)
    elif isinstance(value, Sequence):
        for item in value:
            _add_value_texts(texts, item)


def _masked_attributes(
    attributes: Mapping[str, Any] | None, mask: Callable[[str], str]
) -> dict[str, Any] | None:
    if attributes is None:
        return None
    return {mask(key): _masked_value(value, mask) for key, value in attributes.items()}


def _masked_value(value: Any, mask: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, bytes):
        # Masked as text: exporters write bytes as their repr or base64 anyway.
        text = value.decode("utf-8", "backslashreplace")
        masked = mask(text)
        return value if masked is text else masked
    if isinstance(value, Mapping):
        return _masked_attributes(value, mask)
    if isinstance(value, Sequence):
        return tuple(_masked_value(item, mask) for item in value)
    return value


_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)


class _SpanObserver(Observer):
    """Opens a span when a call starts and closes it when the call ends.

    Sampling is the SDK's ``ParentBased(TraceIdRatioBased(ratio))``, decided
    here: a call with a parent follows the parent's flag, a new trace is
    recorded when its trace id falls under the ratio's bound. An unsampled
    call still gets ids (for logs and the downstream ``traceparent``), as a
    non-recording span.
    """

    def __init__(
        self,
        processor: SynchronousMultiSpanProcessor,
        resource: Resource,
        ratio: float,
    ) -> None:
        self._processor = processor
        self._resource = resource
        self._scope = InstrumentationScope("mikros_trio")
        self._bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        self._all = ratio >= 1
        # full gRPC method -> (span name, start attributes); see _rpc().
        self._rpc_cache: dict[str, tuple[str, dict[str, AttributeValue]]] = {}
        # (kind, name, client name) -> the same, with peer.service.
        self._client_cache: dict[tuple[str, str, str], tuple[str, dict[str, AttributeValue]]] = {}

    # -- start ---------------------------------------------------------

    def started(self, call: Call) -> None:
        side = call.side
        parent: SpanContext | None = None
        if side == "server":
            traceparent = call.header("traceparent")
            if traceparent is not None:
                extracted = _PROPAGATOR.extract((traceparent, call), _ROOT, _GETTER)
                parent = trace.get_current_span(extracted).get_span_context()
            name, attributes = self._start_naming(call)
            kind = SpanKind.SERVER
        else:
            parent = trace.get_current_span().get_span_context()
            if side == "client":
                name, attributes = self._client_naming(call)
                kind = SpanKind.CLIENT
            else:
                name, attributes = call.name or call.kind, {}
                kind = SpanKind.INTERNAL
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
            sampled = parent.trace_flags.sampled
            trace_state = parent.trace_state
        else:
            parent = None
            trace_id = _random_id(128)
            sampled = self._all or (trace_id & TraceIdRatioBased.TRACE_ID_LIMIT) < self._bound
            trace_state = None
        span_id = _random_id(64)
        flags = _SAMPLED if sampled else _NOT_SAMPLED
        context = SpanContext(trace_id, span_id, False, flags, trace_state)
        span: Span = (
            _CallSpan(name, context, parent, kind, dict(attributes))
            if sampled
            else trace.NonRecordingSpan(context)
        )
        trace_hex = format(trace_id, "032x")
        span_hex = format(span_id, "016x")
        ids = call.ids
        ids["trace_id"] = trace_hex
        ids["span_id"] = span_hex
        if kind is SpanKind.CLIENT:
            # What TraceContextTextMapPropagator.inject writes, without
            # building a Context or formatting the ids a second time.
            outgoing = call.outgoing
            outgoing["traceparent"] = f"00-{trace_hex}-{span_hex}-{flags:02x}"
            if trace_state:
                outgoing["tracestate"] = trace_state.to_header()
            call.state[self] = (span, None, None)
        else:
            token = otel_context.attach(trace.set_span_in_context(span))
            call.state[self] = (span, token, _current_task())

    def _start_naming(self, call: Call) -> tuple[str, dict[str, AttributeValue]]:
        kind = call.kind
        if kind == "http":
            target = call.target
            if "?" in target:
                target = target.partition("?")[0]
            method = call.method
            if method in HTTP_METHODS:
                return method, {"http.request.method": method, "url.path": target}
            # Span names stay low-cardinality whatever method a client invents.
            return "HTTP", {
                "http.request.method": "_OTHER",
                "http.request.method_original": method,
                "url.path": target,
            }
        if kind == "grpc":
            return self._rpc(call.name)
        return call.name or kind, {}

    def _client_naming(self, call: Call) -> tuple[str, dict[str, AttributeValue]]:
        """As :meth:`_start_naming`, plus ``peer.service`` (the client's name), cached."""
        key = (call.kind, call.name, call.target)
        found = self._client_cache.get(key)
        if found is not None:
            return found
        if call.kind in DB_SYSTEMS:
            name, attributes = _db_naming(call)
        else:
            name, attributes = self._start_naming(call)
        if call.target and call.kind not in DB_SYSTEMS:
            attributes = {**attributes, "peer.service": call.target}
        found = (name, attributes)
        if len(self._client_cache) < _CACHE_LIMIT and call.kind != "http":
            self._client_cache[key] = found  # HTTP attributes hold the path: not cached
        return found

    def _rpc(self, full_method: str) -> tuple[str, dict[str, AttributeValue]]:
        """``/pkg.Service/Method`` → (``pkg.Service/Method``, rpc.* attributes), cached."""
        found = self._rpc_cache.get(full_method)
        if found is not None:
            return found
        service, _, method = full_method.lstrip("/").rpartition("/")
        attributes: dict[str, AttributeValue] = {"rpc.system": "grpc"}
        if service:
            attributes["rpc.service"] = service
            attributes["rpc.method"] = method
            name = f"{service}/{method}"
        else:
            name = full_method  # "(unknown)": the method is not one we serve
        found = (name, attributes)
        if len(self._rpc_cache) < _CACHE_LIMIT:
            self._rpc_cache[full_method] = found
        return found

    # -- end -----------------------------------------------------------

    def finished(self, call: Call) -> None:
        entry = call.state.pop(self, None)
        if entry is None:
            return  # started() failed or never ran for this call
        span, token, task = entry
        if token is not None and task is _current_task():
            otel_context.detach(token)
        if not isinstance(span, _CallSpan):
            return  # not sampled: ids only
        state = call.state
        held = state.pop(_HELD, None)
        if QUIET in state:
            state[_HELD] = None  # closed: a straggler's span is exported, not held
        if state.get(QUIET):
            return  # a periodic worker's idle tick: no span, nor its children's
        recording = span.end_time is None
        span.end()
        if recording:
            self._finish(span, call)
        processor = self._processor
        # The SDK's own tuple of processors (no public accessor), read per call:
        # a user may add a processor to the provider at any time.
        if processor._span_processors:
            readable = span.readable(self._resource, self._scope)
            holder = _holder(call)
            if holder is not None:
                holder.append(readable)
            else:
                processor.on_end(readable)
            for child in held or ():
                processor.on_end(child)

    def _finish(self, span: _CallSpan, call: Call) -> None:
        kind = call.kind
        status = call.status
        attributes = span.attributes
        if kind == "http":
            if status.isdigit():
                attributes["http.response.status_code"] = int(status)
            route = call.name
            if route and route != UNMATCHED:
                attributes["http.route"] = route
                method = call.method
                span.name = f"{method if method in HTTP_METHODS else 'HTTP'} {route}"
        elif kind == "grpc":
            code = _GRPC_CODES.get(status)
            if code is not None:
                attributes["rpc.grpc.status_code"] = code
        elif kind in DB_SYSTEMS:
            peer = call.state.get("peer")
            if peer is not None:
                attributes["server.address"] = str(peer[0])
                attributes["server.port"] = int(peer[1])
        error_kind = call.error_kind
        if error_kind is not None:
            attributes["mikros.error.kind"] = error_kind.value
            # A caller's mistake (4xx, NOT_FOUND…) is the server doing its job.
            faulty = call.failed or error_kind not in _CALLER_KINDS
        else:
            faulty = call.failed or call.error is not None
        if faulty:
            self._fail(span, call)

    def _fail(self, span: _CallSpan, call: Call) -> None:
        """ERROR status, ``error.type``, and the exception event for an unexpected error."""
        attributes = span.attributes
        error = call.error
        error_kind = call.error_kind
        if error is None:
            description = error_kind.value if error_kind is not None else call.status
            attributes["error.type"] = description or "error"
            span.status = Status(StatusCode.ERROR, description)
            return
        message = str(error)
        if isinstance(error, ServiceError):
            # Raised on purpose: the kind says it all, no stack trace to record.
            attributes["error.type"] = error.kind.value
            span.status = Status(StatusCode.ERROR, f"{error.kind.value}: {message}")
            return
        error_type = type(error)
        qualified = f"{error_type.__module__}.{error_type.__qualname__}"
        stack = "".join(traceback.format_exception(error))
        attributes["error.type"] = qualified
        span.status = Status(StatusCode.ERROR, f"{error_type.__name__}: {message}")
        # record_exception()'s event, without its "exception.escaped" (the
        # call ended with it: it escaped); the processor masks it.
        span.events.append(
            Event(
                "exception",
                {
                    "exception.type": qualified,
                    "exception.message": message,
                    "exception.stacktrace": stack,
                },
            )
        )


def _holder(call: Call) -> list[ReadableSpan] | None:
    """Where ``call``'s span waits: the enclosing call, while it may still turn quiet.

    A worker iteration that may turn out idle (``QUIET`` in its state, not
    yet true) holds its children's spans (a database poll) until it ends,
    so an idle tick leaves no orphaned child behind; past ``_HOLD_LIMIT``
    they go out at once (an iteration that busy was hardly idle).
    """
    enclosing = current_call()
    if enclosing is None or enclosing is call:
        return None
    state = enclosing.state
    if QUIET not in state:
        return None
    held: list[ReadableSpan] | None = state.setdefault(_HELD, [])
    if held is None or len(held) >= _HOLD_LIMIT:
        return None
    return held


def _db_naming(call: Call) -> tuple[str, dict[str, AttributeValue]]:
    """A database call: ``"<operation> <database>"`` and the ``db.*`` attributes.

    The operation is the SQL verb or command name the resource reports
    (bounded by it), never the statement: its text may hold values.
    """
    attributes: dict[str, AttributeValue] = {"db.system": call.kind, "db.operation": call.name}
    if call.target:
        attributes["db.name"] = call.target
        return f"{call.name} {call.target}", attributes
    return call.name, attributes


def _random_id(bits: int) -> int:
    """A random non-zero id of ``bits`` bits (W3C: all-zero ids are invalid)."""
    while True:
        value = random.getrandbits(bits)
        if value:
            return value


class _TracingComponent(Component):
    """Starts the batch processor (a thread) when the service starts, not at build."""

    name = "tracing"

    def __init__(self, provider: TracerProvider, batched: SpanExporter | None) -> None:
        self._provider = provider
        self._batched = batched
        #: Whether the provider has a processor whose buffer the closer must flush.
        self.attached = False

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self._batched is not None and not self.attached:
            self._provider.add_span_processor(BatchSpanProcessor(self._batched))
            self.attached = True
        task_status.started()
        await lifetime.wait_stopping()


class _Flusher:
    """The hub closer: flush and shut the provider down, off the event loop when it blocks."""

    def __init__(
        self,
        provider: TracerProvider,
        exporter: SpanExporter | None,
        component: _TracingComponent,
        *,
        batched: bool,
        timeout: float,
    ) -> None:
        self._provider = provider
        self._exporter = exporter
        self._component = component
        self._batched = batched
        self._timeout = timeout

    def _close(self) -> None:
        if self._batched and not self._component.attached:
            # Never started: nothing was buffered, only release the exporter.
            if self._exporter is not None:
                self._exporter.shutdown()
            return
        self._provider.force_flush(int(self._timeout * 1000))
        self._provider.shutdown()

    async def __call__(self) -> None:
        if not self._batched:
            self._close()  # memory, console, none: in-process, nothing to wait for
            return
        with trio.move_on_after(self._timeout) as scope:
            await trio.to_thread.run_sync(self._close, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.warning("tracing: spans not flushed within %.1f s; some may be lost", self._timeout)


def _exporter_name(context: BuildContext, settings: TracingSettings) -> str:
    chosen = context.definition.environ.get(_EXPORTER_ENV, "").strip().lower()
    if not chosen:
        return settings.exporter
    if chosen not in EXPORTERS:
        raise ConfigError(
            [
                ConfigIssue(
                    context.definition.source,
                    "features.tracing.exporter",
                    f"environment variable {_EXPORTER_ENV} is {chosen!r}; expected one of "
                    + ", ".join(EXPORTERS),
                )
            ]
        )
    return chosen


def _otlp_endpoint(settings: TracingSettings, environ: Mapping[str, str]) -> str | None:
    """The traces URL: settings, then the standard variables, else the SDK's default."""
    if settings.endpoint:
        return settings.endpoint
    specific = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if specific:
        return specific  # used as is, per the specification
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return base.rstrip("/") + "/v1/traces"
    return None


def _otlp_exporter(context: BuildContext, settings: TracingSettings) -> SpanExporter:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as missing:
        raise ConfigError(
            [
                ConfigIssue(
                    context.definition.source,
                    "features.tracing.exporter",
                    f"the otlp exporter needs opentelemetry-exporter-otlp-proto-http "
                    f"({missing.name or missing} is not installed): "
                    f"pip install 'mikros-trio[otlp]', or choose console, memory or none",
                )
            ]
        ) from None
    endpoint = _otlp_endpoint(settings, context.definition.environ)
    exporter: SpanExporter = OTLPSpanExporter(endpoint=endpoint, timeout=settings.flush_timeout)
    return exporter


#: Where the deploy environment goes on the resource: the current semantic
#: convention and the deprecated key many backends still read.
_DEPLOY_KEYS: Final = ("deployment.environment.name", "deployment.environment")


def _resource(definition: Definition) -> Resource:
    """The service's resource: name, version, product, deploy environment (as in the log lines).

    The product is ``service.namespace`` (the group a service belongs to).
    ``MIKROS_SERVICE_DEPLOY`` wins over ``OTEL_RESOURCE_ATTRIBUTES``, as the
    file's name wins over ``service.name`` there; unset, Mikros'
    ``"local"`` only fills in when the latter names no environment either.
    """
    attributes: dict[str, str] = {
        SERVICE_NAME: definition.name,
        SERVICE_VERSION: definition.version,
    }
    if definition.product:
        attributes["service.namespace"] = definition.product
    deploy = deploy_env(definition)
    if deploy:
        attributes.update(dict.fromkeys(_DEPLOY_KEYS, deploy))
    resource = Resource.create(attributes)
    if not deploy and not any(key in resource.attributes for key in _DEPLOY_KEYS):
        resource = resource.merge(Resource(dict.fromkeys(_DEPLOY_KEYS, DEFAULT_DEPLOY)))
    return resource


def build_tracing(context: BuildContext) -> Sequence[Component]:
    """The tracing feature: a tracer provider, an observer, and a component for the exporter."""
    settings: TracingSettings = context.settings
    telemetry = context.telemetry
    definition = context.definition
    name = _exporter_name(context, settings)

    exporter: SpanExporter | None = None
    if name == "otlp":
        exporter = _otlp_exporter(context, settings)
    elif name == "console":
        # Bound now: a test capturing stderr sees the spans.
        exporter = ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    elif name == "memory":
        exporter = InMemorySpanExporter()
    batched = name == "otlp"

    resource = _resource(definition)
    # Ours, so the observer hands its spans to the same processors as the
    # provider's own spans (add_span_processor adds to it), and every span
    # any of them sees is masked.
    processor = _MaskingProcessor(telemetry)
    provider = TracerProvider(
        # Recording everything needs no ratio arithmetic per trace.
        sampler=ParentBased(
            ALWAYS_ON if settings.sample_ratio >= 1 else TraceIdRatioBased(settings.sample_ratio)
        ),
        resource=resource,
        # The hub closer shuts it down; an atexit hook would keep every
        # provider a test process ever built alive until exit.
        shutdown_on_exit=False,
        active_span_processor=processor,
    )
    if exporter is not None and not batched:
        # In-process exporters: each span is handed over as it ends, in order.
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, exporter, name)
    component = _TracingComponent(provider, exporter if batched else None)
    telemetry.publish(tracing)
    telemetry.add_observer(_SpanObserver(processor, resource, settings.sample_ratio))
    telemetry.add_closer(
        _Flusher(provider, exporter, component, batched=batched, timeout=settings.flush_timeout)
    )
    return [component]
