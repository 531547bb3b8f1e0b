"""The metrics feature: what the observer records, and /metrics on HTTP services.

The first half drives the feature's observer through a real
:class:`~mikros_trio._telemetry.Telemetry`, exactly as the kinds do
(``begin`` / ``end`` and lifecycle events), and reads the exposition back
with prometheus-client's own parser. The second half starts real HTTP
services (the HTTP test app of ``helpers.py``) with ``mikros_service`` and
scrapes them with httpx; the helpers it shares with ``test_metrics_*`` are in ``helpers.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import prometheus_client
import pytest
import trio
from dependency_injector import providers
from prometheus_client import Counter

from helpers import (
    BOUND,
    HttpContainer,
    build_feature,
    metrics_of,
    parse,
    scrape,
    scraped,
    series,
    settled,
    value,
)
from helpers import metrics_toml as service_toml
from helpers import write_metrics_service as write_service
from mikros_trio import ConfigError, ServiceContainer
from mikros_trio._telemetry import Call, Telemetry
from mikros_trio.errors import ErrorKind
from mikros_trio.ext import LifecycleEvent, parse_definition
from mikros_trio.features.metrics import Metrics, MetricsListener
from mikros_trio.testing import RunningService, ServiceStarter

# -- helpers -------------------------------------------------------------------


def built(toml: str) -> tuple[Telemetry, Metrics, list[Any]]:
    """Build the feature for ``toml`` on a fresh hub, as the container layer does."""
    telemetry, components = build_feature("metrics", toml)
    return telemetry, telemetry.get(Metrics), components


def finish(telemetry: Telemetry, call: Call, status: str, **options: Any) -> None:
    telemetry.end(call, status, **options)


def http_call(telemetry: Telemetry, method: str, route: str, status: int, **extra: Any) -> None:
    """One HTTP request as the HTTP kind reports it: named once routed, ended with its status."""
    call = telemetry.begin("http", "server", "", method=method, target="/raw/path?x=1")
    call.name = route
    for key, item in extra.items():
        setattr(call, key, item)
    telemetry.end(call, str(status), failed=status >= 500)


# -- the observer -----------------------------------------------------------------


def test_http_calls_are_counted_and_timed_per_method_route_and_status() -> None:
    """Each (method, route rule, status) gets its own counter and histogram, exactly."""
    telemetry, metrics, _ = built(service_toml())
    for _ in range(3):
        http_call(telemetry, "GET", "/items/<key>", 200)
    http_call(telemetry, "GET", "/items/<key>", 404, error_kind=ErrorKind.NOT_FOUND)
    http_call(telemetry, "POST", "/items/<key>", 201)
    http_call(telemetry, "GET", "/boom", 500, error=RuntimeError("x"))
    samples = parse(metrics.render().decode())
    expected = {
        ("GET", "/items/<key>", "200"): 3.0,
        ("GET", "/items/<key>", "404"): 1.0,
        ("POST", "/items/<key>", "201"): 1.0,
        ("GET", "/boom", "500"): 1.0,
    }
    counted = {
        (labels["method"], labels["route"], labels["status"]): v
        for labels, v in ((dict(k), v) for k, v in series(samples, "http_requests_total").items())
    }
    assert counted == expected
    timed = {
        (labels["method"], labels["route"], labels["status"]): v
        for labels, v in (
            (dict(k), v) for k, v in series(samples, "http_request_duration_seconds_count").items()
        )
    }
    assert timed == expected
    assert value(samples, "http_requests_in_flight") == 0


def test_in_flight_gauges_follow_started_and_finished_server_calls() -> None:
    """http_requests_in_flight and grpc_server_in_flight count calls begun and not yet ended."""
    telemetry, metrics, _ = built(service_toml(types=("http", "grpc")))
    registry = metrics.registry
    http = [telemetry.begin("http", "server", "", method="GET") for _ in range(3)]
    grpc = [telemetry.begin("grpc", "server", "/p.S/M") for _ in range(2)]
    telemetry.begin("grpc", "client", "/p.S/M", target="peer")  # clients are not in flight
    assert registry.get_sample_value("http_requests_in_flight") == 3
    assert registry.get_sample_value("grpc_server_in_flight") == 2
    finish(telemetry, http[0], "200")
    finish(telemetry, grpc[0], "OK")
    assert registry.get_sample_value("http_requests_in_flight") == 2
    assert registry.get_sample_value("grpc_server_in_flight") == 1


#: The families each kind's calls feed, by name prefix.
KIND_FAMILIES = {
    "http": "http_requests_",
    "grpc": "grpc_server_",
    "worker": "worker_",
    "script": "script_",
}


@pytest.mark.parametrize(
    "types", [("http", "worker"), ("grpc",), ("script",), ("worker", "grpc")], ids=str
)
def test_only_the_served_kinds_families_are_exposed(types: tuple[str, ...]) -> None:
    """A kind the service does not run has no series, no HELP line, no always-zero gauge."""
    _, metrics, _ = built(service_toml(types=types))
    text = metrics.render().decode()
    for kind, prefix in KIND_FAMILIES.items():
        assert (f"# HELP {prefix}" in text) == (kind in types), (kind, text)
    assert "# HELP grpc_client_handled_total" in text  # any service may call others
    assert "# HELP db_client_operations_total" in text
    assert "# HELP service_start_duration_seconds" in text


def test_label_values_stay_bounded() -> None:
    """Odd methods count as OTHER and a call never routed as (unmatched); raw paths never appear."""
    telemetry, metrics, _ = built(service_toml())
    for method in ("BREW", "PROPFIND", "X" * 50):
        http_call(telemetry, method, "(unmatched)", 405)
    http_call(telemetry, "GET", "", 413)  # answered before routing
    samples = parse(metrics.render().decode())
    counted = series(samples, "http_requests_total")
    assert counted == {
        frozenset({("method", "OTHER"), ("route", "(unmatched)"), ("status", "405")}): 3.0,
        frozenset({("method", "GET"), ("route", "(unmatched)"), ("status", "413")}): 1.0,
    }
    assert "/raw/path" not in metrics.render().decode()


def test_grpc_server_and_client_calls_are_counted_per_method_and_code() -> None:
    """Server calls by (method, code); client calls by (client, method, code)."""
    telemetry, metrics, _ = built(service_toml(types="grpc"))
    for code in ("OK", "OK", "NOT_FOUND"):
        call = telemetry.begin("grpc", "server", "/pkg.Echo/Unary")
        finish(telemetry, call, code)
    call = telemetry.begin("grpc", "server", "(unknown)")
    finish(telemetry, call, "UNIMPLEMENTED", failed=True)
    for client, code in (("greeter", "OK"), ("greeter", "UNAVAILABLE"), ("billing", "OK")):
        call = telemetry.begin("grpc", "client", "/pkg.Greeter/Hi", target=client)
        finish(telemetry, call, code)
    samples = parse(metrics.render().decode())
    unary = "/pkg.Echo/Unary"
    assert series(samples, "grpc_server_handled_total") == {
        frozenset({("method", unary), ("code", "OK")}): 2.0,
        frozenset({("method", unary), ("code", "NOT_FOUND")}): 1.0,
        frozenset({("method", "(unknown)"), ("code", "UNIMPLEMENTED")}): 1.0,
    }
    assert value(samples, "grpc_server_handling_seconds_count", method=unary, code="OK") == 2
    hi = "/pkg.Greeter/Hi"
    assert series(samples, "grpc_client_handled_total") == {
        frozenset({("client", "greeter"), ("method", hi), ("code", "OK")}): 1.0,
        frozenset({("client", "greeter"), ("method", hi), ("code", "UNAVAILABLE")}): 1.0,
        frozenset({("client", "billing"), ("method", hi), ("code", "OK")}): 1.0,
    }
    assert (
        value(samples, "grpc_client_handling_seconds_count", client="billing", method=hi, code="OK")
        == 1
    )


def test_worker_iterations_and_failures() -> None:
    """Iterations by outcome, failures apart, and one duration per iteration."""
    telemetry, metrics, _ = built(service_toml(types="worker"))
    for status in ("ok", "error", "ok", "error", "ok", "cancelled"):
        call = telemetry.begin("worker", "internal", "worker")
        finish(telemetry, call, status, failed=status == "error")
    samples = parse(metrics.render().decode())
    assert value(samples, "worker_iterations_total", worker="worker", status="ok") == 3
    assert value(samples, "worker_iterations_total", worker="worker", status="error") == 2
    assert value(samples, "worker_iterations_total", worker="worker", status="cancelled") == 1
    assert value(samples, "worker_failures_total", worker="worker") == 2
    assert value(samples, "worker_iteration_duration_seconds_count", worker="worker") == 6


@pytest.mark.parametrize(("status", "success"), [("ok", 1.0), ("error", 0.0)])
def test_script_duration_and_result(status: str, success: float) -> None:
    """The script's run sets script_duration_seconds (its call's duration) and script_success."""
    telemetry, metrics, _ = built(service_toml(types="script"))
    call = telemetry.begin("script", "internal", "script")
    finish(telemetry, call, status, failed=status != "ok")
    samples = parse(metrics.render().decode())
    assert value(samples, "script_duration_seconds") == pytest.approx(call.duration)
    assert value(samples, "script_success") == success


def test_lifecycle_events_become_phase_durations() -> None:
    """Start: first 'starting' to ready; shutdown to stopped; each component's start and stop."""
    telemetry, metrics, _ = built(service_toml(types="worker"))
    for event in [
        LifecycleEvent(10.0, "metrics", "starting"),
        LifecycleEvent(10.5, "metrics", "started"),
        LifecycleEvent(10.5, "broken", "starting"),
        LifecycleEvent(10.6, "broken", "failed"),  # never started: no start sample
        LifecycleEvent(10.5, "worker", "starting"),
        LifecycleEvent(11.0, "worker", "started"),
        LifecycleEvent(12.0, "service", "ready"),
        LifecycleEvent(20.0, "service", "shutdown", "SIGTERM"),
        LifecycleEvent(21.0, "worker", "stopping"),
        LifecycleEvent(23.0, "worker", "cut", "drain timeout 2 s"),
        LifecycleEvent(23.0, "worker", "stopped"),
        LifecycleEvent(23.0, "metrics", "stopping"),
        LifecycleEvent(23.25, "metrics", "stopped"),
        LifecycleEvent(24.0, "service", "stopped", "exit code 0"),
    ]:
        telemetry.event(event)
    samples = parse(metrics.render().decode())
    assert value(samples, "service_start_duration_seconds") == 2.0
    assert value(samples, "service_shutdown_duration_seconds") == 4.0
    assert series(samples, "component_start_duration_seconds") == {
        frozenset({("component", "metrics")}): 0.5,
        frozenset({("component", "worker")}): 0.5,
    }
    assert series(samples, "component_stop_duration_seconds") == {
        frozenset({("component", "worker")}): 2.0,
        frozenset({("component", "metrics")}): 0.25,
    }


def test_registry_is_per_service_with_process_collectors_and_service_info() -> None:
    """Each build has its own registry (not the global one), with process_*, python_* and info."""
    first_hub, first, _ = built(service_toml(name="first"))
    _, second, _ = built(service_toml(name="second"))
    assert first.registry is not second.registry
    assert first.registry is not prometheus_client.REGISTRY
    http_call(first_hub, "GET", "/hello", 200)
    one, two = parse(first.render().decode()), parse(second.render().decode())
    assert value(one, "http_requests_total", method="GET", route="/hello", status="200") == 1
    assert series(two, "http_requests_total") == {}
    assert prometheus_client.REGISTRY.get_sample_value("http_requests_total") is None
    assert value(one, "service_info", service="first", version="1.2.3") == 1
    assert value(two, "service_info", service="second", version="1.2.3") == 1
    assert value(one, "process_cpu_seconds_total") is not None
    assert any(name == "python_info" for name, _ in one)
    assert any(name == "python_gc_collections_total" for name, _ in one)


def test_buckets_come_from_settings() -> None:
    """The duration histograms use [features.metrics] buckets (plus +Inf)."""
    toml = service_toml(metrics={"buckets": [0.1, 1, 10]})
    telemetry, metrics, _ = built(toml)
    http_call(telemetry, "GET", "/hello", 200)
    samples = parse(metrics.render().decode())
    bounds = {
        dict(labels)["le"] for labels in series(samples, "http_request_duration_seconds_bucket")
    }
    assert bounds == {"0.1", "1.0", "10.0", "+Inf"}


@pytest.mark.parametrize(
    ("buckets", "message"),
    [
        ([], "at least one"),
        ([1.0, 0.5], "increasing order"),
        ([0.1, 0.1], "increasing order"),
        ([-1.0, 1.0], "positive, finite"),
    ],
)
def test_bad_buckets_are_a_config_error(buckets: list[float], message: str) -> None:
    """Unsorted, empty or non-positive buckets are reported at [features.metrics], not at start."""
    with pytest.raises(ConfigError) as caught:
        parse_definition(service_toml(metrics={"buckets": buckets}), environ={})
    issue = caught.value.issues[0]
    assert issue.path.startswith("features.metrics")
    assert message in issue.message


def test_http_services_get_an_endpoint_and_others_a_listener() -> None:
    """With an HTTP kind the exposition is a hub endpoint; without one, a listener component."""
    telemetry, _, components = built(service_toml(metrics={"path": "/prom"}))
    assert components == []
    status, content_type, body = telemetry.endpoints["/prom"]()
    assert (status, content_type) == (200, prometheus_client.CONTENT_TYPE_LATEST)
    assert value(parse(body.decode()), "service_info", service="svc", version="1.2.3") == 1
    telemetry, _, components = built(service_toml(types="grpc"))
    assert telemetry.endpoints == {}
    assert [type(c) for c in components] == [MetricsListener]
    assert components[0].name == "metrics"


# -- HTTP services -------------------------------------------------------------------


async def start_http(
    mikros_service: ServiceStarter, tmp_path: Path, **options: Any
) -> RunningService:
    """Start the HTTP test app (``HttpContainer``) with a service.toml from ``options``."""
    path = write_service(tmp_path, types="http", **options)
    with trio.fail_after(BOUND):
        return await mikros_service.start(HttpContainer, path)


async def test_http_requests_are_counted_exactly_and_scrapes_and_probes_are_not(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """After a mix of requests, counts match exactly per method/route/status; scrapes don't."""
    running = await start_http(mikros_service, tmp_path)
    port = running.ports["http"]
    sent = [
        ("GET", "/hello", 200),
        ("GET", "/hello", 200),
        ("GET", "/hello", 200),
        ("GET", "/items/greeting", 200),
        ("GET", "/items/missing", 404),  # the store raises NotFoundError
        ("GET", "/raise/validation", 400),  # a ServiceError
        ("GET", "/raise/condition", 412),
        ("GET", "/boom", 500),  # an unexpected exception
        ("GET", "/no/such/route", 404),
        ("GET", "/nope", 404),
        ("POST", "/echo", 200),
        ("DELETE", "/hello", 405),
    ]
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False
        ) as client:
            for method, target, status in sent:
                response = await client.request(method, target)
                assert response.status_code == status, (method, target, response.text)
                # Scrapes and probes in between must not count as requests.
                for probe in ("/metrics", "/livez", "/readyz", "/healthz"):
                    assert (await client.get(probe)).status_code == 200
    await settled(running, "http_requests_in_flight")
    samples = await scraped(port)
    expected = {
        ("GET", "/hello", "200"): 3.0,
        ("GET", "/items/<key>", "200"): 1.0,
        ("GET", "/items/<key>", "404"): 1.0,
        ("GET", "/raise/<kind>", "400"): 1.0,
        ("GET", "/raise/<kind>", "412"): 1.0,
        ("GET", "/boom", "500"): 1.0,
        ("GET", "(unmatched)", "404"): 2.0,
        ("POST", "/echo", "200"): 1.0,
        ("DELETE", "(unmatched)", "405"): 1.0,
    }

    def by_labels(name: str) -> dict[tuple[str, str, str], float]:
        found = series(samples, name)
        out = {}
        for labels, count in found.items():
            label = dict(labels)
            out[label["method"], label["route"], label["status"]] = count
        return out

    assert by_labels("http_requests_total") == expected
    assert by_labels("http_request_duration_seconds_count") == expected
    assert value(samples, "http_requests_in_flight") == 0
    assert value(samples, "service_info", service="svc", version="1.2.3") == 1


async def test_in_flight_request_shows_in_the_gauge(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A request still being handled counts in http_requests_in_flight while it runs."""
    running = await start_http(mikros_service, tmp_path)
    port = running.ports["http"]
    app = running.container.app()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scrape, port, "/slow?seconds=0.5")
        with trio.fail_after(BOUND):
            await app.entered.wait()
        samples = await scraped(port)
        assert value(samples, "http_requests_in_flight") == 1
    await settled(running, "http_requests_in_flight")
    samples = await scraped(port)
    assert value(samples, "http_requests_total", method="GET", route="/slow", status="200") == 1


async def test_admin_port_serves_metrics_and_main_port_does_not(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """With admin_port, /metrics answers there and is the app's 404 on the main port."""
    running = await start_http(mikros_service, tmp_path, tables={"runtime.http": {"admin_port": 0}})
    assert (await scrape(running.ports["http"], "/hello")).status_code == 200
    await settled(running, "http_requests_in_flight")
    samples = await scraped(running.ports["http-admin"])
    assert value(samples, "http_requests_total", method="GET", route="/hello", status="200") == 1
    main = await scrape(running.ports["http"])
    assert main.status_code == 404
    assert main.json()["kind"] == "NotFoundError"


async def test_metrics_path_setting_moves_the_endpoint(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """[features.metrics] path serves the exposition elsewhere; /metrics is then the app's."""
    running = await start_http(mikros_service, tmp_path, metrics={"path": "/internal/prom"})
    samples = await scraped(running.ports["http"], "/internal/prom")
    assert value(samples, "service_info", service="svc", version="1.2.3") == 1
    assert (await scrape(running.ports["http"])).status_code == 404


async def test_disabled_metrics_serve_nothing(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Without [features.metrics] enabled, /metrics is a 404 and no Metrics is published."""
    running = await start_http(mikros_service, tmp_path, metrics=None)
    response = await scrape(running.ports["http"])
    assert response.status_code == 404
    with pytest.raises(LookupError, match="Metrics"):
        metrics_of(running)


async def test_two_services_in_one_process_count_separately(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Two HTTP services in one process: requests to one never show in the other's metrics."""
    first = await start_http(mikros_service, tmp_path, name="first")
    second = await start_http(mikros_service, tmp_path, name="second")
    for _ in range(2):
        assert (await scrape(first.ports["http"], "/hello")).status_code == 200
    assert (await scrape(second.ports["http"], "/items/greeting")).status_code == 200
    await settled(first, "http_requests_in_flight")
    await settled(second, "http_requests_in_flight")
    one, two = await scraped(first.ports["http"]), await scraped(second.ports["http"])
    assert series(one, "http_requests_total") == {
        frozenset({("method", "GET"), ("route", "/hello"), ("status", "200")}): 2.0
    }
    assert series(two, "http_requests_total") == {
        frozenset({("method", "GET"), ("route", "/items/<key>"), ("status", "200")}): 1.0
    }
    assert value(one, "service_info", service="first", version="1.2.3") == 1
    assert value(two, "service_info", service="second", version="1.2.3") == 1
    assert value(one, "service_info", service="second", version="1.2.3") is None


class Orders:
    """A user component with a metric of its own, on its service's registry (the documented way)."""

    def __init__(self, telemetry: Telemetry) -> None:
        registry = telemetry.get(Metrics).registry
        self.placed = Counter("orders_placed_total", "Orders placed.", registry=registry)


class OrdersContainer(HttpContainer):
    orders = providers.Singleton(Orders, telemetry=ServiceContainer.telemetry)


async def test_user_metrics_on_the_service_registry_are_served(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A component's own Counter on telemetry.get(Metrics).registry is served; per service."""
    path = write_service(tmp_path, types="http")
    with trio.fail_after(BOUND):
        first = await mikros_service.start(OrdersContainer, path)
        second = await mikros_service.start(OrdersContainer, path)
    first.container.orders().placed.inc(3)
    second.container.orders().placed.inc()
    one, two = await scraped(first.ports["http"]), await scraped(second.ports["http"])
    assert value(one, "orders_placed_total") == 3
    assert value(two, "orders_placed_total") == 1
