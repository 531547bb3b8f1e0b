"""The Starlette and FastAPI examples: their APIs in-process, then as real processes.

In-process tests start each example through the ``mikros_service`` fixture
and talk to its real listener with httpx; process tests run it the way
users do (``mikros-trio run examples/<name>/main.py``, the port from
``MIKROS_HTTP_PORT``) and stop it with SIGTERM: the app's lifespan starts
before the service is ready and ends after the drain. Every wait is bounded.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from helpers import (
    MIKROS_TRIO,
    PATIENCE,
    REPO,
    Spawn,
    free_port,
    import_example,
    log_lines,
    wait_until_ok,
)
from mikros_trio.testing import ServiceStarter

STARLETTE = REPO / "examples" / "starlette"
FASTAPI = REPO / "examples" / "fastapi"


@pytest.fixture(name="notes", scope="module")
def fixture_notes() -> Iterator[ModuleType]:
    """examples/starlette/main.py, imported under a name of its own."""
    module = import_example(STARLETTE / "main.py", "starlette_example_main")
    yield module
    del sys.modules[module.__name__]


@pytest.fixture(name="orders", scope="module")
def fixture_orders() -> Iterator[ModuleType]:
    """examples/fastapi/main.py, imported under a name of its own."""
    module = import_example(FASTAPI / "main.py", "fastapi_example_main")
    yield module
    del sys.modules[module.__name__]


def client(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=PATIENCE)


async def test_starlette_notes_round_trip_and_errors(
    mikros_service: ServiceStarter, notes: ModuleType
) -> None:
    """A note written is read back; empty text is 400 and a missing note 404, as Mikros JSON."""
    running = await mikros_service.start(notes.Container, STARLETTE / "service.toml")
    async with client(running.ports["http"]) as http:
        created = await http.post("/notes", content=b"buy ink")
        assert (created.status_code, created.json()) == (201, {"id": 1})
        read = await http.get("/notes/1")
        assert read.json() == {"id": 1, "text": "buy ink"}
        empty = await http.post("/notes", content=b" ")
        missing = await http.get("/notes/9")
        metrics = (await http.get("/metrics")).text
    assert (empty.status_code, empty.json()["kind"]) == (400, "ValidationError")
    assert (missing.status_code, missing.json()["kind"]) == (404, "NotFoundError")
    assert missing.json()["message"] == "note 9 does not exist"
    assert missing.json()["service_name"] == "notes"
    assert 'route="/notes/{note_id:int}"' in metrics


async def test_fastapi_orders_round_trip_and_errors(
    mikros_service: ServiceStarter, orders: ModuleType
) -> None:
    """An order placed is read back; a bad body or id is 422, a missing order 404, Mikros JSON."""
    running = await mikros_service.start(orders.Container, FASTAPI / "service.toml")
    async with client(running.ports["http"]) as http:
        placed = await http.post("/orders", json={"item": "pen", "quantity": 2})
        assert placed.status_code == 201
        assert placed.json() == {"item": "pen", "quantity": 2, "id": 1}
        assert (await http.get("/orders/1")).json() == placed.json()
        invalid = await http.post("/orders", json={"item": "pen", "quantity": 0})
        not_a_number = await http.get("/orders/x")
        missing = await http.get("/orders/9")
    assert (invalid.status_code, invalid.json()["kind"]) == (422, "ValidationError")
    assert "body.quantity" in invalid.json()["message"]
    assert (not_a_number.status_code, not_a_number.json()["kind"]) == (422, "ValidationError")
    assert missing.status_code == 404
    assert missing.json()["message"] == "order 9 does not exist"


@pytest.mark.parametrize(
    ("example", "route", "app"),
    [(STARLETTE, "/notes/{note_id:int}", "notes"), (FASTAPI, "/orders/{order_id}", "orders")],
    ids=["starlette", "fastapi"],
)
def test_example_process_runs_its_lifespan_around_serving(
    spawn: Spawn, example: Path, route: str, app: str
) -> None:
    """Run by the CLI, it is ready after its lifespan starts; SIGTERM drains it, exit 0."""
    port = free_port()
    child = spawn(MIKROS_TRIO, "run", example / "main.py", env={"MIKROS_HTTP_PORT": str(port)})
    wait_until_ok(child, port)
    wait_until_ok(child, port, "/livez")
    missing = httpx.get(f"http://127.0.0.1:{port}/{app}/1", timeout=PATIENCE, trust_env=False)
    assert missing.status_code == 404
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.report()
    lines = log_lines(child.stdout)
    assert len(lines) == len(child.stdout.splitlines()), child.report()  # nothing printed
    events = [(line["logger"], line["event"]) for line in lines]
    serving = events.index((app, f"{app} serving"))
    drained = events.index((app, f"{app} drained"))
    ready = events.index(("mikros_trio.lifecycle", "service ready"))
    access = [line for line in lines if line["logger"] == "mikros_trio.access"]
    assert serving < ready < drained, child.report()
    assert lines[drained][app] == 0, child.report()  # nothing was written
    assert [(line["name"], line["status"]) for line in access] == [(route, "404")]
    assert "Traceback" not in child.stderr
