"""A service that tries to leak its two secrets through every road a Python service has.

Run by ``test_hostile_secrets.py`` through ``mikros-trio run --verbose``,
with ``TOKEN`` (characters every encoder escapes) and ``DB_DSN`` (a URL
whose password is percent-encoded) listed in ``[features.env] secrets``
and spans going to the console exporter on stderr. Each route leaks the
values another way: encoded in log lines and structlog fields, inside
exceptions and their tracebacks, in a thread's exception, a warning, an
unraisable exception, a worker thread of ``trio.to_thread``, span
attributes, events, links, statuses and child spans, a Mikros error
body, an ``abort()`` description, and in the path and query of the
request itself. ``GET /stop``
makes the worker stop the service with a reason that holds the token.
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import threading
import urllib.parse
import warnings
from typing import Any

import structlog
import trio
from dependency_injector import providers
from opentelemetry import trace
from opentelemetry.trace import Link, Status, StatusCode
from quart import abort
from quart_trio import QuartTrio

from mikros_trio import Lifetime, NotFoundError, ServiceContainer
from mikros_trio.ext import Telemetry
from mikros_trio.features.env import Env
from mikros_trio.features.tracing import Tracing

log = logging.getLogger("leaker")


class Tripwire:
    """Shared between the app and the worker: pulled by ``GET /stop``."""

    def __init__(self) -> None:
        self.pulled = trio.Event()


class Undead:
    """An object whose finaliser fails: Python reports it through sys.unraisablehook."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __del__(self) -> None:
        raise RuntimeError(f"finaliser holding {self.token!r}")


def conninfo_value(text: str) -> str:
    """``text`` as libpq's keyword/value conninfo quotes it (psycopg's ``make_conninfo``)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def create_app(env: Env, telemetry: Telemetry, tripwire: Tripwire) -> QuartTrio:
    app = QuartTrio(__name__)
    token = env.secret("TOKEN").reveal()
    dsn = env.secret("DB_DSN").reveal()
    password = urllib.parse.urlsplit(dsn).password or ""
    plain = urllib.parse.unquote(password)
    data = token.encode()

    @app.get("/log")
    async def log_everything() -> dict[str, Any]:
        log.warning("repr %r ascii %a", token, token)
        log.warning("bytes %r hex %s HEX %s", data, data.hex(), data.hex().upper())
        log.warning("json %s / %s", json.dumps(token), json.dumps(token, ensure_ascii=False))
        log.warning("json object %s", json.dumps({"token": token}, ensure_ascii=False))
        quoted = urllib.parse.quote(token), urllib.parse.quote(token, safe="")
        log.warning("url %s %s %s", *quoted, urllib.parse.quote_plus(token))
        log.warning("query %s", urllib.parse.urlencode({"token": token, "dsn": dsn}))
        log.warning("base64 %s %s", base64.b64encode(data), base64.urlsafe_b64encode(data))
        basic = base64.b64encode(f"app:{token}".encode()).decode()
        log.warning("headers %s", {"authorization": f"Basic {basic}"})
        log.warning("dsn %s password %s plain %r", dsn, password, plain)
        log.warning("conninfo host=db user=app password=%s", conninfo_value(plain))
        log.warning("parsed %s", urllib.parse.urlsplit(dsn))
        log.warning("a format that does not fit %d", token)  # logging's own error report
        structlog.get_logger("leaker").warning(
            "fields", token=token, raw=data, nested={"deep": [token, plain]}, parsed=[dsn]
        )
        return {"logged": True}

    @app.get("/raise")
    async def raise_it() -> dict[str, Any]:
        raise RuntimeError(f"token {token!r} bytes {data!r} password {plain!r}")

    @app.get("/to-thread")
    async def to_thread() -> dict[str, Any]:
        def blocking() -> None:
            raise OSError(f"driver refused {json.dumps(plain)}")

        await trio.to_thread.run_sync(blocking)
        return {}

    @app.get("/missing")
    async def missing() -> dict[str, Any]:
        raise NotFoundError(
            f"no account for {json.dumps(token)}", details=urllib.parse.quote_plus(token)
        )

    @app.get("/abort")
    async def abort_it() -> dict[str, Any]:
        abort(403, f"token {urllib.parse.quote(token)} refused")

    @app.get("/thread")
    async def thread() -> dict[str, Any]:
        def fail() -> None:
            raise RuntimeError(f"thread holding {token!r}")

        worker = threading.Thread(target=fail, name="leaky-thread")
        worker.start()
        await trio.to_thread.run_sync(worker.join)
        return {"joined": True}

    @app.get("/warn")
    async def warn() -> dict[str, Any]:
        warnings.warn(f"token {token!r} expires soon", UserWarning, stacklevel=1)
        return {"warned": True}

    @app.get("/unraisable")
    async def unraisable() -> dict[str, Any]:
        Undead(token)
        gc.collect()
        return {"collected": True}

    @app.get("/span")
    async def span() -> dict[str, Any]:
        tracer = telemetry.get(Tracing).tracer
        current = trace.get_current_span()
        current.set_attribute("leak.token", token)
        current.set_attributes({"leak.repr": repr(token), "leak.list": [token, "x"]})
        current.add_event(f"event {token}", {"leak.quoted": urllib.parse.quote(token)})
        current.update_name(f"GET {plain}")
        link = Link(current.get_span_context(), {"leak.link": token})
        with tracer.start_as_current_span(
            f"child {urllib.parse.quote(token, safe='')}",
            attributes={"leak.password": plain, "leak.dsn": dsn},
            links=[link],
        ) as child:
            child.add_event("child event", {"leak.bytes": repr(data)})
            child.set_status(Status(StatusCode.ERROR, f"status {token!r}"))
            try:
                with tracer.start_as_current_span("grandchild"):
                    raise ValueError(f"grandchild holding {token}")
            except ValueError:
                pass
        return {"traced": True}

    @app.get("/echo/<path:rest>")
    async def echo(rest: str) -> dict[str, Any]:
        return {"length": len(rest)}

    @app.get("/stop")
    async def stop() -> dict[str, Any]:
        tripwire.pulled.set()
        return {"stopping": True}

    return app


class Rotator:
    """A worker that stops the service once the tripwire is pulled, the token in its reason."""

    def __init__(self, env: Env, tripwire: Tripwire) -> None:
        self.token = env.secret("TOKEN")
        self.tripwire = tripwire

    async def run(self, lifetime: Lifetime) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._rotate, lifetime)
            await lifetime.wait_stopping()  # however the service stops
            nursery.cancel_scope.cancel()

    async def _rotate(self, lifetime: Lifetime) -> None:
        await self.tripwire.pulled.wait()
        lifetime.stop(f"rotating {self.token.reveal()!r}")


class Container(ServiceContainer):
    tripwire = providers.Singleton(Tripwire)
    app = providers.Singleton(
        create_app,
        env=ServiceContainer.env,
        telemetry=ServiceContainer.telemetry,
        tripwire=tripwire,
    )
    worker = providers.Singleton(Rotator, env=ServiceContainer.env, tripwire=tripwire)
