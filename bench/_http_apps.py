"""What the HTTP benchmarks share: the servers they compare, and the load generators.

Servers, each run as its own process and all answering ``GET /items`` from
the HTTP example's ``ItemStore`` with the same handler body:

- ``framework``: ``python examples/http/main.py``, the way users start it
  (probes, error handlers, drain, every default on; port from
  ``MIKROS_HTTP_PORT``).
- ``bare``: the example's own ``create_app`` (the same QuartTrio app and
  handler) on ``hypercorn.trio.serve``, with a shutdown trigger on SIGTERM:
  ``python bench/_http_apps.py bare PORT``.
- ``uvicorn``: uvicorn + Starlette with the same handler body, for reference
  only: ``python bench/_http_apps.py uvicorn PORT``.

The peer apps (``bench/http_peers.py``, ``bench/quart_cost.py``): one small
API (``GET /items``, three fixed items; ``POST /items``, a JSON item checked
and echoed with 201) written for QuartTrio, Starlette and FastAPI
(:data:`PEER_APPS`), served by our HTTP kind (``peer-ours``), by uvicorn
(``peer-uvicorn``, h11, one process) or by bare hypercorn-trio
(``peer-bare``, QuartTrio only), each with features off or every feature on.

Load: ``wrk`` when installed, else :func:`python_load`, a bounded
single-process keep-alive client. The fallback is the weaker instrument: it
needs a core of its own, so the server runs below saturation and per-request
costs hide in idle time (measured in the same hour: framework/bare 0.98
with it, 0.86 with wrk). Prefer wrk.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "http"
#: Bound on every wait for a server, so a hung one fails the benchmark instead of hanging it.
PATIENCE_S = 15.0
ROUTE = "/items"


# -- servers -------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class ServerSpec:
    """How to start one kind of server on a port, and which path says it is ready."""

    name: str
    port: int
    args: tuple[str, ...]
    env: Mapping[str, str]
    ready_path: str


def framework(port: int, *, verbose: bool = False, config: Path | None = None) -> ServerSpec:
    env = {"MIKROS_HTTP_PORT": str(port), "MIKROS_TRIO_VERBOSE": "1" if verbose else "0"}
    return ServerSpec("framework", port, example_command(EXAMPLE, config), env, "/readyz")


def example_command(example: Path, config: Path | None) -> tuple[str, ...]:
    """How users start the example: its main.py, or the CLI with another service.toml."""
    main = str(example / "main.py")
    if config is None:
        return (sys.executable, main)
    return (sys.executable, "-m", "mikros_trio.cli", "run", main, "--config", str(config))


def all_features_config(example: Path, directory: Path) -> Path:
    """The example's service.toml with every feature on, as the benchmarks measure it.

    The examples already enable every built-in feature; here their JSON
    log lines go to a file (a terminal or a pipe nobody reads would measure
    something else) and spans to the no-op exporter (spans are still made,
    sampled and ended; only the export is skipped).
    """
    text = (example / "service.toml").read_text()
    log = directory / f"{example.name}.log"
    for needed in ('output = "stdout"', 'exporter = "console"', "[features.metrics]"):
        if needed not in text:
            raise SystemExit(f"{example}/service.toml no longer has {needed}: update the bench")
    text = text.replace('output = "stdout"', f"output = {json.dumps(str(log))}")
    text = text.replace('exporter = "console"', 'exporter = "none"')
    path = directory / f"{example.name}.toml"
    path.write_text(text)
    return path


def bare(port: int) -> ServerSpec:
    return ServerSpec("bare", port, (sys.executable, __file__, "bare", str(port)), {}, ROUTE)


def uvicorn_starlette(port: int) -> ServerSpec:
    args = (sys.executable, __file__, "uvicorn", str(port))
    return ServerSpec("uvicorn", port, args, {}, ROUTE)


class Server:
    """A server process: started, polled until it answers 200, stopped by SIGTERM.

    stdout is discarded; stderr lines are kept with the ``perf_counter``
    time they were read (the framework's lifecycle log, when verbose).
    """

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.port = spec.port
        self.proc = subprocess.Popen(
            spec.args,
            cwd=ROOT,
            env={**os.environ, **spec.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[tuple[float, str]] = []
        self.signalled_at: float | None = None  # perf_counter when SIGTERM was sent
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append((time.perf_counter(), line))

    def wait_ready(self) -> None:
        """Return once ``GET ready_path`` answers 200; raise if it never does."""
        deadline = time.monotonic() + PATIENCE_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
            try:
                connection.request("GET", self.spec.ready_path)
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                connection.close()
            time.sleep(0.01)
        code = self.close()
        tail = "".join(line for _, line in self.stderr[-20:])
        raise RuntimeError(f"{self.spec.name} never got ready (exit code {code}):\n{tail}")

    def terminate_and_time(self) -> float:
        """SIGTERM → process gone, in ms (``wait()`` blocks in waitpid: no polling steps)."""
        watchdog = threading.Timer(PATIENCE_S, self.proc.kill)
        watchdog.start()
        try:
            self.signalled_at = sent = time.perf_counter()
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait()
            return (time.perf_counter() - sent) * 1000
        finally:
            watchdog.cancel()

    def close(self) -> int:
        """Stop the process (SIGTERM, then kill if it overstays) and release its pipe."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(PATIENCE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(PATIENCE_S)
        self._reader.join(PATIENCE_S)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used (Linux ``/proc``), or None elsewhere.

    Server CPU per request is the steadier measure on a shared machine:
    throughput moves with whatever else runs, CPU per request much less.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def keep_alive_connections(port: int, count: int, route: str = ROUTE) -> list[socket.socket]:
    """``count`` connections that each made one ``GET route`` and stay open, idle."""
    request = f"GET {route} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S)
            opened.append(sock)
            sock.sendall(request)
            buffer = bytearray()
            while (size := _response_size(buffer)) is None or len(buffer) < size:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the server closed a keep-alive connection")
                buffer += chunk
            if not buffer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"GET {route}: {bytes(buffer[:40])!r}")
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return opened


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


def _response_size(buffer: bytearray) -> int | None:
    """Length of the first complete-headers response in ``buffer``, or None if unknown yet."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    match = _CONTENT_LENGTH.search(buffer, 0, end + 2)
    if match is None:
        raise RuntimeError("a response without content-length: this client cannot read it")
    return end + 4 + int(match.group(1))


# -- load ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    """One load run: ``count`` units of work (requests, calls) at ``rate`` per second."""

    rate: float
    count: int
    errors: int  # failed units: socket errors, non-2xx answers, failed calls
    p99_ms: float | None = None  # wrk's 99th-percentile latency, when measured

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_load(
    port: int,
    *,
    connections: int,
    seconds: float,
    threads: int = 2,
    script: Path | None = None,
) -> LoadResult:
    """``wrk -t{threads} -c{connections} -d{seconds}s --latency`` on ``GET /items``.

    ``script`` is a wrk Lua script (a POST body, say); the result carries
    wrk's 99th-percentile latency.
    """
    wrk = wrk_path()
    assert wrk is not None
    url = f"http://127.0.0.1:{port}{ROUTE}"
    extra = ["-s", str(script)] if script is not None else []
    done = subprocess.run(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", *extra, url],
        capture_output=True,
        text=True,
        timeout=seconds + PATIENCE_S,
        check=True,
    )
    out = done.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}\n{done.stderr}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    p99_ms = float(p99.group(1)) * _TO_MS[p99.group(2)] if p99 else None
    return LoadResult(float(rate.group(1)), int(total.group(1)), errors, p99_ms)


_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def python_load(port: int, *, connections: int, seconds: float) -> LoadResult:
    """A bounded keep-alive load: ``connections`` sockets, one request each in flight.

    One process and one thread, driven by a selector; it stops at the
    deadline. A connection the server closes is reopened (and counted as
    an error).
    """
    request = f"GET {ROUTE} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytearray] = {}

    def open_one() -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        buffers[sock] = bytearray()
        selector.register(sock, selectors.EVENT_READ)
        sock.send(request)

    def close_one(sock: socket.socket) -> None:
        selector.unregister(sock)
        del buffers[sock]
        sock.close()

    done = errors = 0
    try:
        for _ in range(connections):
            open_one()
        start = time.perf_counter()
        deadline = start + seconds
        while (now := time.perf_counter()) < deadline:
            for key, _ in selector.select(deadline - now):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    errors += 1
                    close_one(sock)
                    open_one()
                    continue
                buffer = buffers[sock]
                buffer += data
                size = _response_size(buffer)
                if size is None or len(buffer) < size:
                    continue
                if not buffer.startswith(b"HTTP/1.1 2"):
                    errors += 1
                del buffer[:size]
                done += 1
                sock.send(request)
        elapsed = time.perf_counter() - start
    finally:
        for sock in list(buffers):
            close_one(sock)
        selector.close()
    return LoadResult(done / elapsed, done, errors)


def nearest_rank(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


# -- the comparison servers, run as processes ---------------------------------------


def _serve_bare(port: int) -> None:
    """The example's QuartTrio app on ``hypercorn.trio.serve``; SIGTERM triggers shutdown."""
    sys.path.insert(0, str(EXAMPLE))
    from main import ItemStore, create_app  # the example's app, handler and store

    _serve_hypercorn(create_app(ItemStore()), port, None)


def _serve_uvicorn(port: int) -> None:
    """uvicorn + Starlette answering ``GET /items`` with the same body as the example."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    sys.path.insert(0, str(EXAMPLE))
    from main import ItemStore

    store = ItemStore()

    async def list_items(request: Request) -> JSONResponse:
        return JSONResponse({"items": [asdict(item) for item in store.items()]})

    app = Starlette(routes=[Route(ROUTE, list_items)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def uvicorn_description() -> str | None:
    """uvicorn's version and the HTTP and event-loop implementations it will pick, or None."""
    try:
        import starlette
        import uvicorn
    except ImportError:
        return None
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    parser = "httptools" if _importable("httptools") else "h11"
    return f"uvicorn {uvicorn.__version__} ({parser}, {loop}), starlette {starlette.__version__}"


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# -- the peer apps: one API in three frameworks, and the servers that serve them ----

#: What ``GET /items`` answers, in every framework.
PEER_ITEMS = [
    {"id": 1, "name": "pen", "price": 1.5},
    {"id": 2, "name": "ink", "price": 3.0},
    {"id": 3, "name": "pad", "price": 2.25},
]

#: The body every ``POST /items`` of the benchmarks sends.
PEER_POST_BODY = '{"name": "pen", "price": 1.5}'


def peer_item(body: Any) -> dict[str, Any]:
    """The item a POST creates (id 4, not stored: the store stays the same), or ValueError."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    name, price = body.get("name"), body.get("price")
    if not isinstance(name, str) or isinstance(price, bool) or not isinstance(price, int | float):
        raise ValueError("expected name (string) and price (number)")
    return {"id": 4, "name": name, "price": float(price)}


def quart_peer_app() -> Any:
    """The peer API on QuartTrio."""
    from quart import request
    from quart_trio import QuartTrio

    app = QuartTrio("peer")

    @app.get(ROUTE)
    async def list_items() -> dict[str, Any]:
        return {"items": PEER_ITEMS}

    @app.post(ROUTE)
    async def create_item() -> tuple[dict[str, Any], int]:
        return peer_item(await request.get_json(force=True)), 201

    return app


def starlette_peer_app() -> Any:
    """The peer API on Starlette."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def list_items(request: Request) -> JSONResponse:
        return JSONResponse({"items": PEER_ITEMS})

    async def create_item(request: Request) -> JSONResponse:
        return JSONResponse(peer_item(await request.json()), status_code=201)

    routes = [
        Route(ROUTE, list_items, methods=["GET"]),
        Route(ROUTE, create_item, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def fastapi_peer_app() -> Any:
    """The peer API on FastAPI, its POST body a pydantic model as FastAPI apps write it."""
    from fastapi import FastAPI
    from pydantic import BaseModel

    class NewItem(BaseModel):
        name: str
        price: float

    app = FastAPI()

    @app.get(ROUTE)
    async def list_items() -> dict[str, Any]:
        return {"items": PEER_ITEMS}

    async def create_item(item: NewItem) -> dict[str, Any]:
        return {"id": 4, **item.model_dump()}

    # This module's annotations are strings (``from __future__``) and NewItem
    # is local: FastAPI would not resolve it and read ``item`` from the query.
    create_item.__annotations__["item"] = NewItem
    app.post(ROUTE, status_code=201)(create_item)
    return app


PEER_APPS = {"quart": quart_peer_app, "starlette": starlette_peer_app, "fastapi": fastapi_peer_app}


def peer_config(directory: Path, features: bool) -> Path:
    """A service.toml for the peer apps on our kind: features off, or every feature on.

    Off: the logger (always on) writes to a file and no access line;
    metrics and tracing off. On: the access log to a file, metrics, and
    tracing with the no-op exporter (spans made, sampled and ended).
    """
    log = json.dumps(str(directory / "ours.log"))
    text = (
        'name = "peer"\ntypes = ["http"]\nversion = "1.0.0"\n'
        f'[runtime.http]\nhost = "127.0.0.1"\n[features.logger]\noutput = {log}\n'
        f"access_log = {'true' if features else 'false'}\n"
    )
    if features:
        text += "[features.metrics]\nenabled = true\n"
        text += '[features.tracing]\nenabled = true\nexporter = "none"\n'
    path = directory / f"peer-{'on' if features else 'off'}.toml"
    path.write_text(text)
    return path


def peer_ours(framework: str, port: int, config: Path) -> ServerSpec:
    args = (sys.executable, __file__, "peer-ours", framework, str(port), str(config))
    return ServerSpec(f"ours-{framework}", port, args, {"MIKROS_HTTP_PORT": str(port)}, "/readyz")


def peer_uvicorn(framework: str, port: int, log: Path | None) -> ServerSpec:
    """uvicorn (h11, one process) serving a peer app; ``log`` turns every feature on."""
    args = (sys.executable, __file__, "peer-uvicorn", framework, str(port), str(log or ""))
    return ServerSpec(f"uvicorn-{framework}", port, args, {}, ROUTE)


def peer_bare(port: int, log: Path | None) -> ServerSpec:
    """hypercorn-trio + the QuartTrio peer app; ``log`` is hypercorn's access log."""
    args = (sys.executable, __file__, "peer-bare", str(port), str(log or ""))
    return ServerSpec("bare-quart", port, args, {}, ROUTE)


def _serve_peer_ours(framework: str, port_text: str, config: str) -> None:
    """The peer app as a mikros_trio service, started as users start one (port from the env)."""
    import trio
    from dependency_injector import providers

    import mikros_trio

    class Container(mikros_trio.ServiceContainer):
        app = providers.Singleton(PEER_APPS[framework])

    trio.run(mikros_trio.run, Container, config)


def _serve_peer_uvicorn(framework: str, port_text: str, log: str) -> None:
    """uvicorn with the ecosystem's usual equivalents of our features when ``log`` is set.

    Its access log to ``log``, starlette-exporter's Prometheus middleware
    (requests by method, route template and status; ``/metrics``), and
    opentelemetry-instrumentation-asgi with a tracer provider that exports
    nothing (spans made, sampled and ended, as our "none" exporter), one
    span per request as ours (its spans per receive and send excluded).
    """
    import uvicorn

    app = PEER_APPS[framework]()
    log_config: dict[str, Any] | None = None
    if log:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from opentelemetry.sdk.trace import TracerProvider
        from starlette_exporter import PrometheusMiddleware, handle_metrics

        app.add_middleware(PrometheusMiddleware, group_paths=True)
        app.add_route("/metrics", handle_metrics)
        app = OpenTelemetryMiddleware(
            app, tracer_provider=TracerProvider(), exclude_spans=["receive", "send"]
        )
        log_config = {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "access": {
                    "()": "uvicorn.logging.AccessFormatter",
                    "fmt": '%(asctime)s %(client_addr)s "%(request_line)s" %(status_code)s',
                    "use_colors": False,
                }
            },
            "handlers": {
                "access": {"class": "logging.FileHandler", "filename": log, "formatter": "access"}
            },
            "loggers": {
                "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False}
            },
        }
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(port_text),
        http="h11",
        workers=1,
        log_level="warning" if not log else "info",
        access_log=bool(log),
        log_config=log_config,
    )


def _serve_peer_bare(port_text: str, log: str) -> None:
    """hypercorn-trio serving the QuartTrio peer app (today's stack without our kind)."""
    _serve_hypercorn(quart_peer_app(), int(port_text), log or None)


def _serve_hypercorn(app: Any, port: int, accesslog: str | None) -> None:
    """``app`` on ``hypercorn.trio.serve`` at 127.0.0.1:``port``; SIGTERM triggers shutdown."""
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = accesslog  # None, as the framework with features off: no access log

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:

            async def sigterm() -> None:
                async for _ in signals:
                    return

            await serve(app, config, shutdown_trigger=sigterm)

    trio.run(main)


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    servers: dict[str, Any] = {
        "bare": lambda port: _serve_bare(int(port)),
        "uvicorn": lambda port: _serve_uvicorn(int(port)),
        "peer-ours": _serve_peer_ours,
        "peer-uvicorn": _serve_peer_uvicorn,
        "peer-bare": _serve_peer_bare,
    }
    servers[kind](*rest)
