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


def keep_alive_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that each made one ``GET /items`` and stay open, idle."""
    request = f"GET {ROUTE} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
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
                raise RuntimeError(f"GET {ROUTE}: {bytes(buffer[:40])!r}")
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

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_load(port: int, *, connections: int, seconds: float, threads: int = 2) -> LoadResult:
    """``wrk -t{threads} -c{connections} -d{seconds}s`` on ``GET /items``."""
    wrk = wrk_path()
    assert wrk is not None
    url = f"http://127.0.0.1:{port}{ROUTE}"
    done = subprocess.run(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", url],
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
    return LoadResult(float(rate.group(1)), int(total.group(1)), errors)


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
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    sys.path.insert(0, str(EXAMPLE))
    from main import ItemStore, create_app  # the example's app, handler and store

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None  # as the framework: no access log

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:

            async def sigterm() -> None:
                async for _ in signals:
                    return

            await serve(create_app(ItemStore()), config, shutdown_trigger=sigterm)

    trio.run(main)


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


if __name__ == "__main__":
    kind, port_text = sys.argv[1:3]
    {"bare": _serve_bare, "uvicorn": _serve_uvicorn}[kind](int(port_text))
