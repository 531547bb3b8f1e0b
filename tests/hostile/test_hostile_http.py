"""The HTTP kind under attack: real processes, real sockets, hostile clients.

Every scenario runs ``http_target.py`` as users run a service (its own
process) and attacks it from outside: raw sockets for HTTP/1.1, the ``h2``
library for crafted HTTP/2 frames, SIGTERM under load. Each scenario is
bounded in time and in count. Figures (lost requests, memory per
connection, the worst one hostile connection can cost, recovery time) are
printed with ``-s`` and asserted against bounds, never against speed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import h11
import hyperframe.frame
import pytest

from helpers import PATIENCE, Child, Spawn, first_error, free_port, rss_kib, wait_until_ok

TARGET = Path(__file__).with_name("http_target.py")

#: Settings of the shared target: small timeouts, so each attack ends fast.
SHARED = {
    "read_timeout": 1.0,
    "keep_alive_timeout": 3.0,
    "body_timeout": 1.0,
    "send_timeout": 1.0,
    "h2_max_concurrent_streams": 50,
}


def write_toml(
    directory: Path, http: Mapping[str, Any], lifecycle: Mapping[str, Any] | None = None
) -> Path:
    """A service.toml for the target on 127.0.0.1 (the port comes from MIKROS_HTTP_PORT)."""
    timeouts = {"start_timeout": 3.0, "drain_timeout": 5.0, "shutdown_timeout": 8.0}
    timeouts.update(lifecycle or {})
    lines = ['name = "hostile"', 'types = ["http"]', 'version = "1.0.0"', "", "[runtime.http]"]
    lines += [
        f"{key} = {json.dumps(value)}" for key, value in {"host": "127.0.0.1", **http}.items()
    ]
    lines += ["", "[lifecycle]", *(f"{key} = {value}" for key, value in timeouts.items())]
    path = directory / "service.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def target_env(toml: Path, port: int, **extra: str) -> dict[str, str]:
    return {"HOSTILE_TOML": str(toml), "MIKROS_HTTP_PORT": str(port), **extra}


@dataclass
class Target:
    """A running target process and its port."""

    child: Child
    port: int

    @property
    def pid(self) -> int:
        return self.child.proc.pid

    def alive(self) -> bool:
        return self.child.proc.poll() is None

    def get(self, path: str) -> tuple[int, bytes]:
        """One GET on a fresh connection: (status, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=PATIENCE)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stats(self) -> dict[str, int]:
        status, body = self.get("/stats")
        assert status == 200
        result: dict[str, int] = json.loads(body)
        return result


@pytest.fixture(name="target", scope="module")
def fixture_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One target shared by the attacks that leave it serving (each checks that it does)."""
    toml = write_toml(tmp_path_factory.mktemp("hostile"), SHARED)
    port = free_port()
    child = Child([sys.executable, str(TARGET)], {**_base_env(), **target_env(toml, port)})
    target = Target(child, port)
    wait_until_ok(child, port)
    yield target
    child.close()


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MIKROS_TRIO_VERBOSE"}


def connect(port: int, timeout: float = PATIENCE) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_until_closed(sock: socket.socket, limit: float = PATIENCE) -> tuple[bytes, float]:
    """All the server sends until it closes (EOF or reset), and when; fails after ``limit``."""
    began = time.monotonic()
    received = b""
    try:
        while (left := began + limit - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                return received, time.monotonic() - began
            received += chunk
    except ConnectionResetError:
        return received, time.monotonic() - began
    except TimeoutError:
        pass
    pytest.fail(f"the server kept the connection open for {limit} s: {received[:200]!r}")


def statuses(raw: bytes) -> list[int]:
    """The status of every HTTP/1.1 response in ``raw``, in order (parsed with h11)."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    found = []
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:
            return found  # the server closed (or sent garbage) after what was found
        if isinstance(event, h11.Response):
            found.append(event.status_code)
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return found
        elif isinstance(event, h11.EndOfMessage):
            if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                return found
            client.start_next_cycle()
            client.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
            client.send(h11.EndOfMessage())


# -- start: never hangs, fails loud --------------------------------------------


def start_failure(
    spawn: Spawn, tmp_path: Path, http: Mapping[str, Any], port: int, **env: str
) -> tuple[int, float, str]:
    """Start the target expecting it to fail: (exit code, seconds to exit, first error)."""
    toml = write_toml(tmp_path, http, {"start_timeout": 2.0})
    began = time.monotonic()
    child = spawn(sys.executable, TARGET, env=target_env(toml, port, **env))
    code = child.wait(timeout=8.0)
    return code, time.monotonic() - began, first_error(child.stdout)


def test_port_in_use_fails_the_start_with_the_cause(spawn: Spawn, tmp_path: Path) -> None:
    """A port already in use: exit 1 within start_timeout, '[Errno 98] … 127.0.0.1:PORT' first."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        code, took, error = start_failure(spawn, tmp_path, {}, port)
    assert code == 1
    assert took < 2.0 + 3.0
    assert error.startswith("http: failed to start: OSError: [Errno 98]")
    assert f"127.0.0.1:{port}" in error


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ("missing", "cannot load the TLS certfile"),
        ("garbage", "cannot load the TLS certfile"),
        ("address", "cannot listen on 192.0.2.1"),
    ],
)
def test_unopenable_listener_fails_the_start_with_the_cause(
    spawn: Spawn, tmp_path: Path, tls: str, expected: str
) -> None:
    """A missing or unreadable certificate, or an address not ours: exit 1, the cause first."""
    pem = tmp_path / "garbage.pem"
    pem.write_text("not a certificate")
    http = {
        "missing": {"certfile": str(tmp_path / "none.pem"), "keyfile": str(tmp_path / "no.pem")},
        "garbage": {"certfile": str(pem), "keyfile": str(pem)},
        "address": {"host": "192.0.2.1"},
    }[tls]
    code, took, error = start_failure(spawn, tmp_path, http, free_port())
    assert code == 1
    assert took < 2.0 + 3.0
    assert error.startswith("http: failed to start: "), error
    assert expected in error.splitlines()[0]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("raise", "http: failed to start: ValueError: db unreachable"),
        ("hang", "http: failed to start: TimeoutError: the app's startup (before_serving)"),
    ],
)
def test_app_startup_failing_or_hanging_fails_the_start(
    spawn: Spawn, tmp_path: Path, mode: str, expected: str
) -> None:
    """before_serving raising names the user's exception; hanging is cut at start_timeout."""
    code, took, error = start_failure(spawn, tmp_path, {}, free_port(), HOSTILE_START=mode)
    assert code == 1
    assert took < 2.0 + 3.0
    assert error.startswith(expected), error


def test_sigterm_during_a_hanging_startup_ends_the_process(spawn: Spawn, tmp_path: Path) -> None:
    """SIGTERM while before_serving hangs (start_timeout 30 s) ends the process within 2 s."""
    toml = write_toml(tmp_path, {}, {"start_timeout": 30.0})
    child = spawn(sys.executable, TARGET, env=target_env(toml, free_port(), HOSTILE_START="hang"))
    child.wait_for("before_serving: hanging")
    sent = child.send(signal.SIGTERM)
    child.wait(timeout=2.0)
    assert time.perf_counter() - sent < 2.0


# -- SIGTERM under load: nothing accepted is lost ----------------------------------


@dataclass
class LoadResult:
    """What the load's clients saw around one SIGTERM."""

    before: int = 0  # requests fully sent before SIGTERM
    before_ok: int = 0  # ... answered 200
    after_ok: int = 0  # requests sent after SIGTERM and served 200
    after_refused: int = 0  # ... refused cleanly: connection closed before any byte, or 503 JSON
    bad: list[str] = field(default_factory=list)  # anything else: lost or malformed


@dataclass(frozen=True)
class Exchange:
    """One request of the load: when its last byte was sent, and what came back."""

    path: str
    sent: float  # perf_counter() once sendall returned
    status: int | None
    body: bytes
    got_bytes: bool


def keep_alive_client(port: int, path: str, stop: threading.Event, seen: list[Exchange]) -> None:
    """Send requests back to back on one keep-alive connection until it closes."""
    try:
        sock = connect(port)
    except OSError:
        return
    with sock:
        client = h11.Connection(h11.CLIENT)
        pause = random.Random(port)
        while not stop.is_set():
            # A short think time between requests leaves the connection
            # idle often: requests then race the drain's closing of idle
            # connections, as a client pool's do.
            time.sleep(pause.uniform(0, 0.004))
            request = client.send(h11.Request(method="GET", target=path, headers=[("Host", "t")]))
            request += client.send(h11.EndOfMessage()) or b""
            try:
                sock.sendall(request or b"")
            except OSError:
                return  # closed by the server before we sent: nothing was accepted
            # Classified against the signal's time afterwards: a flag read
            # here could be stale, since the thread that sends the signal
            # may wait for the GIL between the signal and setting it.
            sent = time.perf_counter()
            status, body, got_bytes = _read_response(sock, client)
            seen.append(Exchange(path, sent, status, body, got_bytes))
            if status is None or client.our_state is not h11.DONE:
                return
            if client.their_state is not h11.DONE:
                return
            try:
                client.start_next_cycle()
            except h11.LocalProtocolError:
                return  # the server said Connection: close


def classify(seen: list[Exchange], signalled: float) -> LoadResult:
    """What the clients saw, split by whether the request was sent before the signal."""
    result = LoadResult()
    for exchange in seen:
        before = exchange.sent < signalled
        status, body = exchange.status, exchange.body
        if before:
            result.before += 1
        if status == 200:
            result.before_ok += before
            result.after_ok += not before
        elif not before and (
            (status is None and not exchange.got_bytes) or (status == 503 and body.startswith(b"{"))
        ):
            result.after_refused += 1
        else:
            result.bad.append(f"{exchange.path}: {status} {body[:80]!r} before={before}")
    return result


def _read_response(sock: socket.socket, client: h11.Connection) -> tuple[int | None, bytes, bool]:
    """(status or None if the connection ended first, body, whether any byte arrived)."""
    status: int | None = None
    body = b""
    got = False
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                data = b""
            got = got or bool(data)
            client.receive_data(data)
            if not data:
                try:
                    event = client.next_event()
                except h11.RemoteProtocolError:
                    return None, body, got
                if not isinstance(event, h11.EndOfMessage):
                    return (None if status is None else -status), body, got
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, body, got
        elif isinstance(event, h11.ConnectionClosed):
            return None, body, got


def sigterm_under_load(spawn: Spawn, tmp_path: Path, clients: int = 24) -> tuple[LoadResult, int]:
    """One run: load on keep-alive connections, SIGTERM mid-way; what clients saw and the exit."""
    port = free_port()
    tmp_path.mkdir()
    toml = write_toml(tmp_path, {"keep_alive_timeout": 5.0})
    child = spawn(sys.executable, TARGET, env=target_env(toml, port))
    wait_until_ok(child, port)
    seen: list[Exchange] = []  # list.append is atomic: the threads share it
    stop = threading.Event()
    paths = ["/hello", "/hello", "/work?ms=30", "/work?ms=5"]
    threads = [
        threading.Thread(
            target=keep_alive_client,
            args=(port, paths[i % len(paths)], stop, seen),
            daemon=True,
        )
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    signalled = child.send(signal.SIGTERM)
    code = child.wait()
    stop.set()
    for thread in threads:
        thread.join(PATIENCE)
    return classify(seen, signalled), code


def test_sigterm_under_load_loses_nothing(spawn: Spawn, tmp_path: Path) -> None:
    """10 SIGTERMs under keep-alive load: every request sent before is answered 200, none empty."""
    totals = LoadResult()
    for run in range(10):
        result, code = sigterm_under_load(spawn, tmp_path / f"run{run}")
        assert code == 0
        totals.before += result.before
        totals.before_ok += result.before_ok
        totals.after_ok += result.after_ok
        totals.after_refused += result.after_refused
        totals.bad += result.bad
    print(
        f"\nSIGTERM under load, 10 runs: {totals.before} requests sent before SIGTERM, "
        f"{totals.before - totals.before_ok} lost; after it: {totals.after_ok} served, "
        f"{totals.after_refused} refused cleanly"
    )
    assert totals.before > 500
    assert totals.bad == []
    assert totals.before_ok == totals.before


# -- handlers raising ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "wire_kind"),
    [
        ("exception", 500, "InternalError"),
        ("validation", 400, "ValidationError"),
        ("permission", 403, "PermissionError"),
        ("not-found", 404, "NotFoundError"),
        ("condition", 412, "ConditionError"),
        ("system-exit", 500, "InternalError"),
        ("keyboard-interrupt", 500, "InternalError"),
        ("generator-exit", 500, "InternalError"),
        ("base-exception", 500, "InternalError"),
    ],
)
def test_a_raising_handler_fails_its_request_only(
    target: Target, kind: str, status: int, wire_kind: str
) -> None:
    """Every exception type a handler raises answers Mikros JSON; the service keeps serving."""
    got, body = target.get(f"/raise/{kind}")
    assert got == status
    wire = json.loads(body)
    assert (wire["kind"], wire["service_name"]) == (wire_kind, "hostile")
    assert target.get("/hello") == (200, b"hello")
    assert target.alive()


# -- malformed HTTP/1.1 ---------------------------------------------------------


def exchange(port: int, data: bytes) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection; everything until the server closes it."""
    with connect(port) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def test_content_length_with_transfer_encoding_is_rejected_and_closed(target: Target) -> None:
    """CL + TE (RFC 9112 6.1): 400 JSON, then the connection closes; the smuggled GET never runs."""
    smuggled = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"
    raw, _ = exchange(
        target.port,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled,
    )
    assert statuses(raw) == [400], raw
    assert b"connection: close" in raw.lower()
    assert b"Transfer-Encoding" in raw  # the JSON message says why


@pytest.mark.parametrize(
    ("data", "allowed"),
    [
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", {400}),
        (
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            {400},
        ),
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", {431}),
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Fold: a\r\n b\r\n\r\n", {400, 200}),
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nBad\x00Name: x\r\n\r\n", {400}),
        (b"GET /hello HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", {400, 501}),
    ],
    ids=["bad-chunk-size", "two-lengths", "huge-header", "obs-fold", "nul-in-name", "unknown-te"],
)
def test_malformed_http11_gets_an_error_and_a_close(
    target: Target, data: bytes, allowed: set[int]
) -> None:
    """Malformed requests get one well-formed 4xx (or, for obs-fold, one answer) and a close."""
    raw, _ = exchange(target.port, data + b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
    found = statuses(raw)
    assert found, raw[:200]
    assert found[0] in allowed, raw[:200]
    if found[0] >= 400:
        assert found == [found[0]], "nothing after a rejected request is parsed"
    assert target.get("/hello") == (200, b"hello")


# -- slowloris -------------------------------------------------------------------


def test_header_slowloris_is_cut_within_keep_alive_timeout(target: Target) -> None:
    """A request head trickled a byte every 0.2 s is cut within keep_alive_timeout (3 s)."""
    head = b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 1000
    began = time.monotonic()
    with connect(target.port) as sock:
        cut = False
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = True
                break
            time.sleep(0.2)
            if time.monotonic() - began > SHARED["keep_alive_timeout"] + 2.0:
                break
        if not cut:
            raw, _ = read_until_closed(sock, limit=2.0)
            assert b"200" not in raw
    assert time.monotonic() - began < SHARED["keep_alive_timeout"] + 2.0


def test_body_slowloris_gets_408_within_body_timeout(target: Target) -> None:
    """A body trickled a byte every 0.2 s gets a 408 JSON within body_timeout, then a close."""
    with connect(target.port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
        began = time.monotonic()
        sock.settimeout(0.2)
        received = b""
        while time.monotonic() - began < 5.0:
            try:
                sock.sendall(b"x")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        took = time.monotonic() - began
    assert statuses(received) == [408]
    assert json.loads(received.partition(b"\r\n\r\n")[2])["kind"] == "ValidationError"
    assert took < SHARED["body_timeout"] + 2.0


def test_client_that_reads_nothing_is_dropped_after_send_timeout(target: Target) -> None:
    """HTTP/1.1: a client reading nothing of a 64 MiB answer is dropped after send_timeout."""
    with connect(target.port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big?bytes=67108864 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(SHARED["send_timeout"] + 1.5)
        received, _ = read_until_closed(sock, limit=3.0)
    assert len(received) < 64 * 1024 * 1024
    assert target.get("/hello") == (200, b"hello")


# -- resource exhaustion -----------------------------------------------------------


def test_idle_connection_memory(target: Target) -> None:
    """300 idle keep-alive connections after one request each cost under 100 KiB apiece."""
    before = rss_kib(target.pid)
    sockets = []
    try:
        for _ in range(300):
            sock = connect(target.port)
            sockets.append(sock)
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        for sock in sockets:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        after = rss_kib(target.pid)
    finally:
        for sock in sockets:
            sock.close()
    per = (after - before) / 300
    print(f"\nidle keep-alive connections: {per:.1f} KiB each (RSS +{after - before} KiB / 300)")
    assert per < 100


def test_connection_flood_under_a_low_fd_limit_recovers(spawn: Spawn, tmp_path: Path) -> None:
    """With 256 descriptors, 400 connections: the server survives EMFILE and serves once they go."""
    port = free_port()
    toml = write_toml(tmp_path, {"keep_alive_timeout": 30.0, "read_timeout": 30.0})

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen(
        [sys.executable, str(TARGET)],
        env={**_base_env(), **target_env(toml, port)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=low_fd_limit,
    )
    try:
        _first_200(port, deadline=time.monotonic() + PATIENCE, proc=proc)
        flood = []
        try:
            # The listen backlog takes what accept cannot: connect succeeds.
            flood.extend(connect(port) for _ in range(400))
            time.sleep(1.0)  # the server meets EMFILE while accepting
            assert proc.poll() is None, "the server died of the flood"
        finally:
            closed_at = time.monotonic()
            for sock in flood:
                sock.close()
        recovered = _first_200(port, deadline=closed_at + 10.0, proc=proc)
        print(f"\nfd flood: served again {recovered - closed_at:.2f} s after the clients left")
    finally:
        proc.kill()
        proc.wait(PATIENCE)


def _first_200(port: int, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Poll GET /hello until 200; return when it came (fails past ``deadline``)."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            connection.request("GET", "/hello")
            if connection.getresponse().status == 200:
                return time.monotonic()
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.05)
    pytest.fail(f"port {port} never answered 200")


# -- HTTP/2 ------------------------------------------------------------------------


class H2Client:
    """A raw h2c (prior knowledge) connection driven frame by frame with the h2 library.

    A thread reads everything the server sends as it comes (a server that
    closes on unread bytes resets the connection, and a reset discards
    what the client had not read); :meth:`parse` feeds it to h2.
    """

    def __init__(self, port: int, settings: Mapping[int, int] | None = None) -> None:
        self.sock = connect(port)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values=dict(settings or {})
        )
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []
        self._received = bytearray()
        self._lock = threading.Lock()
        self.ended = threading.Event()  # the server closed the connection
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while data := self.sock.recv(65536):
                with self._lock:
                    self._received += data
        except OSError:
            pass
        self.ended.set()

    def request(self, path: str) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "t")]
        self.h2.send_headers(stream_id, headers, end_stream=True)
        return stream_id

    def flush(self) -> None:
        """Send what h2 has queued (requests, resets; after :meth:`parse`, ACKs too)."""
        with contextlib.suppress(OSError):
            self.sock.sendall(self.h2.data_to_send())

    def parse(self) -> None:
        """Feed what arrived so far to h2."""
        with self._lock:
            data, self._received = bytes(self._received), bytearray()
        if data:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.events.extend(self.h2.receive_data(data))

    def wait(self, seconds: float, until: Callable[[], bool]) -> None:
        """Parse (and answer, e.g. WINDOW_UPDATE-free ACKs) until ``until()``, EOF or time."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.parse()
            self.flush()
            if until() or self.ended.is_set():
                break
            time.sleep(0.05)
        self.parse()

    def of(self, kind: type[Any]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(PATIENCE)


@pytest.fixture(name="h2_client")
def fixture_h2_client(target: Target) -> Iterator[Callable[..., H2Client]]:
    """Open raw h2c connections to the shared target; all are closed at teardown."""
    opened: list[H2Client] = []

    def open_one(settings: Mapping[int, int] | None = None) -> H2Client:
        client = H2Client(target.port, settings)
        opened.append(client)
        return client

    yield open_one
    for client in opened:
        client.close()


def test_h2_rapid_reset_gets_goaway_enhance_your_calm(
    target: Target, h2_client: Callable[..., H2Client]
) -> None:
    """Opening and resetting streams in a loop (CVE-2023-44487) ends in GOAWAY ENHANCE_YOUR_CALM."""
    client = h2_client()
    for sent in range(1, 2001):
        stream_id = client.request("/work?ms=100")
        client.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        if sent % 50 == 0:
            client.flush()
            if client.ended.is_set():
                break
    client.flush()
    client.wait(3.0, until=lambda: bool(client.of(h2.events.ConnectionTerminated)))
    [goaway] = client.of(h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert target.get("/hello") == (200, b"hello")


def test_h2_continuation_flood_closes_the_connection(target: Target) -> None:
    """HEADERS without END_HEADERS then endless CONTINUATION frames: the connection is closed."""
    before = rss_kib(target.pid)
    with connect(target.port) as sock:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        sock.sendall(client.data_to_send())
        headers = hyperframe.frame.HeadersFrame(1)
        headers.data = b"\x82\x86\x84"  # :method GET, :scheme http, :path / (HPACK static)
        sock.sendall(headers.serialize())
        sent = 0
        closed = False
        for _ in range(2000):
            continuation = hyperframe.frame.ContinuationFrame(1)
            continuation.data = b"\x40\x01a\x3f" + b"b" * 16000  # literal headers, never ended
            try:
                sock.sendall(continuation.serialize())
            except OSError:
                closed = True
                break
            sent += 1
        if not closed:
            read_until_closed(sock, limit=5.0)
    grown = rss_kib(target.pid) - before
    print(f"\nCONTINUATION flood: closed after {sent} frames sent, RSS +{grown} KiB")
    assert sent < 2000
    assert target.get("/hello") == (200, b"hello")


def test_h2_stream_flood_is_held_to_max_concurrent_streams(
    target: Target, h2_client: Callable[..., H2Client]
) -> None:
    """1,000 held-open streams, SETTINGS never acknowledged: at most 50 run, then GOAWAY."""
    client = h2_client()
    for sent in range(1, 1001):
        client.request("/work?ms=1500")
        if sent % 100 == 0:
            client.flush()  # nothing parsed: the server's SETTINGS are never acknowledged
    client.ended.wait(4.0)
    client.parse()
    [goaway] = client.of(h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert goaway.last_stream_id <= 2 * SHARED["h2_max_concurrent_streams"] + 1
    assert target.stats()["most_in_flight"] <= SHARED["h2_max_concurrent_streams"]
    assert target.get("/hello") == (200, b"hello")


def test_h2_zero_window_readers_are_reset_after_send_timeout(
    target: Target, h2_client: Callable[..., H2Client]
) -> None:
    """40 streams of 1 MiB to a client whose window stays 0: each reset after send_timeout."""
    baseline = rss_kib(target.pid)
    client = h2_client({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    streams = [client.request("/big?bytes=1048576") for _ in range(40)]
    client.flush()
    peak = baseline
    deadline = time.monotonic() + SHARED["send_timeout"] + 4.0

    def all_reset() -> bool:
        return {e.stream_id for e in client.of(h2.events.StreamReset)} >= set(streams)

    while time.monotonic() < deadline and not all_reset():
        client.wait(0.2, until=all_reset)
        peak = max(peak, rss_kib(target.pid))
    cancelled = {
        e.stream_id
        for e in client.of(h2.events.StreamReset)
        if e.error_code == h2.errors.ErrorCodes.CANCEL
    }
    print(
        f"\nh2 zero-window: {len(cancelled)}/40 streams of 1 MiB reset; "
        f"RSS peak +{peak - baseline} KiB over the connection's life"
    )
    assert cancelled == set(streams)
    assert target.get("/hello") == (200, b"hello")
