"""The metrics feature (``[features.metrics] enabled = true``): Prometheus metrics.

Every service gets its own :class:`prometheus_client.CollectorRegistry`,
never the library's global ``REGISTRY``: two services started in one process
(tests do it all the time) keep separate counts, and nothing leaks from one
run into the next. The registry also carries the process, platform and GC
collectors, so the usual ``process_*`` and ``python_*`` series are there.
It is published on the service's hub as :class:`Metrics`; user code adds
its own metrics to it (see :class:`Metrics`).

Numbers come from the telemetry seam, not from the kinds: an
:class:`~mikros_trio.ext.Observer` turns each :class:`~mikros_trio.ext.Call` and
lifecycle event into samples. The hot path is one dict lookup for the
call's kind, one for its label tuple (``.labels()`` is slow, so each
labelled child is made once and cached), then a counter increment and a
histogram observation.

Metrics (durations in seconds, histograms use ``[features.metrics] buckets``):

===========================================  ==========  =====================================
name                                         type        labels
===========================================  ==========  =====================================
``http_requests_total``                      counter     ``method``, ``route``, ``status``
``http_request_duration_seconds``            histogram   ``method``, ``route``, ``status``
``http_requests_in_flight``                  gauge
``grpc_server_handled_total``                counter     ``method``, ``code``
``grpc_server_handling_seconds``             histogram   ``method``, ``code``
``grpc_server_in_flight``                    gauge
``grpc_client_handled_total``                counter     ``client``, ``method``, ``code``
``grpc_client_handling_seconds``             histogram   ``client``, ``method``, ``code``
``worker_iterations_total``                  counter     ``worker``, ``status`` (ok, idle,
                                                         error, cancelled)
``worker_failures_total``                    counter     ``worker``
``worker_iteration_duration_seconds``        histogram   ``worker``
``script_duration_seconds``                  gauge       (set when the script ends)
``script_success``                           gauge       1 if it exited 0, else 0
``service_start_duration_seconds``           gauge       first component starting → ready
``service_shutdown_duration_seconds``        gauge       shutdown began → service stopped
``component_start_duration_seconds``         gauge       ``component``: starting → started
``component_stop_duration_seconds``          gauge       ``component``: stopping → stopped
``service_info``                             gauge       ``service``, ``version``; always 1
``db_client_operations_total``               counter     ``system``, ``operation``, ``outcome``
``db_client_operation_duration_seconds``     histogram   ``system``, ``operation``, ``outcome``
``db_client_connections``                    gauge       ``system``, ``pool``, ``state`` (idle,
                                                         used, pending: tasks waiting)
``db_client_connections_max``                gauge       ``system``, ``pool``
===========================================  ==========  =====================================

The ``http_``, ``grpc_server_``, ``worker_`` and ``script_`` families exist
only on a service that runs that kind.

Database calls are the client calls a resource reports with its system as
the call's kind (``postgresql``, ``redis``): ``operation`` is the SQL verb
or the command name (``SELECT``, ``GET``; the resource bounds it),
``outcome`` is ``ok``, ``error`` or ``cancelled``. A pool's connection
gauges come from :meth:`Metrics.pool_gauges`.

Label cardinality is bounded by what the service declares: ``route`` is the
matched route rule (``/items/<item_id>``), never the raw path, and
``(unmatched)`` for everything no rule matched; ``method`` is one of the
standard HTTP methods or ``OTHER``; ``status`` and ``code`` come from small
fixed sets; ``method`` on gRPC is the full method name of a declared
service (``(unknown)`` otherwise). Probes and ``/metrics`` itself are never
counted: the HTTP kind does not report them as calls.

Where they are served: a service with an HTTP kind serves ``path``
(default ``/metrics``) on its HTTP port, or on ``[runtime.http]
admin_port`` when that is set, through the hub's endpoints. A service
without one (gRPC, worker, script) gets a small listener of its own on
``host:port``: a processing component, so it is up before the servers and
still answers while they drain. It is hand-rolled on Trio's TCP listeners
rather than on h11, which a gRPC-only install does not have; it reads one
bounded request head per connection, answers, and closes. ``MIKROS_METRICS_PORT``
overrides its port, as ``MIKROS_HTTP_PORT`` does the HTTP one.

Under ``workers = N`` each worker records into prometheus-client's
multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the parent before
the worker starts) and any worker's scrape serves the sum of all of them:
counters and histograms add up, in-flight gauges sum the live workers, the
other gauges show the largest value; ``process_*``, ``python_*`` and any
custom collector describe one process and are left out of it.

A script's metrics are final only once it has ended, moments before the
process exits: Prometheus scrapes suit long-running services, and a script
that must report its run belongs behind a Pushgateway (push
:attr:`Metrics.registry` from the script itself).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any, Final

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from mikros_trio._component import Component, Lifetime, Role
from mikros_trio._container import BuildContext
from mikros_trio._definition import parse_port
from mikros_trio._listen import open_tcp_listeners
from mikros_trio._supervisor import SERVICE, LifecycleEvent
from mikros_trio._telemetry import DB_SYSTEMS, HTTP_METHODS, UNMATCHED, Call, Observer
from mikros_trio.errors import ConfigError, ConfigIssue
from mikros_trio.features.settings import METRICS_PORT_ENV as PORT_ENV
from mikros_trio.features.settings import MetricsSettings

__all__ = ["PORT_ENV", "Metrics", "MetricsListener", "PoolGauges", "build_metrics"]

log = logging.getLogger("mikros_trio.metrics")

#: Set (by the workers' parent) before prometheus-client is imported, it makes
#: every value live in files of this folder, which a scrape adds up.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """A service's Prometheus registry, published on its telemetry hub.

    Every metric the feature records lives in :attr:`registry`; add your own
    there (never to prometheus-client's global registry) and they are served
    with the rest. The hub is the container's ``telemetry`` provider, so a
    component reads it when it is built::

        from prometheus_client import Counter
        from mikros_trio.features.metrics import Metrics

        class Orders:
            def __init__(self, telemetry: Telemetry) -> None:
                registry = telemetry.get(Metrics).registry
                self.placed = Counter("orders_placed_total", "Orders placed.", registry=registry)

        class Container(ServiceContainer):
            orders = providers.Singleton(Orders, telemetry=ServiceContainer.telemetry)

    ``telemetry.get(Metrics)`` raises ``LookupError`` when the feature is
    off; code running inside the service can also reach the hub through
    :func:`mikros_trio.ext.current_telemetry`.
    """

    __slots__ = ("_exposed", "_pools", "registry")

    def __init__(self, registry: CollectorRegistry, multiprocess_dir: str | None = None) -> None:
        self.registry = registry
        self._exposed = registry
        self._pools: tuple[Gauge, Gauge] | None = None
        if multiprocess_dir is not None:
            # Under workers every process records into its own files in this
            # folder; any one of them serves the sum of all (collectors that
            # are not values, as process_* and python_gc_*, describe one
            # process and are left out).
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, path=multiprocess_dir)  # type: ignore[no-untyped-call]

    def pool_gauges(self, system: str, pool: str) -> PoolGauges:
        """The connection gauges of one pool (``db_client_connections*``), for a resource to set.

        ``system`` is the database system (``postgresql``, ``redis``), ``pool``
        the pool's name; under workers the values of the live workers add up.
        """
        if self._pools is None:
            self._pools = (
                Gauge(
                    "db_client_connections",
                    "Connections of a database client pool, by state (idle, used; pending "
                    "counts the tasks waiting for one).",
                    ["system", "pool", "state"],
                    registry=self.registry,
                    multiprocess_mode="livesum",
                ),
                Gauge(
                    "db_client_connections_max",
                    "The most connections a database client pool opens.",
                    ["system", "pool"],
                    registry=self.registry,
                    multiprocess_mode="livesum",
                ),
            )
        connections, most = self._pools
        return PoolGauges(
            connections.labels(system, pool, "idle"),
            connections.labels(system, pool, "used"),
            connections.labels(system, pool, "pending"),
            most.labels(system, pool),
        )

    def render(self) -> bytes:
        """Every metric of the registry in the Prometheus text exposition format."""
        return generate_latest(self._exposed)

    def scrape(self) -> tuple[int, str, bytes]:
        """What a scrape gets: ``(status, content type, body)``; 500 if a collector broke.

        A hub endpoint (see :meth:`~mikros_trio.ext.Telemetry.add_endpoint`).
        """
        try:
            return 200, CONTENT_TYPE_LATEST, self.render()
        except Exception:
            # A user's collector broke: tell the scraper and the log, keep serving.
            log.exception("collecting metrics failed")
            return 500, "text/plain; charset=utf-8", b"collecting metrics failed\n"


class PoolGauges:
    """One pool's connection gauges (see :meth:`Metrics.pool_gauges`)."""

    __slots__ = ("_idle", "_max", "_pending", "_used")

    def __init__(self, idle: Any, used: Any, pending: Any, most: Any) -> None:
        self._idle, self._used, self._pending, self._max = idle, used, pending, most

    def set(self, idle: int, used: int, pending: int, most: int) -> None:
        """The pool's counts now: idle and used connections, waiting tasks, its maximum."""
        self._idle.set(idle)
        self._used.set(used)
        self._pending.set(pending)
        self._max.set(most)


def _timed_counter(
    registry: CollectorRegistry,
    buckets: Sequence[float],
    stem: str,
    counted: str,
    timed: str,
    labels: list[str],
) -> tuple[Counter, Histogram]:
    """``<stem>s_total`` and ``<stem>_duration_seconds``, both labelled by ``labels``."""
    counter = Counter(f"{stem}s_total", counted, labels, registry=registry)
    histogram = Histogram(
        f"{stem}_duration_seconds", timed, labels, buckets=buckets, registry=registry
    )
    return counter, histogram


#: Per server kind: calls served (counter), their durations (histogram),
#: those in flight (gauge), each as (name, help), and the labels of the first two.
_SERVED_FAMILIES: Final = {
    "http": (
        ("http_requests_total", "HTTP requests served, by method, route rule and status."),
        (
            "http_request_duration_seconds",
            "Time to serve an HTTP request, until its response was sent.",
        ),
        ("http_requests_in_flight", "HTTP requests being served now."),
        ["method", "route", "status"],
    ),
    "grpc": (
        ("grpc_server_handled_total", "gRPC calls served, by full method and status code."),
        ("grpc_server_handling_seconds", "Time to serve a gRPC call, until its status was sent."),
        ("grpc_server_in_flight", "gRPC calls being served now."),
        ["method", "code"],
    ),
}

# Labelled children of one (counter, histogram) pair, by label values.
_Pair = tuple[Any, Any]


class _Recorder(Observer):
    """Turns calls and lifecycle events into samples on one registry."""

    def __init__(
        self, registry: CollectorRegistry, buckets: Sequence[float], kinds: Collection[str]
    ) -> None:
        r, b = registry, tuple(buckets)
        # Child caches: label tuple -> (counter child, histogram child).
        self._http: dict[tuple[str, str, str], _Pair] = {}
        self._grpc: dict[tuple[str, str], _Pair] = {}
        self._client: dict[tuple[str, str, str], _Pair] = {}
        self._worker: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._db: dict[tuple[str, str, str], _Pair] = {}
        self._in_flight: dict[str, Gauge] = {}
        self._finish: dict[tuple[str, str], Callable[[Call], None]] = {
            ("grpc", "client"): self._client_finished,
        }
        for system in DB_SYSTEMS:
            self._finish[(system, "client")] = self._db_finished
        # A kind the service does not run gets no families: no HELP lines,
        # no gauges stuck at zero for a scraper to alert on.
        if "http" in kinds:
            self._http_total, self._http_seconds, self._http_flight = self._served(r, b, "http")
            self._finish[("http", "server")] = self._http_finished
        if "grpc" in kinds:
            self._grpc_total, self._grpc_seconds, self._grpc_flight = self._served(r, b, "grpc")
            self._finish[("grpc", "server")] = self._grpc_finished
        if "worker" in kinds:
            self._worker_families(r, b)
        if "script" in kinds:
            self._script_families(r)
        self._client_total = Counter(
            "grpc_client_handled_total",
            "gRPC calls made to other services, by client, full method and status code.",
            ["client", "method", "code"],
            registry=r,
        )
        self._client_seconds = Histogram(
            "grpc_client_handling_seconds",
            "Time of a gRPC call made to another service, until its status arrived.",
            ["client", "method", "code"],
            buckets=b,
            registry=r,
        )
        self._service_start = Gauge(
            "service_start_duration_seconds",
            "From the first component starting to the service being ready.",
            registry=r,
            multiprocess_mode="max",
        )
        self._service_shutdown = Gauge(
            "service_shutdown_duration_seconds",
            "From the shutdown trigger to the service having stopped.",
            registry=r,
            multiprocess_mode="max",
        )
        self._component_start = Gauge(
            "component_start_duration_seconds",
            "How long each component took to report ready.",
            ["component"],
            registry=r,
            multiprocess_mode="max",
        )
        self._db_total, self._db_seconds = _timed_counter(
            r,
            b,
            "db_client_operation",
            "Database calls made, by system, operation and outcome (ok, error, cancelled).",
            "Time of a database call, until its result arrived.",
            ["system", "operation", "outcome"],
        )
        self._component_stop = Gauge(
            "component_stop_duration_seconds",
            "How long each component took to drain and stop.",
            ["component"],
            registry=r,
            multiprocess_mode="max",
        )
        # Lifecycle bookkeeping: Trio times of the phase each span began at.
        self._first_start: float | None = None
        self._shutdown_at: float | None = None
        self._starting: dict[str, float] = {}
        self._stopping: dict[str, float] = {}

    def _served(
        self, r: CollectorRegistry, b: tuple[float, ...], kind: str
    ) -> tuple[Counter, Histogram, Gauge]:
        """A server kind's families: calls served, their durations, and those in flight."""
        total, seconds, flight, labels = _SERVED_FAMILIES[kind]
        gauge = Gauge(*flight, registry=r, multiprocess_mode="livesum")
        self._in_flight[kind] = gauge
        return (
            Counter(*total, labels, registry=r),
            Histogram(*seconds, labels, buckets=b, registry=r),
            gauge,
        )

    def _worker_families(self, r: CollectorRegistry, b: tuple[float, ...]) -> None:
        self._worker_total = Counter(
            "worker_iterations_total",
            "Iterations of a periodic worker, by outcome (ok, idle, error, cancelled).",
            ["worker", "status"],
            registry=r,
        )
        self._worker_failures = Counter(
            "worker_failures_total",
            "Iterations of a periodic worker that failed.",
            ["worker"],
            registry=r,
        )
        self._worker_seconds = Histogram(
            "worker_iteration_duration_seconds",
            "Time one iteration of a periodic worker took.",
            ["worker"],
            buckets=b,
            registry=r,
        )
        self._finish[("worker", "internal")] = self._worker_finished

    def _script_families(self, r: CollectorRegistry) -> None:
        self._script_seconds = Gauge(
            "script_duration_seconds",
            "How long the script ran (set when it ends).",
            registry=r,
            multiprocess_mode="max",
        )
        self._script_success = Gauge(
            "script_success",
            "1 if the script succeeded, 0 if it failed.",
            registry=r,
            multiprocess_mode="min",
        )
        self._finish[("script", "internal")] = self._script_finished

    # -- calls: the hot path --------------------------------------------------

    def started(self, call: Call) -> None:
        if call.side == "server":
            gauge = self._in_flight.get(call.kind)
            if gauge is not None:
                gauge.inc()

    def finished(self, call: Call) -> None:
        finish = self._finish.get((call.kind, call.side))
        if finish is not None:
            finish(call)

    def _http_finished(self, call: Call) -> None:
        self._http_flight.dec()
        method = call.method if call.method in HTTP_METHODS else "OTHER"
        key = (method, call.name or UNMATCHED, call.status)
        pair = self._http.get(key)
        if pair is None:
            pair = self._http[key] = (
                self._http_total.labels(*key),
                self._http_seconds.labels(*key),
            )
        pair[0].inc()
        pair[1].observe(call.duration)

    def _grpc_finished(self, call: Call) -> None:
        self._grpc_flight.dec()
        key = (call.name, call.status)
        pair = self._grpc.get(key)
        if pair is None:
            pair = self._grpc[key] = (
                self._grpc_total.labels(*key),
                self._grpc_seconds.labels(*key),
            )
        pair[0].inc()
        pair[1].observe(call.duration)

    def _client_finished(self, call: Call) -> None:
        key = (call.target, call.name, call.status)
        pair = self._client.get(key)
        if pair is None:
            pair = self._client[key] = (
                self._client_total.labels(*key),
                self._client_seconds.labels(*key),
            )
        pair[0].inc()
        pair[1].observe(call.duration)

    def _db_finished(self, call: Call) -> None:
        key = (call.kind, call.name, call.status)
        pair = self._db.get(key)
        if pair is None:
            pair = self._db[key] = (
                self._db_total.labels(*key),
                self._db_seconds.labels(*key),
            )
        pair[0].inc()
        pair[1].observe(call.duration)

    def _worker_finished(self, call: Call) -> None:
        key = (call.name, call.status)
        children = self._worker.get(key)
        if children is None:
            children = self._worker[key] = (
                self._worker_total.labels(*key),
                self._worker_seconds.labels(call.name),
                self._worker_failures.labels(call.name),
            )
        children[0].inc()
        children[1].observe(call.duration)
        if call.failed:
            children[2].inc()

    def _script_finished(self, call: Call) -> None:
        self._script_seconds.set(call.duration)
        self._script_success.set(0 if call.failed else 1)

    # -- lifecycle --------------------------------------------------------------

    def event(self, event: LifecycleEvent) -> None:
        phase, name, time = event.phase, event.component, event.time
        if name == SERVICE:
            if phase == "ready" and self._first_start is not None:
                self._service_start.set(time - self._first_start)
            elif phase == "shutdown":
                self._shutdown_at = time
            elif phase == "stopped" and self._shutdown_at is not None:
                self._service_shutdown.set(time - self._shutdown_at)
        elif phase == "starting":
            self._starting[name] = time
            if self._first_start is None:
                self._first_start = time
        elif phase == "started":
            began = self._starting.pop(name, None)
            if began is not None:
                self._component_start.labels(name).set(time - began)
        elif phase == "stopping":
            self._stopping[name] = time
        elif phase in ("stopped", "failed"):
            # A component that fails to start never began stopping: no sample.
            began = self._stopping.pop(name, None)
            if began is not None:
                self._component_stop.labels(name).set(time - began)


def _new_registry(service: str, version: str) -> CollectorRegistry:
    """A registry with the process, platform and GC collectors and ``service_info``."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    info = Gauge(
        "service_info",
        "The service's name and version; the value is always 1.",
        ["service", "version"],
        registry=registry,
        multiprocess_mode="max",
    )
    info.labels(service, version).set(1)
    return registry


def build_metrics(context: BuildContext) -> Sequence[Component]:
    """Feature builder: the registry, the call observer, and where to serve them.

    With an HTTP kind the exposition is one of the hub's endpoints (the
    kind serves it on its port or admin port); otherwise a
    :class:`MetricsListener` component serves it.
    """
    settings: MetricsSettings = context.settings
    definition = context.definition
    metrics = Metrics(
        _new_registry(definition.name, definition.version), os.environ.get(MULTIPROCESS_ENV)
    )
    telemetry = context.telemetry
    telemetry.publish(metrics)
    telemetry.add_observer(_Recorder(metrics.registry, settings.buckets, definition.kinds))
    if "http" in definition.kinds:
        telemetry.add_endpoint(settings.path, metrics.scrape)
        return ()
    port = _listener_port(definition.environ.get(PORT_ENV), settings.port, definition.source)
    return (MetricsListener(metrics, settings.host, port, settings.path),)


def _listener_port(text: str | None, configured: int, source: str) -> int:
    if text is None:
        return configured
    port = parse_port(text.strip())
    if port is not None:
        return port
    message = f"environment variable {PORT_ENV} overrides it: expected a port 0-65535, got {text!r}"
    raise ConfigError([ConfigIssue(source, "features.metrics.port", message)])


# -- the listener of services without an HTTP kind ------------------------------

#: Largest request head read; a longer one gets 431.
MAX_HEAD = 8192
#: Seconds a connection has to send its request head and take the response.
TIMEOUT = 10.0
#: Connections served at once; more are closed at once (scrapers retry).
MAX_CONNECTIONS = 32

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


def _response(status: int, body: bytes, content_type: str, *, head: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head else body)


def _text(status: int) -> bytes:
    return _response(status, f"{_REASONS[status]}\n".encode(), "text/plain; charset=utf-8")


class MetricsListener(Component):
    """Serves ``GET <path>`` with the exposition on ``host:port``, for non-HTTP services.

    One request per connection (answered with ``Connection: close``): 200
    for ``GET``/``HEAD`` of the path, 404 for any other path, 405 for other
    methods, 400 for a malformed request line, 431 beyond :data:`MAX_HEAD`
    bytes, 408 when the head does not arrive within :data:`TIMEOUT`. A
    processing component, so it serves while the servers drain; on stop it
    closes the listener and every connection at once.
    """

    role = Role.PROCESSING

    def __init__(self, metrics: Metrics, host: str, port: int, path: str) -> None:
        self.name = "metrics"
        self._metrics = metrics
        self._host = host
        self._port = port
        self._path = path.encode()
        self._active = 0

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await open_tcp_listeners(self._port, host=self._host or None)
        try:
            host, port = listeners[0].socket.getsockname()[:2]
            lifetime.publish_address(host, port)
            async with trio.open_nursery() as nursery:
                # serve_listeners closes the listeners when cancelled, and
                # each connection's stream after its handler returns.
                nursery.start_soon(trio.serve_listeners, self._serve, listeners)
                task_status.started()
                await lifetime.wait_stopping()
                nursery.cancel_scope.cancel()
        finally:
            for listener in listeners:
                listener.socket.close()  # idempotent; covers a failure before serving

    async def _serve(self, stream: trio.SocketStream) -> None:
        if self._active >= MAX_CONNECTIONS:
            return  # serve_listeners closes the stream
        self._active += 1
        try:
            with trio.move_on_after(TIMEOUT):
                response = await self._answer(stream)
                if response:
                    await stream.send_all(response)
                    await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client reset the connection: nothing left to tell it
        finally:
            self._active -= 1

    async def _answer(self, stream: trio.SocketStream) -> bytes:
        """The response to the request ``stream`` carries; ``b""`` if it ended early."""
        head = bytearray()
        with trio.move_on_after(TIMEOUT * 0.9) as reading:
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                if len(head) > MAX_HEAD:
                    return _text(431)
                data = await stream.receive_some(4096)
                if not data:
                    return b""  # the client went away before asking anything
                head += data
        if reading.cancelled_caught:
            return _text(408)
        line = bytes(head.split(b"\n", 1)[0]).rstrip(b"\r")
        parts = line.split(b" ")
        if (
            len(parts) != 3
            or not _TOKEN.fullmatch(parts[0])
            or not _VERSION.fullmatch(parts[2])
            or not parts[1].startswith(b"/")
        ):
            return _text(400)
        method, target = parts[0], parts[1]
        if target.split(b"?", 1)[0] != self._path:
            return _text(404)
        if method not in (b"GET", b"HEAD"):
            return _text(405)
        status, content_type, body = self._metrics.scrape()
        return _response(status, body, content_type, head=method == b"HEAD")


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then drain what the client still sends until it closes.

    Closing a socket with unread bytes makes the kernel send a reset, which
    can destroy the response before the client read it; reading to EOF (at
    most a few KiB, within the connection's timeout) avoids that.
    """
    await stream.send_eof()
    budget = 65536
    while budget > 0:
        data = await stream.receive_some(4096)
        if not data:
            return
        budget -= len(data)
