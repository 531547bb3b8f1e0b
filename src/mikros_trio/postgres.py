"""PostgreSQL as a service resource: a Trio-native psycopg 3 pool (extra ``postgres``).

Declare it as a container resource; the service opens ``min_size``
connections before it reports ready, shows the pool's health on
``/healthz`` (readiness is off while it cannot connect), and closes it after
everything using it has drained::

    from dependency_injector import providers
    from mikros_trio import ServiceContainer, postgres

    class Container(ServiceContainer):
        db = providers.Resource(
            postgres.pool,
            dsn=ServiceContainer.env.provided.secret.call("DATABASE_URL"),
            min_size=2,
            max_size=10,
        )

    async def get_order(db: postgres.Pool, order_id: int) -> tuple[Any, ...] | None:
        return await db.fetchone("SELECT id, state FROM orders WHERE id = %s", (order_id,))

Connections are psycopg's ``AsyncConnection`` (cursors, row factories,
transactions, COPY), driven by Trio's I/O waits rather than asyncio's, so
no thread hop per query. A query cancelled by Trio (a client gone, a
deadline, shutdown) is cancelled on the server too. With the metrics and
tracing features on, each query is a client call (``db_client_*`` metrics,
a CLIENT span named ``"SELECT orders"``), labelled by its SQL verb and
database; never by its text, parameters or the DSN.

``Pool`` also works on its own: ``async with postgres.Pool(dsn) as pool``.
"""

from __future__ import annotations

from ._pgconn import TrioConnection as Connection
from ._pgpool import Pool, PoolClosed, PoolTimeout, pool

__all__ = ["Connection", "Pool", "PoolClosed", "PoolTimeout", "pool"]
