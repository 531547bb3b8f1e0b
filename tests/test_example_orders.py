"""The orders example: HTTP API, worker, PostgreSQL and the greeter, all real.

Every test gets its own database on the session's throwaway cluster
(``postgres_dsn``) and a real greeter (``examples/grpc``), in-process
through ``mikros_service`` or as a process. In-process tests pin the API
(create, idempotency, validation, get, keyset pagination), the worker
(confirms with the greeter's answer; a greeter that is down loses no
order; an order it refuses holds none up; two replicas greet each order
once) and the pool as an overridable provider. Process tests run the
example the way users do (``mikros-trio run``): bad configuration exits
2; a worker stopped mid-batch (cut or killed) loses no order; SIGTERM under
load keeps every 2xx in the database, answers no 5xx, exits 0 and closes
the pool last. What a test reads from the database it
reads with psycopg, apart from the service. Every wait is bounded.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import psycopg
import pytest
import trio
from opentelemetry.trace import SpanKind

from helpers import (
    GRPC,
    MIKROS_TRIO,
    PATIENCE,
    REPO,
    Child,
    Examples,
    Spawn,
    free_port,
    import_example,
    leaked_forms,
    log_lines,
    parse,
    tracing_of,
    value,
    wait_until_ok,
    wait_until_serving,
)
from mikros_trio import ConditionError, ServiceError
from mikros_trio.testing import RunningService, ServiceStarter

pytestmark = pytest.mark.postgres

ORDERS = REPO / "examples" / "orders"

#: A body the API accepts.
PEN = {"customer": "Ada", "item": "pen", "quantity": 2}


@pytest.fixture(name="orders", scope="module")
def fixture_orders() -> Iterator[ModuleType]:
    """examples/orders/main.py imported under a name no other example's ``main`` takes."""
    module = import_example(ORDERS / "main.py", "orders_example_main")
    try:
        yield module
    finally:
        del sys.modules[module.__name__]


def _config(tmp_path: Path, greeter_port: int) -> Path:
    """A copy of the example's service.toml whose ``[clients.greeter]`` port is ``greeter_port``."""
    text = (ORDERS / "service.toml").read_text()
    assert text.count("port = 50051") == 1, "the greeter's port is not in service.toml once"
    path = tmp_path / "service.toml"
    path.write_text(text.replace("port = 50051", f"port = {greeter_port}"))
    return path


def _nowhere() -> str:
    """A DSN nothing listens at: a pool opened there fails (within a second)."""
    return f"postgresql://nobody@127.0.0.1:{free_port()}/none?connect_timeout=1"


def _environ(dsn: str) -> dict[str, str]:
    """The service's environment: ours, ``DATABASE_URL``, spans kept in memory."""
    return {**os.environ, "DATABASE_URL": dsn, "OTEL_TRACES_EXPORTER": "memory"}


def _client(service: RunningService) -> httpx.AsyncClient:
    """An httpx client of ``service``'s HTTP port."""
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.ports['http']}", timeout=PATIENCE)


# --8<-- [start:world]
@dataclass
class World:
    """What a test starts services with: the harness, both examples, a folder, a database."""

    starter: ServiceStarter
    examples: Examples
    orders: ModuleType
    tmp_path: Path
    dsn: str

    async def greeter(self, port: int = 0, **options: Any) -> RunningService:
        """The greeter example, ready; on ``port`` when given (else an ephemeral one).

        ``options`` go to the harness (``overrides=``).
        """
        environ = {
            **os.environ,
            "MIKROS_GRPC_PORT": str(port),
            "MIKROS_METRICS_PORT": "0",
            "OTEL_TRACES_EXPORTER": "memory",
        }
        with trio.fail_after(PATIENCE):
            return await self.starter.start(
                self.examples.greeter.Container,
                GRPC / "service.toml",
                environ=environ,
                ephemeral_ports=False,
                **options,
            )

    async def greeter_and_config(self) -> tuple[RunningService, Path]:
        """A running greeter, and a service.toml for the orders service pointed at it."""
        greeter = await self.greeter()
        return greeter, _config(self.tmp_path, greeter.ports["grpc"])

    async def service(self, config: Path, **options: Any) -> RunningService:
        """The orders service on ``config``, ready; ``options`` go to the harness."""
        options.setdefault("environ", _environ(self.dsn))
        with trio.fail_after(PATIENCE):
            return await self.starter.start(self.orders.Container, config, **options)

    async def start(
        self, *, greeter_port: int | None = None, overrides: Mapping[str, Any] | None = None
    ) -> RunningService:
        """The greeter, then the orders service pointed at it (or at ``greeter_port``)."""
        if greeter_port is None:
            _, config = await self.greeter_and_config()
        else:
            config = _config(self.tmp_path, greeter_port)
        return await self.service(config, overrides=overrides)


# --8<-- [end:world]


@pytest.fixture(name="world")
def fixture_world(
    mikros_service: ServiceStarter,
    examples: Examples,
    orders: ModuleType,
    tmp_path: Path,
    postgres_dsn: str,
) -> World:
    """This test's :class:`World`: services it starts use its own database."""
    return World(mikros_service, examples, orders, tmp_path, postgres_dsn)


@pytest.fixture(name="started")
async def fixture_started(world: World) -> RunningService:
    """The greeter and the orders service on this test's database, ready."""
    return await world.start()


@pytest.fixture(name="client")
async def fixture_client(started: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client of the ``started`` orders service."""
    async with _client(started) as client:
        yield client


def _rows(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read straight from the database, apart from the service (blocking)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


async def _read(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return await trio.to_thread.run_sync(_rows, dsn, sql, params)


async def _until_confirmed(dsn: str, what: str) -> None:
    """Wait (bounded) until no order in ``dsn`` is 'new' any more."""

    async def none_new() -> bool:
        rows = await _read(dsn, "SELECT count(*) FROM orders WHERE status = 'new'")
        return rows == [(0,)]

    await _eventually(none_new, what)


async def _eventually(check: Callable[[], Any], what: str) -> None:
    """Poll the async ``check`` until it returns true; fail naming ``what`` after PATIENCE."""
    with trio.move_on_after(PATIENCE):
        while not await check():  # noqa: ASYNC110 - the state is another process's
            await trio.sleep(0.05)
        return
    pytest.fail(f"{what} did not happen within {PATIENCE} s")


# -- the API ------------------------------------------------------------------------


# --8<-- [start:round-trip]
async def test_create_then_get_round_trip(client: httpx.AsyncClient, postgres_dsn: str) -> None:
    """POST answers 201 with the order, GET /orders/<id> answers it, the row is in the table."""
    before = datetime.now(UTC)
    created = await client.post("/orders", json=PEN)
    assert created.status_code == 201, created.text
    order = created.json()
    assert {key: order[key] for key in PEN} == PEN
    assert order["status"] in ("new", "confirmed")  # the worker may already have run
    assert datetime.fromisoformat(order["created_at"]) >= before.replace(microsecond=0)
    got = await client.get(f"/orders/{order['id']}")
    assert got.status_code == 200
    assert {key: got.json()[key] for key in (*PEN, "id", "created_at")} == {
        key: order[key] for key in (*PEN, "id", "created_at")
    }
    rows = await _read(postgres_dsn, "SELECT id, customer, item, quantity FROM orders")
    assert rows == [(order["id"], "Ada", "pen", 2)]


# --8<-- [end:round-trip]


async def test_same_idempotency_key_and_body_returns_the_same_order(
    client: httpx.AsyncClient, postgres_dsn: str
) -> None:
    """A repeated key with the same body (spelled differently) answers 200 and creates nothing."""
    headers = {"Idempotency-Key": "order-1", "content-type": "application/json"}
    first = await client.post("/orders", json=PEN, headers=headers)
    # Same values, other key order and spacing: the same request.
    again = await client.post(
        "/orders",
        content=b'{ "quantity": 2,  "item": "pen", "customer": "Ada" }',
        headers=headers,
    )
    other = await client.post("/orders", json=PEN, headers={"Idempotency-Key": "order-2"})
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert again.json()["id"] == first.json()["id"]
    assert other.json()["id"] != first.json()["id"]
    rows = await _read(postgres_dsn, "SELECT idempotency_key FROM orders ORDER BY id")
    assert rows == [("order-1",), ("order-2",)]


async def test_concurrent_requests_with_one_key_create_one_order(
    client: httpx.AsyncClient, postgres_dsn: str
) -> None:
    """20 requests with one key at once: one 201, nineteen 200, all the same order, one row."""
    answers: list[httpx.Response] = []

    async def post() -> None:
        answers.append(await client.post("/orders", json=PEN, headers={"Idempotency-Key": "k"}))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(post)
    assert sorted(answer.status_code for answer in answers) == [200] * 19 + [201]
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert await _read(postgres_dsn, "SELECT count(*) FROM orders") == [(1,)]


async def test_idempotency_key_reused_for_another_order_is_refused(
    client: httpx.AsyncClient, postgres_dsn: str
) -> None:
    """The same key with another body: 412 ConditionError naming the key; nothing created."""
    headers = {"Idempotency-Key": "order-1"}
    assert (await client.post("/orders", json=PEN, headers=headers)).status_code == 201
    refused = await client.post("/orders", json={**PEN, "quantity": 3}, headers=headers)
    assert refused.status_code == 412
    wire = refused.json()
    assert wire["kind"] == "ConditionError"
    assert "'order-1'" in wire["message"]
    assert isinstance(ServiceError.from_wire(wire), ConditionError)
    assert await _read(postgres_dsn, "SELECT quantity FROM orders") == [(2,)]


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        pytest.param(b"[1]", {}, "expected a JSON object", id="array"),
        pytest.param(b"{not json", {}, "expected a JSON object", id="not-json"),
        pytest.param(b'{"item": "pen", "quantity": 1}', {}, "customer: ", id="no-customer"),
        pytest.param(
            b'{"customer": " ", "item": "pen", "quantity": 1}', {}, "customer: ", id="blank"
        ),
        pytest.param(json.dumps({**PEN, "item": "x" * 101}).encode(), {}, "item: ", id="long-item"),
        pytest.param(json.dumps({**PEN, "quantity": 0}).encode(), {}, "quantity: ", id="zero"),
        pytest.param(
            json.dumps({**PEN, "quantity": 1001}).encode(), {}, "quantity: ", id="too-many"
        ),
        pytest.param(json.dumps({**PEN, "quantity": 1.5}).encode(), {}, "quantity: ", id="float"),
        pytest.param(json.dumps({**PEN, "quantity": True}).encode(), {}, "quantity: ", id="bool"),
        pytest.param(
            json.dumps({**PEN, "price": 3}).encode(), {}, "unknown fields ['price']", id="unknown"
        ),
        pytest.param(
            json.dumps(PEN).encode(), {"Idempotency-Key": ""}, "Idempotency-Key: ", id="empty-key"
        ),
        pytest.param(
            json.dumps(PEN).encode(),
            {"Idempotency-Key": "k" * 201},
            "Idempotency-Key: ",
            id="long-key",
        ),
    ],
)
async def test_invalid_order_is_a_mikros_400(
    client: httpx.AsyncClient,
    postgres_dsn: str,
    body: bytes,
    headers: dict[str, str],
    message: str,
) -> None:
    """A bad body or key answers 400 with a Mikros ValidationError body, and creates nothing."""
    response = await client.post(
        "/orders", content=body, headers={"content-type": "application/json", **headers}
    )
    assert response.status_code == 400, response.text
    wire = response.json()
    assert wire["kind"] == "ValidationError"
    assert wire["service_name"] == "orders"
    assert wire["message"].startswith(message), wire
    assert await _read(postgres_dsn, "SELECT count(*) FROM orders") == [(0,)]


@pytest.mark.parametrize("order_id", ["7", "9223372036854775808", "99999999999999999999999"])
async def test_missing_order_is_a_mikros_404(
    client: httpx.AsyncClient,
    order_id: str,
) -> None:
    """An unknown id, a bigint's overflow included, answers 404 NotFoundError (never a 500)."""
    response = await client.get(f"/orders/{order_id}")
    assert response.status_code == 404
    assert response.json() == {
        "code": 0,
        "kind": "NotFoundError",
        "message": f"order {order_id} does not exist",
        "service_name": "orders",
    }


async def test_pages_walk_every_order_once_while_orders_arrive(
    client: httpx.AsyncClient, postgres_dsn: str
) -> None:
    """Following ``next`` visits each order once, in id order, even as new ones are created."""
    for number in range(23):
        await client.post("/orders", json={**PEN, "customer": f"c{number}"})
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    for pages in range(1, 20):  # bounded: 23 + 9 new orders take 5 pages of 7
        params = {"limit": "7"} if cursor is None else {"limit": "7", "after": cursor}
        page = (await client.get("/orders", params=params)).json()
        assert len(page["orders"]) <= 7
        seen += [order["id"] for order in page["orders"]]
        cursor = page["next"]
        if cursor is None:
            break
        # New orders land behind the cursor: the walk meets them, never twice.
        for _ in range(3 if pages <= 3 else 0):
            await client.post("/orders", json=PEN)
    default = (await client.get("/orders")).json()
    ids = [row[0] for row in await _read(postgres_dsn, "SELECT id FROM orders ORDER BY id")]
    assert seen == ids
    assert len(ids) == 32
    assert pages == 5
    # Without ?limit=, a page holds [service] page_size (20) orders.
    assert [order["id"] for order in default["orders"]] == ids[:20]
    assert default["next"] == str(ids[19])


@pytest.mark.parametrize(
    "query",
    [
        *("limit=0", "limit=101", "limit=-1", "limit=abc", "limit=1.5", "limit=%C2%B2"),
        *("after=-1", "after=x", "after=9223372036854775808"),
    ],
)
async def test_list_parameters_out_of_bounds_are_a_400(
    client: httpx.AsyncClient,
    query: str,
) -> None:
    """limit outside 1..max_page_size (100) or a cursor that is no bigint: 400 naming it."""
    response = await client.get(f"/orders?{query}")
    largest = await client.get("/orders?limit=100")
    assert response.status_code == 400, response.text
    assert response.json()["kind"] == "ValidationError"
    assert response.json()["message"].startswith(query.split("=")[0] + ": ")
    assert largest.status_code == 200


# -- the worker -----------------------------------------------------------------------


async def test_worker_confirms_orders_with_the_greeters_answer(
    started: RunningService, client: httpx.AsyncClient, postgres_dsn: str
) -> None:
    """Each new order becomes 'confirmed', its confirmation the greeter's reply to its customer."""
    for customer in ("Ada", "Grace", "Edsger"):
        assert (await client.post("/orders", json={**PEN, "customer": customer})).is_success

    await _until_confirmed(postgres_dsn, "confirming three orders")
    listed = (await client.get("/orders")).json()["orders"]
    assert [(order["customer"], order["confirmation"]) for order in listed] == [
        ("Ada", "Hello, Ada!"),
        ("Grace", "Hello, Grace!"),
        ("Edsger", "Hello, Edsger!"),
    ]
    rows = await _read(postgres_dsn, "SELECT status, confirmed_at >= created_at FROM orders")
    assert rows == [("confirmed", True)] * 3
    # Each worker run is a trace: its claim, greetings and updates are the run's children
    # (the three orders may have been confirmed by one run or several).
    spans = tracing_of(started).spans()
    names = {span.context.span_id: span.name for span in spans if span.context is not None}
    greetings = [span for span in spans if span.name.endswith("SayHello")]
    assert len(greetings) == 3
    runs = {span.parent.span_id for span in greetings if span.parent is not None}
    assert {names[run] for run in runs} == {"worker"}
    for run in runs:
        children = [span.name for span in spans if span.parent and span.parent.span_id == run]
        verbs = sorted(name.split()[0] for name in children if name != greetings[0].name)
        count = children.count(greetings[0].name)
        assert verbs == ["SELECT", *["UPDATE"] * count], children


async def test_greeter_down_keeps_orders_new_until_it_is_back(world: World) -> None:
    """With the greeter unreachable, runs fail and orders stay 'new'; once it is up, confirmed."""
    port = free_port()  # nothing listens there yet
    started = await world.start(greeter_port=port)
    tracing = tracing_of(started)

    def failed_calls() -> int:
        return sum("SayHello" in span.name and not span.status.is_ok for span in tracing.spans())

    async with _client(started) as client:
        created = [(await client.post("/orders", json=PEN)).json()["id"] for _ in range(3)]

        async def refused_twice() -> bool:
            return failed_calls() >= 2

        # Two worker runs have met the refusal: the orders are still there, still new.
        await _eventually(refused_twice, "two failed calls to the greeter")
        rows = await _read(world.dsn, "SELECT id, status FROM orders ORDER BY id")
        assert rows == [(order_id, "new") for order_id in created]
        assert started.health.ready  # a peer down is not this service's failure

        await world.greeter(port)

        await _until_confirmed(world.dsn, "confirming the orders once the greeter is back")
        got = (await client.get(f"/orders/{created[0]}")).json()
    assert got["confirmation"] == "Hello, Ada!"


async def test_an_order_the_greeter_refuses_does_not_hold_up_the_others(
    started: RunningService, client: httpx.AsyncClient, postgres_dsn: str
) -> None:
    """A row the greeter refuses (an empty name, written by older code) stays 'new'; others pass."""
    insert = """
        INSERT INTO orders (request_hash, customer, item, quantity)
        VALUES ('written-by-hand', '', 'pen', 1) RETURNING id
    """
    [(poison,)] = await _read(postgres_dsn, insert)  # first in line: the lowest id
    for customer in ("Ada", "Grace"):
        assert (await client.post("/orders", json={**PEN, "customer": customer})).is_success
    tracing = tracing_of(started)

    async def others_confirmed_after_two_refusals() -> bool:
        # Two greetings for the others, and at least two attempts on the refused one.
        calls = sum("SayHello" in span.name for span in tracing.spans())
        confirmed = "SELECT count(*) FROM orders WHERE status = 'confirmed'"
        return calls >= 4 and await _read(postgres_dsn, confirmed) == [(2,)]

    await _eventually(others_confirmed_after_two_refusals, "confirming the orders behind it")
    rows = await _read(
        postgres_dsn, "SELECT status, confirmation FROM orders WHERE id = %s", (poison,)
    )
    assert rows == [("new", None)]
    assert started.health.ready


async def test_two_replicas_confirm_each_order_exactly_once(world: World) -> None:
    """Two services started together on one database: schema made once, one greeting per order."""
    greeter, config = await world.greeter_and_config()
    replicas: list[RunningService] = []

    async def start_replica() -> None:
        replicas.append(await world.service(config))

    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:  # both create the schema at once
            nursery.start_soon(start_replica)
            nursery.start_soon(start_replica)
    # Without the schema's advisory lock one of them fails here (UniqueViolation).
    assert [replica.health.ready for replica in replicas] == [True, True]
    count = 60
    clients = [_client(replica) for replica in replicas]
    async with clients[0], clients[1]:
        for number in range(count):
            response = await clients[number % 2].post(
                "/orders", json={**PEN, "customer": f"c{number}"}
            )
            assert response.status_code == 201

    await _until_confirmed(world.dsn, "confirming every order")
    rows = await _read(world.dsn, "SELECT customer, confirmation FROM orders")
    assert sorted(rows) == sorted((f"c{n}", f"Hello, c{n}!") for n in range(count))
    greetings = [
        span
        for span in tracing_of(greeter).spans()
        if span.kind == SpanKind.SERVER and span.name.endswith("SayHello")
    ]
    assert len(greetings) == count


# -- the pool is a provider like any other ---------------------------------------------


class FakeCursor:
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows
        self.rowcount = len(rows)

    async def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    async def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows


class FakePool:
    """The methods of ``mikros_trio.postgres``'s pool that the example uses, over a dict.

    It knows the example's statements by identity (they are the module's
    constants) and refuses any other: a handler that ran SQL the fake does
    not know would fail its request with a 500. ``statements`` records
    what ran, in order.
    """

    def __init__(self, orders: ModuleType) -> None:
        self.orders = orders
        self.rows: dict[int, dict[str, Any]] = {}
        self.statements: list[str] = []
        self._ids = itertools.count(1)

    def _row(self, row: Mapping[str, Any], *extra: str) -> tuple[Any, ...]:
        names = ("id", "customer", "item", "quantity", "status", "confirmation", "created_at")
        return tuple(row[name] for name in (*names, *extra))

    def _run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        o = self.orders
        self.statements.append(sql)
        if sql == o.SCHEMA_LOCK or sql in o.SCHEMA:
            return []
        if sql == o.INSERT:
            key, digest, customer, item, quantity = params
            if key is not None and any(r["key"] == key for r in self.rows.values()):
                return []
            row = {
                "id": next(self._ids),
                "key": key,
                "hash": digest,
                "customer": customer,
                "item": item,
                "quantity": quantity,
                "status": "new",
                "confirmation": None,
                "created_at": datetime.now(UTC),
            }
            self.rows[row["id"]] = row
            return [self._row(row)]
        if sql == o.BY_KEY:
            return [self._row(r, "hash") for r in self.rows.values() if r["key"] == params[0]]
        if sql == o.BY_ID:
            return [self._row(self.rows[params[0]])] if params[0] in self.rows else []
        if sql == o.PAGE:
            after, limit = params
            return [self._row(r) for r in self.rows.values() if r["id"] > after][:limit]
        if sql == o.CLAIM:
            new = [r for r in self.rows.values() if r["status"] == "new"][: params[0]]
            return [(r["id"], r["customer"]) for r in new]
        if sql == o.CONFIRM:
            message, order_id = params
            self.rows[order_id].update(status="confirmed", confirmation=message)
            return []
        raise AssertionError(f"the fake pool does not know this statement: {sql}")

    async def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = self._run(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._run(sql, params)

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> FakeCursor:
        return FakeCursor(self._run(sql, params))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakePool]:
        yield self  # one task at a time touches the dict: nothing to isolate


@pytest.fixture(name="no_database")
def fixture_no_database(
    mikros_service: ServiceStarter, examples: Examples, orders: ModuleType, tmp_path: Path
) -> World:
    """A :class:`World` whose DATABASE_URL leads nowhere: opening the real pool would fail."""
    return World(mikros_service, examples, orders, tmp_path, _nowhere())


# --8<-- [start:fake-pool]
async def test_pool_overridden_by_a_fake_serves_everything(
    no_database: World, orders: ModuleType
) -> None:
    """overrides={"db": fake}: schema, API and worker all run against it; no database is opened."""
    fake = FakePool(orders)
    started = await no_database.start(overrides={"db": fake})
    assert fake.statements[:3] == [orders.SCHEMA_LOCK, *orders.SCHEMA]  # the store's on_start
    async with _client(started) as client:
        first = await client.post("/orders", json=PEN, headers={"Idempotency-Key": "a"})
        again = await client.post("/orders", json=PEN, headers={"Idempotency-Key": "a"})
        other = await client.post("/orders", json={**PEN, "customer": "Grace"})

        async def confirmed() -> bool:
            return all(row["status"] == "confirmed" for row in fake.rows.values())

        await _eventually(confirmed, "confirming the fake's orders")
        got = (await client.get(f"/orders/{other.json()['id']}")).json()
        page = (await client.get("/orders", params={"limit": "1"})).json()
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert first.json()["id"] == again.json()["id"]
    assert len(fake.rows) == 2
    assert got["confirmation"] == "Hello, Grace!"
    assert [order["id"] for order in page["orders"]] == [first.json()["id"]]
    assert page["next"] == str(first.json()["id"])
    assert "db" not in started.health.components  # an object: nothing to start


# --8<-- [end:fake-pool]


class BrokenPool(FakePool):
    """A fake whose reads fail the way a driver does, quoting a row's values."""

    async def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        raise RuntimeError("duplicate key value: (customer)=(Ada Lovelace, 12 Tower Hill)")


async def test_database_error_is_a_500_that_does_not_quote_it(
    no_database: World, orders: ModuleType
) -> None:
    """A failing query answers 500 InternalError whose body holds none of the error's text."""
    started = await no_database.start(overrides={"db": BrokenPool(orders)})
    async with _client(started) as client:
        response = await client.post("/orders", json=PEN)
    assert response.status_code == 500
    wire = response.json()
    assert wire["kind"] == "InternalError"
    assert "Tower Hill" not in response.text  # [features.errors] expose_details = false


# -- a real process ---------------------------------------------------------------------


def _spawn_greeter(spawn: Spawn) -> tuple[Child, int]:
    """``python examples/grpc/main.py`` on free ports; returns once it is SERVING."""
    port = free_port()
    env = {"MIKROS_GRPC_PORT": str(port), "MIKROS_METRICS_PORT": str(free_port())}
    child = spawn(sys.executable, GRPC / "main.py", env=env)
    wait_until_serving(child, port)
    return child, port


def _run_orders(spawn: Spawn, config: Path, env: Mapping[str, str | None], *flags: str) -> Child:
    """``mikros-trio run examples/orders/main.py --config <config> <flags>``, as users start it."""
    return spawn(MIKROS_TRIO, "run", "examples/orders/main.py", "--config", config, *flags, env=env)


def _spawn_orders(spawn: Spawn, config: Path, dsn: str, **env: str) -> tuple[Child, int]:
    """:func:`_run_orders` with ``--verbose`` (lifecycle events on stderr); returns once ready."""
    port = free_port()
    environ = {"DATABASE_URL": dsn, "MIKROS_HTTP_PORT": str(port), **env}
    child = _run_orders(spawn, config, environ, "--verbose")
    wait_until_ok(child, port)
    return child, port


def _events(child: Child) -> list[str]:
    """The lifecycle events ``--verbose`` printed on stderr (``"http: stopped"``…), in order."""
    return [line.split("] ", 1)[1] for line in child.stderr.splitlines() if line.startswith("[")]


def _pool_closed_last(child: Child) -> None:
    """The pool began to stop only after the HTTP server and the worker had stopped."""
    events = _events(child)
    for done in ("http: stopped", "worker: stopped", "store: stopped"):
        assert events.index(done) < events.index("db: stopping"), child.report()
    assert "db: stopped" in events, child.report()


def _with_password(dsn: str, password: str) -> str:
    """``dsn`` with a password for its user (the test cluster trusts 127.0.0.1: any is accepted)."""
    scheme, rest = dsn.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{host}"


def test_process_serves_confirms_and_stops_on_sigterm(
    spawn: Spawn, tmp_path: Path, postgres_dsn: str
) -> None:
    """As processes: create, confirmed via the greeter; SIGTERM: exit 0, pool last, secret kept."""
    _, greeter_port = _spawn_greeter(spawn)
    dsn = _with_password(postgres_dsn, "pw-0rders-s3cret")
    child, port = _spawn_orders(spawn, _config(tmp_path, greeter_port), dsn)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=PATIENCE) as client:
        created = client.post("/orders", json=PEN, headers={"Idempotency-Key": "p"})
        assert created.status_code == 201, child.report()
        order_id = created.json()["id"]
        deadline = time.monotonic() + PATIENCE
        while client.get(f"/orders/{order_id}").json()["status"] != "confirmed":
            assert time.monotonic() < deadline, child.report()
            time.sleep(0.05)
        health = client.get("/healthz").json()
        metrics = client.get("/metrics").text
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.report()
    _pool_closed_last(child)
    # The pool is a component with a health check; every layer is measured.
    assert health["components"]["db"] == "serving", health
    assert health["checks"]["db"]["ok"] is True, health
    samples = parse(metrics)
    assert value(samples, "http_requests_total", method="POST", route="/orders", status="201") == 1
    insert = {"operation": "INSERT", "outcome": "ok", "system": "postgresql"}
    assert value(samples, "db_client_operations_total", **insert) == 1
    greeted = {"client": "greeter", "code": "OK", "method": "/greeter.Greeter/SayHello"}
    assert value(samples, "grpc_client_handled_total", **greeted) == 1
    assert "Traceback" not in child.stderr, child.report()
    output = child.stdout + child.stderr
    assert leaked_forms(dsn, output) == [], child.report()
    assert "pw-0rders-s3cret" not in output
    assert _rows(postgres_dsn, "SELECT confirmation FROM orders") == [("Hello, Ada!",)]


@pytest.mark.parametrize(
    ("edit", "env", "message"),
    [
        pytest.param(
            ("page_size = 20 ", "page_size = 200 "),
            {},
            "service.page_size: expected an integer between 1 and 100, got 200",
            id="page-size-bound",
        ),
        pytest.param(
            ("max_page_size = 100 ", "max_page_size = 10 "),
            {},
            "service: page_size must not exceed max_page_size",
            id="page-sizes-disagree",
        ),
        pytest.param(
            None,
            {"DATABASE_URL": None},
            "required environment variable DATABASE_URL is not set",
            id="no-database-url",
        ),
    ],
)
def test_bad_configuration_exits_2_before_anything_starts(
    spawn: Spawn,
    tmp_path: Path,
    edit: tuple[str, str] | None,
    env: dict[str, str | None],
    message: str,
) -> None:
    """A setting out of bounds, or no DATABASE_URL: one clear line, exit 2, no traceback."""
    config = _config(tmp_path, free_port())
    if edit is not None:
        text = config.read_text()
        assert text.count(edit[0]) == 1
        config.write_text(text.replace(*edit))
    child = _run_orders(spawn, config, {"DATABASE_URL": _nowhere(), **env})
    assert child.wait() == 2, child.report()
    assert message in child.stderr, child.report()
    assert "Traceback" not in child.stderr + child.stdout


def _gated_greeter(examples: Examples) -> Any:
    """The greeter's servicer, holding every SayHello until ``release`` is set.

    ``entered`` is set when the first call arrives: the worker then holds
    its batch's rows locked, in an open transaction.
    """

    class Gated(examples.greeter.Greeter):
        def __init__(self) -> None:
            super().__init__(examples.greeter.Settings())
            self.entered = trio.Event()
            self.release = trio.Event()

        async def SayHello(self, message: Any) -> Any:
            self.entered.set()
            await self.release.wait()
            return await super().SayHello(message)

    return Gated()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_worker_stopped_mid_batch_loses_no_order(
    spawn: Spawn, world: World, signum: signal.Signals
) -> None:
    """Stopped mid-batch (cut at the drain deadline, or killed): rolled back, later confirmed."""
    gated = _gated_greeter(world.examples)
    greeter = await world.greeter(overrides={"greeter": gated})
    config = _config(world.tmp_path, greeter.ports["grpc"])
    text = config.read_text()
    for key, seconds in (("drain_timeout", "1.0"), ("shutdown_timeout", "3.0")):
        text, count = re.subn(rf"(?m)^{key} = [0-9.]+", f"{key} = {seconds}", text)
        assert count == 1
    config.write_text(text)
    child, port = await trio.to_thread.run_sync(lambda: _spawn_orders(spawn, config, world.dsn))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=PATIENCE) as client:
        created = [
            (await client.post("/orders", json={**PEN, "customer": f"c{n}"})).json()["id"]
            for n in range(3)
        ]
    with trio.fail_after(PATIENCE):
        await gated.entered.wait()
    child.send(signum)
    code = await trio.to_thread.run_sync(child.wait)
    if signum == signal.SIGTERM:
        assert code == 0, child.report()  # a cut is a warning, not a failure
        events = _events(child)
        cut = next(n for n, event in enumerate(events) if event.startswith("worker: cut"))
        assert cut < events.index("db: stopping"), child.report()
    else:
        assert code == -signal.SIGKILL

    rows: list[tuple[Any, ...]] = []

    async def unlocked() -> bool:
        nonlocal rows
        try:
            rows = await _read(
                world.dsn, "SELECT id, status FROM orders ORDER BY id FOR UPDATE NOWAIT"
            )
        except psycopg.errors.LockNotAvailable:
            return False  # the server has not yet seen the client go
        return True

    await _eventually(unlocked, "the batch's locks released")
    assert rows == [(order_id, "new") for order_id in created]

    gated.release.set()
    await trio.to_thread.run_sync(lambda: _spawn_orders(spawn, config, world.dsn))
    await _until_confirmed(world.dsn, "confirming the orders in a new process")
    confirmations = await _read(world.dsn, "SELECT confirmation FROM orders ORDER BY id")
    assert confirmations == [(f"Hello, c{n}!",) for n in range(3)]


# -- shutdown under load ------------------------------------------------------------------


@dataclass
class Shot:
    """One POST of the load: its key, when it went out and came back, and how it ended."""

    key: str
    sent: float
    done: float = math.inf
    outcome: str = ""  # the status code, or the httpx error's class name
    order_id: int | None = None


#: Concurrent clients of the load test.
CLIENTS = 50

#: How a request the server no longer takes shows at the client: the listener
#: is closed, or a keep-alive connection was closed as idle just as the
#: request went out on it. Anything else must be a 2xx.
REFUSED = ("ConnectError", "RemoteProtocolError", "ReadError", "WriteError")


class Load:
    """Clients that each create orders back to back, each with its own idempotency key."""

    def __init__(self, client: httpx.AsyncClient, until: float) -> None:
        self.client = client
        self.until = until  # perf_counter time after which no client sends again
        self.shots: list[Shot] = []
        self.signalled = math.inf
        self.created = 0
        #: Set once the load is well under way: two orders per client created,
        #: and half the clients with a request in flight.
        self.under_way = trio.Event()

    def in_flight(self) -> int:
        return sum(shot.done == math.inf for shot in self.shots)

    async def run_client(self, number: int) -> None:
        for count in range(1000):  # bounded in count as well as time
            if time.perf_counter() > self.until:
                return
            shot = Shot(f"c{number}-{count}", time.perf_counter())
            self.shots.append(shot)
            try:
                response = await self.client.post(
                    "/orders",
                    json={**PEN, "customer": f"c{number}"},
                    # The key as request id too: the service's log lines name the shot.
                    headers={"Idempotency-Key": shot.key, "x-request-id": shot.key},
                )
            except httpx.TransportError as error:
                shot.outcome = type(error).__name__
            else:
                shot.outcome = str(response.status_code)
                if response.is_success:
                    shot.order_id = response.json()["id"]
                    self.created += 1
            shot.done = time.perf_counter()
            if not shot.outcome.startswith("2"):
                return  # refused: the server is going away
            if self.created >= 2 * CLIENTS and self.in_flight() >= CLIENTS // 2:
                self.under_way.set()


# A POST whose connection the server closes before httpx has sent its body
# leaves httpx's body generator unfinished; Trio warns when it is collected.
# That is the client library's, not the service's: the outcome is recorded.
@pytest.mark.filterwarnings(
    "ignore:Async generator 'httpx._content.ByteStream.__aiter__':ResourceWarning"
)
async def test_sigterm_under_load_loses_no_acknowledged_order(spawn: Spawn, world: World) -> None:
    """50 clients creating orders, SIGTERM amid them: each 2xx stored, no 5xx, exit 0, pool last."""
    _, config = await world.greeter_and_config()
    child, port = await trio.to_thread.run_sync(
        lambda: _spawn_orders(spawn, config, world.dsn, OTEL_TRACES_EXPORTER="none")
    )
    clients = CLIENTS
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with trio.fail_after(4 * PATIENCE):
        async with (
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=PATIENCE
            ) as client,
            trio.open_nursery() as nursery,
        ):
            load = Load(client, until=time.perf_counter() + 2.0)
            for number in range(clients):
                nursery.start_soon(load.run_client, number)
            await load.under_way.wait()
            in_flight = load.in_flight()
            load.signalled = child.send(signal.SIGTERM)
    code = await trio.to_thread.run_sync(child.wait)
    assert code == 0, child.report()

    outcomes = {shot.outcome for shot in load.shots}
    assert outcomes <= {"201", *REFUSED}, (outcomes, child.report())
    acknowledged = {shot.key: shot.order_id for shot in load.shots if shot.outcome == "201"}
    stored = dict(await _read(world.dsn, "SELECT idempotency_key, id FROM orders"))
    assert acknowledged.items() <= stored.items()
    # The signal did cut into the load: requests were in flight, and some of
    # them, answered after it, were acknowledged (drained, not dropped).
    assert in_flight >= clients // 2
    assert any(shot.done > load.signalled and shot.outcome == "201" for shot in load.shots)
    _pool_closed_last(child)
    # An error line would be a request the service failed (a 500 the client
    # may never have seen) or a failed worker run. Request ids are the keys.
    errors = [line for line in log_lines(child.stdout) if line.get("level") == "error"]
    shots = {shot.key: shot for shot in load.shots}
    failed = [(line["event"], shots.get(line.get("request_id", ""))) for line in errors]
    assert failed == [], child.report()
    assert "Traceback" not in child.stderr, child.report()
