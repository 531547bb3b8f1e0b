"""Orders: an HTTP API and a worker on one PostgreSQL pool, calling the greeter over gRPC.

The service a team would copy: every feature on, the database as a
lifecycle resource, an idempotent create, keyset pagination, and a worker
that confirms new orders exactly once even when several replicas run.
Start PostgreSQL and the greeter, then the service, from the repository
root:

    python examples/grpc/main.py &
    DATABASE_URL=postgresql://app@127.0.0.1/orders python examples/orders/main.py
    curl -s localhost:8080/orders -H 'Idempotency-Key: k1' \\
         -d '{"customer": "Ada", "item": "pen", "quantity": 2}'     # 201, the new order
    curl -s localhost:8080/orders -H 'Idempotency-Key: k1' \\
         -d '{"customer": "Ada", "item": "pen", "quantity": 2}'     # 200, the same order
    curl -s localhost:8080/orders -H 'Idempotency-Key: k1' \\
         -d '{"customer": "Ada", "item": "ink", "quantity": 1}'     # 412: the key is taken
    curl -s localhost:8080/orders/1               # "confirmed" once the worker has run
    curl -s 'localhost:8080/orders?limit=10'      # a page, and the cursor of the next one
    curl -s localhost:8080/healthz                # the pool's state under "checks"

With another service.toml (a greeter elsewhere, other settings):
``mikros-trio run examples/orders/main.py --config my.toml``.

A key reused for another order is a Mikros ``ConditionError`` (HTTP 412):
Mikros has no "conflict" kind, and a Go or Rust client decodes this one.

How the pieces stand (each is a provider of ``Container`` below):

- ``db`` is a ``providers.Resource``: the pool opens before anything that
  uses it and closes after the HTTP server and the worker have drained, so
  no request in flight ever meets a closed pool. Its health shows on
  /healthz, and readiness is off while the database is unreachable.
- ``store`` creates the schema in its ``on_start`` (it is injected with
  ``db``, so it starts after the pool) and holds every SQL statement.
- ``app`` (HTTP) and ``worker`` only talk to ``store``; tests replace
  ``db`` with an in-memory fake and the rest runs unchanged.
- The worker claims new orders with ``FOR UPDATE SKIP LOCKED``: two
  replicas never confirm the same order, and a replica killed mid-batch
  loses nothing (its transaction rolls back; the orders stay "new").
  A greeter that is down ends the batch; those orders are retried on the
  next run. An order the greeter refuses stays "new" (and is logged as an
  error each run) without holding up the orders behind it.

``DATABASE_URL`` is a secret (``[features.env]``): it never appears in a
log line, span or error. ``MIKROS_HTTP_PORT`` picks another port.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# --8<-- [start:imports]
import trio
from dependency_injector import providers
from quart import request
from quart_trio import QuartTrio

import mikros_trio
import mikros_trio.grpc
from mikros_trio import (
    ConditionError,
    InternalError,
    Lifetime,
    NotFoundError,
    RPCError,
    ServiceContainer,
    ServiceError,
    ValidationError,
    postgres,
)

# --8<-- [end:imports]
# --8<-- [start:greeter-import]
# The greeter's generated client code lives with the greeter example.
sys.path.insert(0, str(Path(__file__).parents[1] / "grpc"))
from greeter_proto import greeter_grpc, greeter_pb2

# --8<-- [end:greeter-import]

log = logging.getLogger("orders")


# --8<-- [start:settings]
@dataclass(frozen=True)
class Settings:
    """The ``[service]`` table; every number is bounded, as the framework's own are."""

    page_size: int = field(
        default=20, metadata={"help": "Orders per page when ?limit= is absent.", "ge": 1, "le": 100}
    )
    max_page_size: int = field(
        default=100, metadata={"help": "Largest ?limit= accepted.", "ge": 1, "le": 1000}
    )
    confirm_batch: int = field(
        default=50, metadata={"help": "Orders one worker transaction claims.", "ge": 1, "le": 1000}
    )

    def __post_init__(self) -> None:
        # The framework reports this as a configuration error naming [service], exit code 2.
        if self.page_size > self.max_page_size:
            raise ValueError("page_size must not exceed max_page_size")


# --8<-- [end:settings]
# -- the data layer: every statement the service runs --------------------------------
#
# Kept as named constants so the whole schema and every query can be read in
# one place (and a test's fake pool can recognise them).

# --8<-- [start:queries]
#: Replicas starting together would race on CREATE TABLE IF NOT EXISTS (it is
#: not atomic against a concurrent one): a transaction-scoped advisory lock
#: makes them take turns. The number is this service's own choice.
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(7201)"

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS orders (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        idempotency_key text UNIQUE,
        request_hash text NOT NULL,
        customer text NOT NULL,
        item text NOT NULL,
        quantity integer NOT NULL CHECK (quantity > 0),
        status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'confirmed')),
        confirmation text,
        created_at timestamptz NOT NULL DEFAULT now(),
        confirmed_at timestamptz
    )
    """,
    # The worker's claim reads new orders in id order: this index holds only them.
    "CREATE INDEX IF NOT EXISTS orders_new ON orders (id) WHERE status = 'new'",
)

_COLUMNS = "id, customer, item, quantity, status, confirmation, created_at"

#: NULL keys never conflict, so orders without a key are always inserted.
INSERT = f"""
    INSERT INTO orders (idempotency_key, request_hash, customer, item, quantity)
    VALUES (%s, %s, %s, %s, %s)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING {_COLUMNS}
"""

BY_KEY = f"SELECT {_COLUMNS}, request_hash FROM orders WHERE idempotency_key = %s"

BY_ID = f"SELECT {_COLUMNS} FROM orders WHERE id = %s"

#: Keyset pagination: ``id > cursor`` walks the primary key, so a page costs
#: the same however deep it is, and orders created meanwhile never shift it.
PAGE = f"SELECT {_COLUMNS} FROM orders WHERE id > %s ORDER BY id LIMIT %s"

#: SKIP LOCKED: another replica's batch is skipped, not waited for.
CLAIM = """
    SELECT id, customer FROM orders WHERE status = 'new'
    ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED
"""

CONFIRM = """
    UPDATE orders SET status = 'confirmed', confirmation = %s, confirmed_at = now()
    WHERE id = %s
"""
# --8<-- [end:queries]

#: Ids are PostgreSQL bigints: a larger number in a URL names no order (and
#: must not reach the driver, which would refuse it with a 500).
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class NewOrder:
    """A validated request body."""

    customer: str
    item: str
    quantity: int

    def digest(self) -> str:
        """The request's fingerprint: the same order, however its JSON was spelled."""
        text = json.dumps([self.customer, self.item, self.quantity], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Order:
    id: int
    customer: str
    item: str
    quantity: int
    status: str
    confirmation: str | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Order:
        return cls(*row[:7])

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "created_at": self.created_at.isoformat()}


_FIELDS = {"customer", "item", "quantity"}
_TEXT_MAX = 100
_QUANTITY_MAX = 1000
_KEY_MAX = 200


# --8<-- [start:parse]
def parse_order(body: Any) -> NewOrder:
    """A :class:`NewOrder` from a request body, or a ``ValidationError`` saying what is wrong."""
    if not isinstance(body, dict):
        raise ValidationError(
            'expected a JSON object like {"customer": "Ada", "item": "pen", "quantity": 2}'
        )
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ValidationError(f"unknown fields {unknown}: expected customer, item, quantity")
    for name in ("customer", "item"):
        value = body.get(name)
        if not isinstance(value, str) or not value.strip() or len(value) > _TEXT_MAX:
            raise ValidationError(f"{name}: expected a non-empty string of at most {_TEXT_MAX}")
    quantity = body.get("quantity")
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise ValidationError(f"quantity: expected an integer from 1 to {_QUANTITY_MAX}")
    if not 1 <= quantity <= _QUANTITY_MAX:
        raise ValidationError(f"quantity: expected an integer from 1 to {_QUANTITY_MAX}")
    return NewOrder(body["customer"], body["item"], quantity)


# --8<-- [end:parse]
def parse_key(header: str | None) -> str | None:
    """The ``Idempotency-Key`` header's value (optional), or a ``ValidationError``."""
    if header is None:
        return None
    if not header or len(header) > _KEY_MAX or not header.isprintable():
        raise ValidationError(f"Idempotency-Key: expected 1 to {_KEY_MAX} printable characters")
    return header


def parse_int(args: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """Query parameter ``name`` as an integer in [low, high], or a ``ValidationError``."""
    text = args.get(name)
    if text is None:
        return default
    # isdigit() alone accepts "²" and other digits int() refuses.
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise ValidationError(f"{name}: expected an integer from {low} to {high}")
    return int(text)


# --8<-- [start:store]
class OrderStore:
    """The orders table: the only code that speaks SQL.

    Its ``on_start`` creates the schema; as ``db`` is injected here, the
    pool is open by then, and it stays open until this store's users (the
    HTTP app and the worker) have drained.
    """

    def __init__(self, db: postgres.Pool) -> None:
        self.db = db

    async def on_start(self) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(SCHEMA_LOCK)
            for statement in SCHEMA:
                await conn.execute(statement)

    async def create(self, order: NewOrder, key: str | None) -> tuple[Order, bool]:
        """The order and True when made now; the earlier one and False for a repeated key."""
        digest = order.digest()
        row = await self.db.fetchone(
            INSERT, (key, digest, order.customer, order.item, order.quantity)
        )
        if row is not None:
            return Order.from_row(row), True
        # The key was taken (by this very request sent before, or by a
        # concurrent one that has committed by now: the insert waited for it).
        row = await self.db.fetchone(BY_KEY, (key,))
        if row is None:  # orders are never deleted, so the conflicting row is there
            raise InternalError(f"idempotency key {key!r} conflicted, but no order holds it")
        if row[7] != digest:
            raise ConditionError(f"Idempotency-Key {key!r} was already used for a different order")
        return Order.from_row(row), False

    async def get(self, order_id: int) -> Order:
        row = await self.db.fetchone(BY_ID, (order_id,)) if order_id <= MAX_ID else None
        if row is None:
            raise NotFoundError(f"order {order_id} does not exist")
        return Order.from_row(row)

    async def page(self, after: int, limit: int) -> tuple[list[Order], int | None]:
        """Up to ``limit`` orders after id ``after``, and the cursor of the next page."""
        # One row more than asked says whether another page exists.
        rows = await self.db.fetchall(PAGE, (after, limit + 1))
        orders = [Order.from_row(row) for row in rows[:limit]]
        return orders, orders[-1].id if len(rows) > limit else None

    # --8<-- [end:store]
    # --8<-- [start:confirm-batch]
    async def confirm_batch(self, size: int, greet: Greet) -> int:
        """Confirm up to ``size`` new orders in one transaction; return how many.

        Each order's confirmation is the greeter's answer. If the greeter
        cannot be reached, the batch ends there: what was confirmed
        commits, the rest stays "new" for the next run. An order the
        greeter refuses (it answered with an error) stays "new" too, and
        the orders behind it go on. A cancellation (shutdown's deadline)
        rolls the whole batch back, which loses nothing either.
        """
        confirmed = 0
        async with self.db.transaction() as conn:
            cursor = await conn.execute(CLAIM, (size,))
            claimed = await cursor.fetchall()
            for done, (order_id, customer) in enumerate(claimed):
                try:
                    message = await greet(customer)
                except RPCError as error:
                    left = len(claimed) - done
                    log.warning("%d orders wait for the next run: %s", left, error.message)
                    break
                except ServiceError as error:
                    log.error("order %d: the greeter refused it: %s", order_id, error.message)
                    continue
                await conn.execute(CONFIRM, (message, order_id))
                confirmed += 1
        return confirmed


# --8<-- [end:confirm-batch]
# --8<-- [start:greet]
class Greet:
    """The greeter's SayHello, as the worker needs it: a name in, the message out."""

    def __init__(self, stub: greeter_grpc.GreeterStub) -> None:
        self.stub = stub

    async def __call__(self, name: str) -> str:
        reply = await mikros_trio.grpc.call(
            self.stub.SayHello, greeter_pb2.HelloRequest(name=name), destination="greeter"
        )
        message: str = reply.message
        return message


# --8<-- [end:greet]
# --8<-- [start:worker]
class Confirmer:
    """The worker: ``[runtime.worker] interval`` calls ``run_once`` periodically.

    Each run is logged, timed and traced by the framework (the greeter
    calls and queries are its children). A full batch is followed by
    another at once, until the backlog is gone or shutdown begins.
    """

    def __init__(self, store: OrderStore, greet: Greet, settings: Settings) -> None:
        self.store = store
        self.greet = greet
        self.settings = settings

    async def run_once(self, lifetime: Lifetime) -> None:
        size = self.settings.confirm_batch
        while not lifetime.stopping:
            if await self.store.confirm_batch(size, self.greet) < size:
                return


# --8<-- [end:worker]
# --8<-- [start:app]
def create_app(store: OrderStore, settings: Settings) -> QuartTrio:
    """The HTTP API; the framework adds probes, metrics, limits and JSON errors around it."""
    app = QuartTrio("orders")

    @app.post("/orders")
    async def create_order() -> tuple[dict[str, Any], int]:
        # force: curl -d sends a form content type; the body is JSON all the same.
        new = parse_order(await request.get_json(force=True, silent=True))
        order, created = await store.create(new, parse_key(request.headers.get("Idempotency-Key")))
        return order.to_json(), 201 if created else 200

    @app.get("/orders/<int:order_id>")
    async def get_order(order_id: int) -> dict[str, Any]:
        return (await store.get(order_id)).to_json()

    @app.get("/orders")
    async def list_orders() -> dict[str, Any]:
        limit = parse_int(request.args, "limit", settings.page_size, 1, settings.max_page_size)
        after = parse_int(request.args, "after", 0, 0, MAX_ID)
        orders, cursor = await store.page(after, limit)
        return {
            "orders": [order.to_json() for order in orders],
            "next": None if cursor is None else str(cursor),
        }

    return app


# --8<-- [end:app]
# --8<-- [start:container]
class Container(ServiceContainer):
    service_model = Settings

    db = providers.Resource(
        postgres.pool,
        dsn=ServiceContainer.env.provided.secret.call("DATABASE_URL"),
        min_size=2,
        max_size=10,
    )
    store = providers.Singleton(OrderStore, db=db)

    greeter_channel = mikros_trio.grpc.client("greeter")
    greeter = providers.Singleton(greeter_grpc.GreeterStub, greeter_channel)
    greet = providers.Singleton(Greet, greeter)

    app = providers.Singleton(create_app, store=store, settings=ServiceContainer.settings)
    worker = providers.Factory(
        Confirmer, store=store, greet=greet, settings=ServiceContainer.settings
    )


# --8<-- [end:container]
# --8<-- [start:main]
if __name__ == "__main__":
    trio.run(mikros_trio.run, Container)
# --8<-- [end:main]
