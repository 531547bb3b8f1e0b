"""What an app costs per request, server aside: the peer apps' ASGI callables in a tight loop.

Each variant is an ASGI callable called for ``GET /items`` (or ``POST
/items``) with a fresh scope, a ``receive`` that hands over the body and
then waits (for a disconnect that never comes, as a server's does) and a
``send`` that keeps nothing, all inside one ``trio.run``: no sockets, no
parser, only what the app and its adaptation do. Variants:

- ``quart``: the QuartTrio peer app as a user writes it;
- ``quart-adapted``: after the HTTP kind's ``adapt_app`` (Mikros error
  handlers, call naming, body limits, and the per-request savings the
  adaptation applies);
- ``quart-adapted-before``: ``adapt_app`` without those savings (the
  adaptation as it was), to measure them;
- ``quart-no-response-timeout``: Quart's RESPONSE_TIMEOUT off entirely; the
  adaptation already skips that scope for a body in memory within one
  write (the kind bounds that write by ``send_timeout``), so this matches
  ``quart-adapted`` for the peer app;
- ``quart-muted-signals``: what muting Quart's signals would save (measured,
  not applied: within noise);
- ``starlette`` / ``starlette-adapted`` and ``fastapi`` / ``fastapi-adapted``:
  the same for the other frameworks (the adaptation's cost per request);
  ``starlette-base-middleware``: Starlette with one pass-through
  ``BaseHTTPMiddleware``, what an adaptation by middleware would cost
  instead of handlers registered on the app;
- ``asgi``: a bare ASGI callable answering the same JSON: the floor.

Method: every variant runs ``--requests`` requests per round, in an order
shuffled per round (seeded), for ``--rounds`` rounds; the figure is the
median of the process's CPU µs per request over rounds, and ``noise`` is, per variant, its
fastest round over its slowest (A/A within the run). Shared machine:
compare variants of the same run only.

Prints human lines, then one JSON object as the last line.
Run: ``python bench/quart_cost.py [--rounds 7] [--requests 2000] [--profile VARIANT]``
(``MIKROS_BENCH_QUICK=1``: 3 rounds of 500).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from _http_apps import PEER_APPS, PEER_ITEMS, PEER_POST_BODY, ROUTE

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def _settings() -> Any:
    from mikros_trio._runtime_settings import HttpSettings

    return HttpSettings()


def _adapted(app: Any) -> Any:
    from mikros_trio._http_apps import adapt_app
    from mikros_trio._telemetry import Telemetry

    return adapt_app(app, _settings(), "bench", Telemetry("bench"))


def _adapted_before(app: Any) -> Any:
    """``adapt_app`` as it was: handlers and limits, without the per-request savings."""
    from mikros_trio._http_apps import install_error_handlers

    install_error_handlers(app, "bench")
    app.config["MAX_CONTENT_LENGTH"] = _settings().max_body_size
    app.config["BODY_TIMEOUT"] = _settings().body_timeout
    return app


def _no_response_timeout(app: Any) -> Any:
    app = _adapted(app)
    app.config["RESPONSE_TIMEOUT"] = None
    return app


def _muted_signals(app: Any) -> Any:
    from quart import signals

    app = _adapted(app)
    for name in ("request_started", "request_finished", "request_tearing_down"):
        signals.__dict__[name].is_muted = True
    return app


def _with_base_http_middleware(app: Any) -> Any:
    """The adaptation as a Starlette BaseHTTPMiddleware would wrap it (the road not taken)."""
    from starlette.middleware.base import BaseHTTPMiddleware

    async def dispatch(request: Any, call_next: Any) -> Any:
        return await call_next(request)

    app.add_middleware(BaseHTTPMiddleware, dispatch=dispatch)
    return app


def _bare_asgi() -> ASGIApp:
    body = json.dumps({"items": PEER_ITEMS}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()  # shutdown: never asked here, cancelled at the end
            return
        status = 200
        if scope["method"] == "POST":
            await receive()  # the body, whole in one message here
            status = 201
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


VARIANTS: dict[str, Callable[[], ASGIApp]] = {
    "quart": lambda: PEER_APPS["quart"](),
    "quart-adapted": lambda: _adapted(PEER_APPS["quart"]()),
    "quart-adapted-before": lambda: _adapted_before(PEER_APPS["quart"]()),
    "quart-no-response-timeout": lambda: _no_response_timeout(PEER_APPS["quart"]()),
    "quart-muted-signals": lambda: _muted_signals(PEER_APPS["quart"]()),
    "starlette": lambda: PEER_APPS["starlette"](),
    "starlette-adapted": lambda: _adapted(PEER_APPS["starlette"]()),
    "starlette-base-middleware": lambda: _with_base_http_middleware(PEER_APPS["starlette"]()),
    "fastapi": lambda: PEER_APPS["fastapi"](),
    "fastapi-adapted": lambda: _adapted(PEER_APPS["fastapi"]()),
    "asgi": _bare_asgi,
}


def _scope(method: str, body: bytes) -> dict[str, Any]:
    headers = [(b"host", b"bench"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": ROUTE,
        "raw_path": ROUTE.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
        "extensions": {},
    }


async def _run(app: ASGIApp, requests: int, method: str) -> float:
    """CPU µs per request of ``requests`` calls of ``app``.

    CPU time, not wall time: on a shared machine the wall clock also counts
    the time other processes hold the core, CPU time only this one's work.
    """
    body = PEER_POST_BODY.encode() if method == "POST" else b""
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    start = time.process_time()
    for _ in range(requests):
        given = False

        async def receive() -> dict[str, Any]:
            nonlocal given
            if given:
                await trio.sleep_forever()  # a server's receive waits for the disconnect
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app(_scope(method, body), receive, send)
    took = time.process_time() - start
    expected = 201 if method == "POST" else 200
    if statuses != [expected] * requests:
        raise SystemExit(f"unexpected statuses: {sorted(set(statuses))}")
    return took / requests * 1e6


async def _lifespan_started(app: ASGIApp, nursery: trio.Nursery) -> None:
    """Run the app's startup, as the kind does before serving (FastAPI builds its stack then)."""
    to_app, from_us = trio.open_memory_channel[dict[str, Any]](1)
    answered = trio.Event()

    async def send(message: dict[str, Any]) -> None:
        answered.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    nursery.start_soon(app, scope, from_us.receive, send)
    await to_app.send({"type": "lifespan.startup"})
    await answered.wait()


async def _measure(
    names: list[str], rounds: int, requests: int, method: str
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in names}
    async with trio.open_nursery() as nursery:
        apps = {name: VARIANTS[name]() for name in names}
        for app in apps.values():
            await _lifespan_started(app, nursery)
            await _run(app, 50, method)  # warm-up
        for number in range(1, rounds + 1):
            order = list(names)
            random.Random(number).shuffle(order)
            for name in order:
                results[name].append(await _run(apps[name], requests, method))
        nursery.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--method", choices=["GET", "POST"], default="GET")
    parser.add_argument("--profile", choices=sorted(VARIANTS), help="cProfile one variant")
    parser.add_argument("--sort", default="tottime", help="the profile's order (tottime)")
    args = parser.parse_args()
    if os.environ.get("MIKROS_BENCH_QUICK") == "1":
        args.rounds, args.requests = 3, 500
    if args.profile:
        trio.run(_measure, [args.profile], 1, 50, args.method)  # imports, out of the profile
        profiler = cProfile.Profile()
        profiler.enable()
        trio.run(_measure, [args.profile], 1, args.requests, args.method)
        profiler.disable()
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(40)
        return
    names = [name for name in VARIANTS if name != "quart-muted-signals"]
    results = trio.run(_measure, names, args.rounds, args.requests, args.method)
    # Muting signals is process-wide: measured last, alone with a fresh baseline.
    muted = trio.run(
        _measure, ["quart-adapted", "quart-muted-signals"], args.rounds, args.requests, args.method
    )
    results["quart-muted-signals"] = muted["quart-muted-signals"]
    medians = {name: statistics.median(values) for name, values in results.items()}
    base = statistics.median(muted["quart-adapted"])
    for name, value in medians.items():
        print(f"{name:27s} {value:7.1f} µs/request")
    summary = {
        "benchmark": "quart_cost",
        "method": f"{args.method} {ROUTE}",
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "us_per_request": {name: round(value, 1) for name, value in medians.items()},
        "savings_us": {
            "adaptation_savings": round(
                medians["quart-adapted-before"] - medians["quart-adapted"], 1
            ),
            "response_timeout_off": round(
                medians["quart-adapted"] - medians["quart-no-response-timeout"], 1
            ),
            "signals_muted": round(base - medians["quart-muted-signals"], 1),
        },
        "adaptation_cost_us": {
            "quart": round(medians["quart-adapted"] - medians["quart"], 1),
            "starlette": round(medians["starlette-adapted"] - medians["starlette"], 1),
            "fastapi": round(medians["fastapi-adapted"] - medians["fastapi"], 1),
            "starlette_by_base_middleware": round(
                medians["starlette-base-middleware"] - medians["starlette"], 1
            ),
        },
        "noise": {name: round(min(values) / max(values), 3) for name, values in results.items()},
        "python": sys.version.split()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
