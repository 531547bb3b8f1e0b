"""The HTTP kind's errors on the wire: Mikros JSON bodies, statuses, and a service that survives."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from helpers import BOUND, HTTP_SERVICE_ERRORS, client_for, get
from helpers import start_http as start
from mikros_trio.testing import ServiceStarter


async def test_unexpected_exception_is_500_internal_error_and_logged(
    mikros_service: ServiceStarter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler raising RuntimeError answers 500 InternalError JSON; the traceback is logged."""
    running = await start(mikros_service, tmp_path)
    with caplog.at_level(logging.ERROR, logger="mikros_trio.http"):
        response = await get(running, "/boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "code": 0,
        "kind": "InternalError",
        "message": "internal error",
        "details": "RuntimeError: the handler broke",
        "cause": "RuntimeError: the handler broke",
        "service_name": "web",
    }
    # Only errors: the start's info lines ("listening") are records too.
    logged = [
        r for r in caplog.records if r.name == "mikros_trio.http" and r.levelno >= logging.ERROR
    ]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None
    assert logged[0].exc_info[0] is RuntimeError
    assert "Traceback" in caplog.text
    assert "the handler broke" in caplog.text


@pytest.mark.parametrize("kind", sorted(HTTP_SERVICE_ERRORS))
async def test_service_errors_map_to_their_status(
    mikros_service: ServiceStarter, tmp_path: Path, kind: str
) -> None:
    """Each ServiceError subclass answers its HTTP status with kind, message, code and service."""
    running = await start(mikros_service, tmp_path)
    cls, status = HTTP_SERVICE_ERRORS[kind]
    response = await get(running, f"/raise/{kind}")
    assert response.status_code == status
    assert response.json() == {
        "code": 7,
        "kind": cls.kind.value,
        "message": f"raised {kind}",
        "service_name": "web",
    }


async def test_store_not_found_is_404_from_a_component(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A NotFoundError raised deep in a container component reaches the client as 404 JSON."""
    running = await start(mikros_service, tmp_path)
    found = await get(running, "/items/greeting")
    assert (found.status_code, found.json()) == (200, {"key": "greeting", "value": "hello"})
    missing = await get(running, "/items/nope")
    assert missing.status_code == 404
    assert missing.json()["kind"] == "NotFoundError"
    assert missing.json()["message"] == "no item 'nope'"


async def test_unknown_route_and_wrong_method_answer_json(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """An unknown route is 404 NotFoundError JSON; a wrong method is 405 JSON too."""
    running = await start(mikros_service, tmp_path)
    missing = await get(running, "/no/such/route")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json()["kind"] == "NotFoundError"
    assert missing.json()["message"]
    with trio.fail_after(BOUND):
        async with client_for(running) as client:
            wrong = await client.delete("/hello")
    assert wrong.status_code == 405
    assert wrong.json()["kind"] == "ValidationError"


async def test_a_thousand_faults_leave_the_service_serving(
    mikros_service: ServiceStarter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1 000 faulting requests over four keep-alive connections leave the service healthy."""
    running = await start(mikros_service, tmp_path)
    paths = ["/boom", "/raise/validation", "/no/such/route", "/raise/condition"]
    expected = {"/boom": 500, "/raise/validation": 400, "/no/such/route": 404}
    expected["/raise/condition"] = 412
    statuses: dict[str, list[int]] = {p: [] for p in paths}
    ports: set[int] = set()
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    with caplog.at_level(logging.CRITICAL, logger="mikros_trio.http"), trio.fail_after(20):
        async with client_for(running, limits=limits) as client:

            async def fault(path: str) -> None:
                for _ in range(250):
                    response = await client.get(path)
                    statuses[path].append(response.status_code)
                    stream = response.extensions["network_stream"]
                    ports.add(stream.get_extra_info("client_addr")[1])

            async with trio.open_nursery() as nursery:
                for path in paths:
                    nursery.start_soon(fault, path)
            after = await client.get("/slow?seconds=0")
            ready = await client.get("/readyz")
    for path in paths:
        assert statuses[path] == [expected[path]] * 250, path
    assert len(ports) <= 4, "the faults did not cost the connections"
    assert after.status_code == 200
    assert ready.status_code == 200
    assert running.health.snapshot() == {
        "status": "serving",
        "components": {"logger": "serving", "http": "serving"},
    }
