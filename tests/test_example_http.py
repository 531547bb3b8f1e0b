"""The HTTP example: its API in-process, then as a real process stopped by SIGTERM.

In-process tests start ``examples/http`` through the ``mikros_service``
fixture and talk to its real listener with httpx. Process tests run it the
way users do (``python examples/http/main.py``, the port from
``MIKROS_HTTP_PORT``) and pin the shutdown: requests in flight finish, new
ones are refused, a request longer than the drain timeout is cut, idle
keep-alive connections do not hold the exit up. Every wait is bounded.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import trio

from helpers import PATIENCE, REPO, Child, Spawn, event_names, events_of, free_port, wait_until_ok
from mikros_trio import ServiceError, ValidationError
from mikros_trio.testing import RunningService, ServiceStarter

HTTP = REPO / "examples" / "http"
CURL = shutil.which("curl")


@pytest.fixture(name="example", scope="module")
def fixture_example() -> Iterator[ModuleType]:
    """examples/http/main.py imported under a name no other example's ``main`` takes."""
    spec = importlib.util.spec_from_file_location("http_example_main", HTTP / "main.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@asynccontextmanager
async def _client(running: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    base = f"http://127.0.0.1:{running.ports['http']}"
    async with httpx.AsyncClient(base_url=base, timeout=PATIENCE) as client:
        yield client


# -- in-process ---------------------------------------------------------------


async def test_create_list_get_round_trip(
    mikros_service: ServiceStarter, example: ModuleType
) -> None:
    """An item created with POST is listed by GET /items and fetched by GET /items/<id>."""
    running = await mikros_service.start(example.Container, HTTP / "service.toml")
    async with _client(running) as client:
        assert (await client.get("/items")).json() == {"items": []}
        created = await client.post("/items", json={"name": "pen", "price": 1.5})
        assert created.status_code == 201
        assert created.json() == {"id": 1, "name": "pen", "price": 1.5}
        await client.post("/items", json={"name": "ink", "price": 3})
        listed = await client.get("/items")
        assert listed.status_code == 200
        assert [item["name"] for item in listed.json()["items"]] == ["pen", "ink"]
        got = await client.get("/items/2")
        assert got.status_code == 200
        assert got.json() == {"id": 2, "name": "ink", "price": 3.0}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b'{"price": 1}', "name: expected a non-empty string", id="no-name"),
        pytest.param(b'{"name": "", "price": 1}', "name: expected a non-empty string", id="empty"),
        pytest.param(b'{"name": "pen", "price": "1"}', "price: expected a number", id="str"),
        pytest.param(b'{"name": "pen", "price": true}', "price: expected a number", id="bool"),
        pytest.param(b'{"name": "pen", "price": -1}', "price: expected a number", id="negative"),
        pytest.param(b"[1, 2]", "expected a JSON object", id="array"),
        pytest.param(b"{not json", "expected a JSON object", id="not-json"),
    ],
)
async def test_invalid_item_is_a_mikros_400(
    mikros_service: ServiceStarter, example: ModuleType, body: bytes, message: str
) -> None:
    """A bad body answers 400 with a Mikros ValidationError body, and creates nothing."""
    running = await mikros_service.start(example.Container, HTTP / "service.toml")
    async with _client(running) as client:
        response = await client.post(
            "/items", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        wire = response.json()
        assert wire["kind"] == "ValidationError"
        assert wire["code"] == 0
        assert wire["service_name"] == "items"
        assert wire["message"].startswith(message)
        assert isinstance(ServiceError.from_wire(wire), ValidationError)
        assert (await client.get("/items")).json() == {"items": []}


async def test_missing_item_is_a_mikros_404(
    mikros_service: ServiceStarter, example: ModuleType
) -> None:
    """GET of an unknown id answers 404 with a Mikros NotFoundError body naming the id."""
    running = await mikros_service.start(example.Container, HTTP / "service.toml")
    async with _client(running) as client:
        response = await client.get("/items/7")
    assert response.status_code == 404
    assert response.json() == {
        "code": 0,
        "kind": "NotFoundError",
        "message": "item 7 does not exist",
        "service_name": "items",
    }
    # The README's error example is this very body, byte for byte (but its newline).
    assert f"`{response.text.strip()}`" in (REPO / "README.md").read_text()


class FakeStore:
    """Stands in for ItemStore: one item already there, and a record of what was added."""

    def __init__(self, item: Any) -> None:
        self.item = item
        self.added: list[tuple[str, float]] = []

    def add(self, name: str, price: float) -> Any:
        self.added.append((name, price))
        return self.item

    def items(self) -> list[Any]:
        return [self.item]

    def get(self, item_id: int) -> Any:
        return self.item


async def test_overridden_store_is_what_handlers_use(
    mikros_service: ServiceStarter, example: ModuleType
) -> None:
    """overrides={"store": fake} reaches the app factory: every handler talks to the fake."""
    fake = FakeStore(example.Item(42, "fake", 9.5))
    running = await mikros_service.start(
        example.Container, HTTP / "service.toml", overrides={"store": fake}
    )
    async with _client(running) as client:
        assert (await client.get("/items/1")).json() == {"id": 42, "name": "fake", "price": 9.5}
        assert (await client.get("/items")).json()["items"] == [
            {"id": 42, "name": "fake", "price": 9.5}
        ]
        created = await client.post("/items", json={"name": "pen", "price": 2})
    assert created.status_code == 201
    assert fake.added == [("pen", 2.0)]


# -- a real process -------------------------------------------------------------


def _curl(port: int, path: str, *args: str) -> tuple[int, Any]:
    """``curl`` the example; return the status and the decoded JSON body."""
    if CURL is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    url = f"http://127.0.0.1:{port}{path}"
    done = subprocess.run(
        [CURL, "-sS", "--max-time", "5", "-w", "\n%{http_code}", url, *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=True,
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


def _spawn_example(spawn: Spawn, *args: str | Path, port: int) -> Child:
    """Start ``args`` (a service's main.py) on ``port`` with the lifecycle log on stderr."""
    env = {"MIKROS_HTTP_PORT": str(port), "MIKROS_TRIO_VERBOSE": "1"}
    child = spawn(sys.executable, *args, env=env)
    wait_until_ok(child, port)
    return child


def test_process_serves_curl_and_stops_on_sigterm(spawn: Spawn) -> None:
    """As a process: ready on /readyz, curl round trip; SIGTERM drains, stops the store, exit 0."""
    port = free_port()
    child = _spawn_example(spawn, HTTP / "main.py", port=port)
    status, item = _curl(port, "/items", "-d", '{"name": "pen", "price": 1.5}')
    assert (status, item) == (201, {"id": 1, "name": "pen", "price": 1.5})
    assert _curl(port, "/items/1") == (200, item)
    assert _curl(port, "/items") == (200, {"items": [item]})
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.report()
    # The store starts before the server and stops once it has drained; the
    # example says so in log lines, and prints nothing beside them.
    assert event_names(child.stdout, "items") == [
        "store started",
        "api serving",
        "api drained",
        "store stopped",
    ], child.report()
    assert events_of(child.stdout, "items")[-1]["items"] == 1, child.report()
    assert all(line.startswith("{") for line in child.stdout.splitlines()), child.report()
    events = [line.split("] ", 1)[1] for line in child.stderr.splitlines() if line.startswith("[")]
    assert events.index("http: stopped") < events.index("store: stopping"), child.report()
    assert "Traceback" not in child.stderr


# -- shutdown under load ----------------------------------------------------------

#: The example's container with two routes added (argv[1] is the service.toml):
#: ``/slow?id=..&s=..`` prints ``slow: <id>`` once the app has the request,
#: then sleeps; ``/stream`` sends a first chunk, sleeps 0.3 s, sends the rest.
SLOW_MAIN = """\
import sys

sys.path.insert(0, EXAMPLE)

import trio
from dependency_injector import providers
from quart import request

import mikros_trio
from main import Container, ItemStore, create_app


def slow_app(store: ItemStore):
    app = create_app(store)

    @app.get("/slow")
    async def slow():
        print(f"slow: {request.args['id']}", flush=True)
        await trio.sleep(float(request.args.get("s", "0.2")))
        return {"id": request.args["id"]}

    @app.get("/stream")
    async def stream():
        async def body():
            yield b"first,"
            await trio.sleep(0.3)
            yield b"last"

        print("stream: started", flush=True)
        return body(), 200, {"content-type": "text/plain"}

    return app


async def main() -> None:
    container = Container()
    container.app.override(providers.Singleton(slow_app, store=container.store))
    await mikros_trio.run(container, sys.argv[1])


trio.run(main)
"""


def _slow_service(tmp_path: Path, *, drain: float, shutdown: float) -> tuple[Path, Path]:
    """A main.py serving the example plus /slow and /stream, and a service.toml with deadlines."""
    main = tmp_path / "slow_main.py"
    main.write_text(SLOW_MAIN.replace("EXAMPLE", repr(str(HTTP)), 1))
    config = tmp_path / "service.toml"
    config.write_text(
        f"""name = "items-slow"
types = ["http:8080"]
version = "v0.1.0"

[lifecycle]
drain_timeout = {drain}
shutdown_timeout = {shutdown}
readiness_delay = 0.0
"""
    )
    return main, config


@dataclass
class Shot:
    """One request of the load: when it was made, sent, answered, and how it ended."""

    id: str
    attempted: float  # perf_counter before the call
    sent: float = math.inf  # its headers were written to the socket (httpcore trace)
    done: float = math.inf
    outcome: str = ""  # the status code, or the httpx error's class name


class Load:
    """Clients that each send ``GET /slow`` back to back, recording every request."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.shots: list[Shot] = []
        self.in_flight: dict[str, Shot] = {}  # headers written, no outcome yet
        self.signalled = math.inf
        self.exited = math.inf

    async def run_client(self, number: int) -> None:
        for count in itertools.count():
            if self.exited < math.inf:
                return
            shot = Shot(f"{number}.{count}", time.perf_counter())

            async def trace(event: str, info: dict[str, Any], shot: Shot = shot) -> None:
                if event == "http11.send_request_headers.complete":
                    shot.sent = time.perf_counter()
                    self.in_flight[shot.id] = shot

            try:
                response = await self.client.get(
                    "/slow", params={"id": shot.id}, extensions={"trace": trace}
                )
            except httpx.TransportError as error:
                shot.outcome = type(error).__name__
            else:
                shot.outcome = str(response.status_code)
            shot.done = time.perf_counter()
            self.in_flight.pop(shot.id, None)
            self.shots.append(shot)
            if shot.outcome != "200" and shot.attempted > self.signalled:
                return  # refused after the signal: this client is done


#: How a request the server did not take shows at the client: the listener is
#: closed (ConnectError), or the request went out on a keep-alive connection
#: the server had just closed as idle, before the client read the previous
#: answer's end (closed without an answer). 503 is a probe's "not ready".
REFUSED = ("ConnectError", "RemoteProtocolError", "ReadError", "503")


def _seen_by_app(stdout: str) -> set[str]:
    """Ids of the /slow requests whose handler ran (it prints ``slow: <id>``)."""
    return set(re.findall(r"^slow: (\S+)$", stdout, re.MULTILINE))


async def _until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` without blocking Trio (it reads another process: no event to await)."""
    while not condition():  # noqa: ASYNC110 - see the docstring
        await trio.sleep(0.001)


async def test_sigterm_under_load_finishes_in_flight_and_refuses_new(
    spawn: Spawn, tmp_path: Path
) -> None:
    """SIGTERM amid 50 concurrent requests: those sent before it get 200, later ones are refused."""
    main, config = _slow_service(tmp_path, drain=3.0, shutdown=5.0)
    port = free_port()
    child = await trio.to_thread.run_sync(lambda: _spawn_example(spawn, main, config, port=port))
    clients = 50
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    draining = math.inf  # when "http: stopping" was seen on stderr (the drain began before)

    def watch_drain() -> bool:
        """Note when the drain shows in the event log; true once the process has exited."""
        nonlocal draining
        if draining == math.inf and "http: stopping" in child.stderr:
            draining = time.perf_counter()
        return child.proc.poll() is not None

    with trio.fail_after(15):
        async with (
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=5
            ) as client,
            trio.open_nursery() as nursery,
        ):
            load = Load(client)
            for number in range(clients):
                nursery.start_soon(load.run_client, number)
            await trio.sleep(0.5)
            # Signal at an instant when every request written to a socket has
            # reached the app, so "sent before the signal" means "in flight".
            # Nothing else runs between this check and the kill.
            await _until(
                lambda: (
                    len(load.in_flight) == clients
                    and load.in_flight.keys() <= _seen_by_app(child.stdout)
                )
            )
            load.signalled = child.send(signal.SIGTERM)
            await _until(watch_drain)
            load.exited = time.perf_counter()
    code = await trio.to_thread.run_sync(child.wait)
    assert code == 0, child.report()
    # In flight is 200 ms; the bound is the drain timeout (3 s), not a speed.
    assert load.exited - load.signalled < 3.0, child.report()
    assert "http: cut" not in child.stderr, child.report()
    assert draining < load.exited, child.report()

    shots = load.shots
    before = [shot for shot in shots if shot.sent < load.signalled]
    assert len(before) >= 2 * clients  # the first wave, and the one in flight at the signal
    assert [shot for shot in before if shot.outcome != "200"] == []
    assert sum(shot.done > load.signalled for shot in before) == clients  # in flight: drained
    refused = [s for s in shots if s.attempted > load.signalled and s.outcome != "200"]
    assert len(refused) == clients  # every client ended on a refusal
    late = [shot for shot in shots if shot.attempted > draining]
    assert late
    assert [shot for shot in late if shot.outcome not in REFUSED] == []
    assert not _seen_by_app(child.stdout) & {shot.id for shot in late}


async def test_request_longer_than_the_drain_is_cut(spawn: Spawn, tmp_path: Path) -> None:
    """A request longer than drain_timeout is cut at its deadline; exit 0 by shutdown_timeout."""
    main, config = _slow_service(tmp_path, drain=1.0, shutdown=3.0)
    port = free_port()
    child = await trio.to_thread.run_sync(lambda: _spawn_example(spawn, main, config, port=port))
    outcome: list[str] = []

    async def long_request(client: httpx.AsyncClient) -> None:
        try:
            response = await client.get("/slow", params={"id": "long", "s": "10"})
        except httpx.TransportError as error:
            outcome.append(type(error).__name__)
        else:
            outcome.append(str(response.status_code))

    with trio.fail_after(15):
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(long_request, client)
            await _until(lambda: "slow: long" in child.stdout)
            signalled = child.send(signal.SIGTERM)
            await _until(lambda: child.proc.poll() is not None)
            exited = time.perf_counter()
    code = await trio.to_thread.run_sync(child.wait)
    assert code == 0, child.report()  # a cut is a warning, not a failure
    assert 1.0 <= exited - signalled < 3.0, child.report()
    assert outcome != ["200"]  # it never got its answer
    assert re.search(r"^\[.*\] http: cut \(drain timeout 1 s\)$", child.stderr, re.MULTILINE), (
        child.report()
    )
    # The store still stops, after the server.
    assert event_names(child.stdout, "items")[-1] == "store stopped", child.report()


def test_request_queued_behind_a_draining_response_does_not_hold_the_exit(
    spawn: Spawn, tmp_path: Path
) -> None:
    """A keep-alive request queued behind a response that ends during the drain: prompt exit."""
    main, config = _slow_service(tmp_path, drain=3.0, shutdown=5.0)
    port = free_port()
    child = _spawn_example(spawn, main, config, port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as sock:
        # Pipelined: the second request waits in the server's buffer while
        # the first one's response streams out.
        sock.sendall(
            b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\nGET /items HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        received = b""
        while b"first," not in received:  # the response has begun, keep-alive
            chunk = sock.recv(65536)
            assert chunk, child.report()
            received += chunk
        sent = child.send(signal.SIGTERM)
        code = child.wait()
    elapsed = time.perf_counter() - sent
    assert code == 0, child.report()
    assert elapsed < 2.0, f"exit took {elapsed:.1f} s (drain_timeout 3 s)\n{child.report()}"


# -- idle keep-alive connections -----------------------------------------------------


def _keep_alive_connection(port: int) -> socket.socket:
    """A connection that made one request, read the whole response, and stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
    try:
        sock.sendall(b"GET /items HTTP/1.1\r\nHost: test\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"connection: close" not in head.lower(), head
        length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            body += sock.recv(65536)
    except BaseException:
        sock.close()
        raise
    return sock


def test_idle_keep_alive_connections_do_not_hold_the_exit(spawn: Spawn) -> None:
    """Ten idle keep-alive connections are closed at SIGTERM: exit 0 in under 2 s."""
    port = free_port()
    child = _spawn_example(spawn, HTTP / "main.py", port=port)
    with ExitStack() as stack:
        sockets = [stack.enter_context(_keep_alive_connection(port)) for _ in range(10)]
        sent = child.send(signal.SIGTERM)
        code = child.wait()
        elapsed = time.perf_counter() - sent
        for sock in sockets:
            assert sock.recv(1) == b""  # closed by the server: end of file
    assert code == 0, child.report()
    # A behaviour bound, not a speed claim: hypercorn's own serve() waits
    # its graceful_timeout (3 s) for connections like these.
    assert elapsed < 2.0, child.report()
