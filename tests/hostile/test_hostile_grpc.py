"""Hostile clients against the gRPC kind: a real service process, real and raw HTTP/2 peers.

The service is ``grpc_target.py`` (the test Echo service) started as users
start theirs, from a service.toml written per test; its output goes to
files, so a flood of log lines never blocks it on a full pipe. Clients are
grpcio (C-core) and raw frames (hyperframe + hpack, :class:`RawH2`) for
what grpcio never sends. Every scenario is bounded in time and count, and
checks that the service still serves afterwards.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from helpers import (
    OWN_CONNECTION,
    PATIENCE,
    REPO,
    RawH2,
    cpu_seconds,
    free_port,
    grpc_frame,
    grpc_health,
    rss_kb,
)
from protos import testsvc_pb2, testsvc_pb2_grpc

TARGET = Path(__file__).with_name("grpc_target.py")
ECHO = "/mikros.testsvc.v1.Echo"
EchoRequest = testsvc_pb2.EchoRequest

#: HTTP/2 error codes (RFC 9113 section 7) and the SETTINGS_MAX_CONCURRENT_STREAMS id.
CANCEL, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x8, 0x7, 0xB
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4


class Target:
    """``grpc_target.py`` as a real process on a free port; stdout and stderr go to files."""

    def __init__(
        self,
        directory: Path,
        settings: dict[str, Any] | None = None,
        lifecycle: dict[str, Any] | None = None,
        nofile: int | None = None,
    ) -> None:
        self.port = free_port()
        timeouts = {"drain_timeout": 5.0, "shutdown_timeout": 8.0, **(lifecycle or {})}
        lines = ['name = "target"', 'types = ["grpc"]', 'version = "1.0.0"', "[runtime.grpc]"]
        lines += [
            f"{k} = {json.dumps(v)}" for k, v in {"host": "127.0.0.1", **(settings or {})}.items()
        ]
        lines += ["[lifecycle]", *(f"{k} = {json.dumps(v)}" for k, v in timeouts.items())]
        toml = directory / "service.toml"
        toml.write_text("\n".join(lines) + "\n")
        self.out = directory / "stdout"
        self.err = directory / "stderr"
        env = {**os.environ, "MIKROS_GRPC_PORT": str(self.port)}
        env.pop("MIKROS_TRIO_VERBOSE", None)

        def limit() -> None:  # in the child, before exec: a low descriptor limit
            assert nofile is not None
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(TARGET), str(toml)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=limit if nofile is not None else None,
            )
        self.wait_serving()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_serving(self, timeout: float = PATIENCE) -> float:
        """Poll health Check until SERVING; return the seconds it took (fails on timeout)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            assert self.proc.poll() is None, f"the target exited:\n{self.log()}"
            if grpc_health(self.port, timeout=0.5) == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - started
            time.sleep(0.02)
        raise AssertionError(f"never SERVING:\n{self.log()}")

    def access(self) -> dict[str, str]:
        """Status of each call the service logged, by request id (its access lines)."""
        found = {}
        for line in self.out.read_text().splitlines():
            if '"mikros_trio.access"' in line:
                entry = json.loads(line)
                found[entry["request_id"]] = entry["status"]
        return found

    def serves_then_stops(self) -> None:
        """Check the service still answers a call, then that SIGTERM ends it cleanly."""
        assert unary_ok(self.port), f"no longer serving:\n{self.log()}"
        assert self.stop() == 0

    def stop(self) -> int:
        """SIGTERM; the exit code (fails if it does not exit in time)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(PATIENCE)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(PATIENCE)


@pytest.fixture(name="target")
def fixture_target(tmp_path: Path) -> Iterator[Callable[..., Target]]:
    """Start target services (``target(settings={...}, ...)``); all are killed at teardown."""
    started: list[Target] = []

    def start(**options: Any) -> Target:
        directory = tmp_path / f"target-{len(started)}"
        directory.mkdir()
        one = Target(directory, **options)
        started.append(one)
        return one

    yield start
    for one in started:
        one.close()


def unary_ok(port: int, text: str = "still here") -> bool:
    """One grpcio Unary call on a fresh connection: True if it answered."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
        stub = testsvc_pb2_grpc.EchoStub(channel)
        try:
            return bool(stub.Unary(EchoRequest(text=text), timeout=PATIENCE).text == text)
        except grpc.RpcError:
            return False


def goaway(raw: RawH2) -> Any:
    """The last GOAWAY the server sent (fails if none)."""
    frames = raw.of_type("GoAwayFrame")
    assert frames, f"no GOAWAY; got {[type(f).__name__ for f in raw.frames]}"
    return frames[-1]


# -- SIGTERM under load ----------------------------------------------------------------

CALLERS = 32


def load(port: int, stop: threading.Event, calls: dict[str, tuple[str, int]]) -> None:
    """32 grpcio callers (a quarter unary, the rest 10-item server streams) on 4 connections
    until ``stop``.

    Every connection carries both kinds, mostly streams of many small
    messages: grpcio sends a WINDOW_UPDATE on a stream as it reads response
    messages, so many of them cross the server's trailers, behind other
    calls' HEADERS (h2 3.2 ended the whole connection on such a frame,
    losing every call on it, in most runs of this test under coverage).

    Each call carries its own x-request-id; ``calls`` gets (code, items) by id.
    """
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{port}", options=(*OWN_CONNECTION, ("test.n", n)))
        for n in range(4)
    ]

    def caller(number: int) -> None:
        stub = testsvc_pb2_grpc.EchoStub(channels[number % 4])
        for index in range(10_000):
            if stop.is_set():
                return
            rid = f"load-{number}-{index}"
            metadata = (("x-request-id", rid),)
            try:
                if number // 4 % 4 == 3:  # callers 12-15 and 28-31: two per connection
                    stub.Unary(EchoRequest(delay=0.01), timeout=PATIENCE, metadata=metadata)
                    calls[rid] = ("OK", 1)
                else:
                    request = EchoRequest(count=10, delay=0.01)
                    got = stub.ServerStream(request, timeout=PATIENCE, metadata=metadata)
                    items = 0
                    try:
                        for _ in got:
                            items += 1
                    finally:
                        calls[rid] = (got.code().name, items)
            except grpc.RpcError as error:
                calls.setdefault(rid, (error.code().name, 0))
                time.sleep(0.01)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(CALLERS)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join(2 * PATIENCE)
    finally:
        for channel in channels:
            channel.close()


@pytest.mark.parametrize("run", range(10))
def test_sigterm_under_load_loses_no_dispatched_rpc(
    target: Callable[..., Target], run: int
) -> None:
    """SIGTERM under 32 callers: every call the server dispatched ends OK with all its items;
    every other failure is UNAVAILABLE (never processed: safe to retry)."""
    service = target()
    stop = threading.Event()
    calls: dict[str, tuple[str, int]] = {}
    loader = threading.Thread(target=load, args=(service.port, stop, calls))
    loader.start()
    try:
        time.sleep(0.5)
        assert service.stop() == 0
        time.sleep(0.1)
    finally:
        stop.set()
        loader.join(3 * PATIENCE)
    dispatched = {
        rid: status for rid, status in service.access().items() if rid.startswith("load-")
    }
    assert len(dispatched) > 50, "the load never got going"
    lost = {
        rid: (calls.get(rid), status)
        for rid, status in dispatched.items()
        if status != "OK" or calls.get(rid, ("?", 0)) not in {("OK", 1), ("OK", 10)}
    }
    assert lost == {}, f"{len(lost)} of {len(dispatched)} dispatched calls lost"
    refused = {code for rid, (code, _) in calls.items() if rid not in dispatched}
    assert refused <= {"UNAVAILABLE"}
    print(f"SIGTERM run {run}: {len(dispatched)} dispatched, 0 lost")  # figure for the notes


# -- our own client retries what was refused: see tests/test_grpc_client.py -------------

# -- handlers raising every kind of exception ---------------------------------------------


def test_handlers_raising_any_exception_fail_only_their_call(
    target: Callable[..., Target],
) -> None:
    """RuntimeError, SystemExit, KeyboardInterrupt, GeneratorExit, BaseException and a group of
    them each fail only their call (UNKNOWN, Mikros JSON, logged); the service serves on."""
    service = target()
    kinds = ["exception", "system-exit", "keyboard-interrupt", "generator-exit"]
    kinds += ["base-exception", "base-group"]
    with grpc.insecure_channel(f"127.0.0.1:{service.port}", options=OWN_CONNECTION) as channel:
        stub = testsvc_pb2_grpc.EchoStub(channel)
        for kind in kinds:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Unary(EchoRequest(fail=kind), timeout=PATIENCE)
            assert caught.value.code() == grpc.StatusCode.UNKNOWN, kind
            assert json.loads(caught.value.details())["kind"] == "InternalError"
            items = stub.ServerStream(EchoRequest(count=2, fail=kind), timeout=PATIENCE)
            with pytest.raises(grpc.RpcError) as caught:
                list(items)
            assert caught.value.code() == grpc.StatusCode.UNKNOWN, kind
        assert stub.Unary(EchoRequest(text="after"), timeout=PATIENCE).text == "after"
    assert service.log().count("unhandled error in") == 2 * len(kinds)
    assert service.stop() == 0


# -- resource exhaustion ------------------------------------------------------------------


def test_descriptor_exhaustion_is_waited_out_not_fatal(target: Callable[..., Target]) -> None:
    """With RLIMIT_NOFILE 128, 300 idle connections: accept fails (EMFILE), logged once; the
    service lives and serves again once they close."""
    service = target(nofile=128)
    flood: list[socket.socket] = []
    try:
        flood.extend(
            socket.create_connection(("127.0.0.1", service.port), timeout=PATIENCE)
            for _ in range(300)
        )
        time.sleep(1.0)  # the accept loop meets EMFILE, backs off and retries
        assert service.proc.poll() is None, f"the service died:\n{service.log()}"
    finally:
        for one in flood:
            one.close()
    recovered = service.wait_serving()
    assert unary_ok(service.port)
    log = service.log()
    assert log.count("cannot accept connections") == 1, log
    assert "accepting connections again" in log
    print(f"recovered {recovered:.3f} s after the flood closed")
    assert service.stop() == 0


def test_idle_connections_are_closed_with_goaway(target: Callable[..., Target]) -> None:
    """max_connection_idle = 0.3 s: 20 connections that made a call get GOAWAY, then EOF;
    grpcio reconnects for its next call as if nothing happened."""
    service = target(settings={"max_connection_idle": 0.3})
    raws = [RawH2(service.port) for _ in range(20)]
    try:
        for raw in raws:
            raw.send(raw.request(1, f"{ECHO}/Unary", grpc_frame(b"")))
        for raw in raws:
            assert raw.until(lambda r: r.eof, timeout=3.0), "an idle connection stayed open"
            assert goaway(raw).error_code == 0
            assert raw.of_type("HeadersFrame"), "the call was not answered first"
    finally:
        for raw in raws:
            raw.close()
    with grpc.insecure_channel(f"127.0.0.1:{service.port}", options=OWN_CONNECTION) as channel:
        stub = testsvc_pb2_grpc.EchoStub(channel)
        assert stub.Unary(EchoRequest(text="a"), timeout=PATIENCE).text == "a"
        time.sleep(0.8)  # closed for idleness meanwhile
        assert stub.Unary(EchoRequest(text="b"), timeout=PATIENCE).text == "b"
    assert service.stop() == 0


def test_keepalive_closes_a_silent_peer_and_keeps_an_answering_one(
    target: Callable[..., Target],
) -> None:
    """keepalive_time 0.3 s, timeout 0.3 s: a peer that never answers PINGs is closed; one that
    answers stays connected."""
    service = target(settings={"keepalive_time": 0.3, "keepalive_timeout": 0.3})
    silent = RawH2(service.port, answer_pings=False)
    answering = RawH2(service.port)
    try:
        deadline = time.monotonic() + 3.0
        while not silent.eof and time.monotonic() < deadline:  # both read, turn about
            silent.until(lambda r: r.eof, timeout=0.05)
            answering.until(lambda r: r.eof, timeout=0.05)
        assert silent.eof, "a silent peer stayed connected"
        assert silent.of_type("PingFrame")
        assert not answering.until(lambda r: r.eof, timeout=0.5)
        assert len(answering.of_type("PingFrame")) >= 2
    finally:
        silent.close()
        answering.close()
    assert service.stop() == 0


def test_too_many_pings_get_enhance_your_calm(target: Callable[..., Target]) -> None:
    """A client pinging every millisecond gets GOAWAY ENHANCE_YOUR_CALM "too_many_pings", EOF."""
    service = target()
    with RawH2(service.port) as raw:
        for n in range(20):
            raw.send(PingFrame(0, n.to_bytes(8, "big")).serialize())
            time.sleep(0.001)
        assert raw.until(lambda r: r.eof)
        last = goaway(raw)
        assert (last.error_code, last.additional_data) == (ENHANCE_YOUR_CALM, b"too_many_pings")
    service.serves_then_stops()


# -- HTTP/2 floods --------------------------------------------------------------------------


def test_stream_flood_is_refused_then_cut(target: Callable[..., Target]) -> None:
    """One connection opens 2,000 streams: 100 are advertised and served, the rest refused
    (REFUSED_STREAM) until the refusals pass max_resets_per_second: GOAWAY ENHANCE_YOUR_CALM
    "too_many_streams"; a neighbour's calls still answer."""
    service = target()
    with RawH2(service.port) as raw:
        assert raw.until(lambda r: bool(r.of_type("SettingsFrame")))
        advertised = raw.of_type("SettingsFrame")[0].settings
        assert advertised.get(MAX_CONCURRENT_STREAMS) == 100
        cpu = cpu_seconds(service.pid)
        burst = b"".join(
            raw.request(stream, f"{ECHO}/ClientStream", None, end=False)
            for stream in range(1, 4001, 2)
        )
        raw.send(burst)
        assert raw.until(lambda r: r.eof, timeout=PATIENCE)
        refused = [f for f in raw.of_type("RstStreamFrame") if f.error_code == REFUSED_STREAM]
        assert len(refused) >= 200
        last = goaway(raw)
        assert (last.error_code, last.additional_data) == (ENHANCE_YOUR_CALM, b"too_many_streams")
        print(f"flood of 2,000 streams: {cpu_seconds(service.pid) - cpu:.2f} CPU s")
    service.serves_then_stops()


def test_rapid_reset_gets_enhance_your_calm(target: Callable[..., Target]) -> None:
    """HEADERS then RST_STREAM, 5,000 times at once (CVE-2023-44487): GOAWAY ENHANCE_YOUR_CALM
    "too_many_resets" and EOF; a neighbour's calls still answer."""
    service = target()
    with RawH2(service.port) as raw:
        burst = b"".join(
            raw.request(stream, f"{ECHO}/Unary", grpc_frame(b""), end=False)
            + RstStreamFrame(stream, error_code=CANCEL).serialize()
            for stream in range(1, 10001, 2)
        )
        raw.send(burst)
        assert raw.until(lambda r: r.eof, timeout=PATIENCE)
        last = goaway(raw)
        assert (last.error_code, last.additional_data) == (ENHANCE_YOUR_CALM, b"too_many_resets")
    service.serves_then_stops()


def test_continuation_flood_is_cut_before_it_costs_memory(target: Callable[..., Target]) -> None:
    """HEADERS without END_HEADERS, then 1 MiB CONTINUATION frames: the connection gets GOAWAY
    and EOF at once, and the service grows by less than 16 MB."""
    service = target()
    before = rss_kb(service.pid)
    with RawH2(service.port) as raw:
        raw.send(HeadersFrame(1, raw.header_block(f"{ECHO}/Unary")).serialize())
        for _ in range(60):
            raw.send(ContinuationFrame(1, b"\x00" * (1 << 20)).serialize())
            if raw.eof:
                break
        grown = rss_kb(service.pid) - before
        assert raw.until(lambda r: r.eof)
        assert raw.of_type("GoAwayFrame")
    assert grown < 16 * 1024, f"grew {grown} KiB"
    service.serves_then_stops()


def test_zero_window_reader_is_reset_after_send_stall_timeout(
    target: Callable[..., Target],
) -> None:
    """A client whose stream window is 0 (it never reads): the response's stream is reset
    (CANCEL) after send_stall_timeout; the service serves on."""
    service = target(settings={"send_stall_timeout": 0.3})
    with RawH2(service.port, {INITIAL_WINDOW_SIZE: 0}) as raw:
        request = EchoRequest(text="x" * 1000, count=100).SerializeToString()
        raw.send(raw.request(1, f"{ECHO}/ServerStream", grpc_frame(request)))

        def reset(r: RawH2) -> bool:
            return any(f.stream_id == 1 for f in r.of_type("RstStreamFrame"))

        assert raw.until(reset, timeout=3.0), "the stalled stream was never reset"
        assert [f.error_code for f in raw.of_type("RstStreamFrame")] == [CANCEL]
        assert not raw.eof
    service.serves_then_stops()


def test_one_connection_buffers_at_most_its_window(target: Callable[..., Target]) -> None:
    """20 streams each sending as much of a 4 MiB message as flow control allows, read by no
    handler: the connection window (16 MiB) bounds what the service holds (< 48 MB)."""
    service = target()
    before = rss_kb(service.pid)
    with RawH2(service.port) as raw:
        assert raw.until(lambda r: bool(r.of_type("WindowUpdateFrame")))
        settings = raw.of_type("SettingsFrame")[0].settings
        stream_window = settings.get(INITIAL_WINDOW_SIZE, 65535)
        window = 65535 + sum(f.window_increment for f in raw.of_type("WindowUpdateFrame"))
        message = 4 * 1024 * 1024 - 16
        sent = 0
        for stream in range(1, 41, 2):
            block = raw.header_block(f"{ECHO}/Unary")
            raw.send(HeadersFrame(stream, block, flags=["END_HEADERS"]).serialize())
            allowed = min(stream_window, window - sent, message)  # never a whole message
            body = (b"\x00" + message.to_bytes(4, "big") + b"\x01" * allowed)[:allowed]
            for offset in range(0, len(body), 16384):
                raw.send(DataFrame(stream, body[offset : offset + 16384]).serialize())
            sent += len(body)
            if sent >= window:
                break
        # The PING's answer comes after every byte before it was processed.
        raw.send(PingFrame(0, b"measured").serialize())
        assert raw.until(
            lambda r: any(f.opaque_data == b"measured" for f in r.of_type("PingFrame"))
        )
        grown = rss_kb(service.pid) - before
        assert not raw.eof
    print(f"one connection, worst case: sent {sent >> 20} MiB, service grew {grown >> 10} MiB")
    assert grown < 48 * 1024, f"grew {grown} KiB"
    service.serves_then_stops()


def test_max_connection_age_drains_then_cuts_after_the_grace(
    target: Callable[..., Target],
) -> None:
    """max_connection_age 0.3 s, grace 0.6 s: a connection gets the two-step GOAWAY at its age;
    a call within the grace answers, one outliving it is cut (EOF without its status)."""
    service = target(settings={"max_connection_age": 0.3, "max_connection_age_grace": 0.6})
    within, beyond = RawH2(service.port), RawH2(service.port)
    try:
        slow = EchoRequest(delay=0.5).SerializeToString()
        within.send(within.request(1, f"{ECHO}/Unary", grpc_frame(slow)))
        stuck = EchoRequest(delay=30).SerializeToString()
        beyond.send(beyond.request(1, f"{ECHO}/Unary", grpc_frame(stuck)))
        assert within.until(lambda r: r.eof, timeout=3.0)
        assert [f.last_stream_id for f in within.of_type("GoAwayFrame")] == [2**31 - 1, 1]
        assert len(within.of_type("HeadersFrame")) == 2, "no answer within the grace"
        assert beyond.until(lambda r: r.eof, timeout=3.0), "not cut after the grace"
        assert len(beyond.of_type("HeadersFrame")) <= 1, "answered a 30 s call"
    finally:
        within.close()
        beyond.close()
    service.serves_then_stops()


def test_a_client_that_never_reads_its_socket_holds_little(
    target: Callable[..., Target],
) -> None:
    """Windows of 2 GiB, an endless server stream, and the socket never read: the handler waits
    once 1 MiB is queued, then its stream is reset after send_stall_timeout; memory stays put."""
    service = target(settings={"send_stall_timeout": 1.0})
    before = rss_kb(service.pid)
    with RawH2(service.port, {INITIAL_WINDOW_SIZE: 2**31 - 1}) as raw:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.send(WindowUpdateFrame(0, window_increment=2**31 - 1 - 65535).serialize())
        request = EchoRequest(text="x" * 16384, count=1_000_000).SerializeToString()
        raw.send(raw.request(1, f"{ECHO}/ServerStream", grpc_frame(request)))
        time.sleep(2.5)  # never reading: the server's writes fill the socket, then its queue
        grown = rss_kb(service.pid) - before
    print(f"a never-reading client: the service grew {grown >> 10} MiB")  # figure for the notes
    assert grown < 32 * 1024, f"grew {grown} KiB"
    assert "unhandled" not in service.log()
    service.serves_then_stops()
