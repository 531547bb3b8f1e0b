"""The gRPC example (the greeter): in-process, then as a real process stopped by SIGTERM.

In-process tests start ``examples/grpc`` through the ``mikros_service``
fixture and call its real listener with grpcio's C-core client, its health
and its reflection clients. Process tests run it the way users do
(``python examples/grpc/main.py``, the port from ``MIKROS_GRPC_PORT``; or
``mikros-trio run`` with a copy of its service.toml) and pin the shutdown:
RPCs in flight finish, new ones get UNAVAILABLE, a stream longer than the
drain ends with a status, idle channels do not hold the exit up. Every wait
is bounded; every grpcio channel is closed.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
import pytest
import trio
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from helpers import (
    GRPC_OPTIONS,
    MIKROS_TRIO,
    OWN_CONNECTION,
    PATIENCE,
    REPO,
    Child,
    Spawn,
    free_port,
    grpc_channel,
    grpc_health,
    import_example,
    wait_until_serving,
)
from mikros_trio import ServiceError, ValidationError
from mikros_trio.testing import ServiceStarter

GRPC = REPO / "examples" / "grpc"

#: Timeout of every grpcio call a test makes: a hung server fails the call, not the run.
CALL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Greeter:
    """The example's modules: ``main`` (its container), messages, grpcio stubs."""

    main: ModuleType
    pb2: ModuleType
    pb2_grpc: ModuleType


@pytest.fixture(name="greeter", scope="module")
def fixture_greeter() -> Iterator[Greeter]:
    """examples/grpc/main.py imported under a name no other example's ``main`` takes."""
    main = import_example(GRPC / "main.py", "grpc_example_main")
    try:
        yield Greeter(
            main,
            importlib.import_module("greeter_proto.greeter_pb2"),
            importlib.import_module("greeter_proto.greeter_pb2_grpc"),
        )
    finally:
        del sys.modules[main.__name__]


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run blocking grpcio code in a worker thread; its calls carry their own timeouts."""
    with trio.fail_after(2 * CALL_TIMEOUT):
        return await trio.to_thread.run_sync(fn, *args)


def _rpc_error(fn: Any) -> grpc.RpcError:
    """The grpc.RpcError that ``fn()`` raises (fails the test if it returns)."""
    try:
        fn()
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded")


# -- in-process ---------------------------------------------------------------


async def test_say_hello_unary_and_stream(mikros_service: ServiceStarter, greeter: Greeter) -> None:
    """grpcio's client gets SayHello's reply and SayHelloStream's ``count`` replies."""
    running = await mikros_service.start(greeter.main.Container, GRPC / "service.toml")

    def calls(port: int) -> tuple[Any, list[Any]]:
        with grpc_channel(port) as channel:
            stub = greeter.pb2_grpc.GreeterStub(channel)
            one = stub.SayHello(greeter.pb2.HelloRequest(name="Ada"), timeout=CALL_TIMEOUT)
            request = greeter.pb2.HelloStreamRequest(name="Grace", count=3, interval_ms=10)
            return one, list(stub.SayHelloStream(request, timeout=CALL_TIMEOUT))

    one, streamed = await _in_thread(calls, running.ports["grpc"])
    assert one.message == "Hello, Ada!"
    assert [reply.message for reply in streamed] == ["Hello, Grace!"] * 3


async def test_empty_name_is_invalid_argument_with_mikros_json(
    mikros_service: ServiceStarter, greeter: Greeter
) -> None:
    """An empty name fails both methods (UNKNOWN), the details a Mikros ValidationError."""
    running = await mikros_service.start(greeter.main.Container, GRPC / "service.toml")

    def calls(port: int) -> list[grpc.RpcError]:
        with grpc_channel(port) as channel:
            stub = greeter.pb2_grpc.GreeterStub(channel)
            unary = greeter.pb2.HelloRequest(name="")
            stream = greeter.pb2.HelloStreamRequest(name="", count=3)
            return [
                _rpc_error(lambda: stub.SayHello(unary, timeout=CALL_TIMEOUT)),
                _rpc_error(lambda: list(stub.SayHelloStream(stream, timeout=CALL_TIMEOUT))),
            ]

    for error in await _in_thread(calls, running.ports["grpc"]):
        assert error.code() == grpc.StatusCode.UNKNOWN  # what every Mikros client decodes
        wire = json.loads(error.details())
        assert wire == {
            "code": 0,
            "kind": "ValidationError",
            "message": "name must not be empty",
            "service_name": "greeter",
        }
        assert isinstance(ServiceError.from_wire(wire), ValidationError)


async def test_health_is_serving_and_reflection_lists_the_greeter(
    mikros_service: ServiceStarter, greeter: Greeter
) -> None:
    """grpcio-health-checking's Check("") answers SERVING; reflection lists greeter.Greeter."""
    running = await mikros_service.start(greeter.main.Container, GRPC / "service.toml")
    port = running.ports["grpc"]
    assert await _in_thread(grpc_health, port) == health_pb2.HealthCheckResponse.SERVING

    def list_services() -> list[str]:
        with grpc_channel(port) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT)
            return [service.name for service in reply.list_services_response.service]

    assert sorted(await _in_thread(list_services)) == [
        "greeter.Greeter",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


# -- a real process -------------------------------------------------------------


def _spawn_greeter(spawn: Spawn, port: int, config: Path | None = None) -> Child:
    """The greeter on ``port``, lifecycle log on stderr; returns once health says SERVING.

    Without ``config`` it runs as users start it (``python examples/grpc/main.py``);
    with one, through ``mikros-trio run ... --config``.
    """
    env = {"MIKROS_GRPC_PORT": str(port), "MIKROS_METRICS_PORT": "0", "MIKROS_TRIO_VERBOSE": "1"}
    if config is None:
        child = spawn(sys.executable, GRPC / "main.py", env=env)
    else:
        child = spawn(
            MIKROS_TRIO, "run", GRPC / "main.py", "--config", config, "--verbose", env=env
        )
    wait_until_serving(child, port)
    return child


def _config(tmp_path: Path, *, drain: float, shutdown: float) -> Path:
    """A copy of the greeter's service.toml with other drain and shutdown timeouts."""
    text = (GRPC / "service.toml").read_text()
    for key, value in (("drain_timeout", drain), ("shutdown_timeout", shutdown)):
        text, count = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
        assert count == 1, f"no single {key} line in the greeter's service.toml"
    path = tmp_path / "service.toml"
    path.write_text(text)
    return path


def _events(child: Child) -> list[str]:
    """The lifecycle log lines (``[time] component: phase``) without their times."""
    return [line.split("] ", 1)[1] for line in child.stderr.splitlines() if line.startswith("[")]


def test_process_serves_and_stops_on_sigterm(spawn: Spawn, greeter: Greeter) -> None:
    """As a process: SERVING on health, a SayHello round trip; SIGTERM → exit 0, no traceback."""
    port = free_port()
    child = _spawn_greeter(spawn, port)
    with grpc_channel(port) as channel:
        stub = greeter.pb2_grpc.GreeterStub(channel)
        reply = stub.SayHello(greeter.pb2.HelloRequest(name="Ada"), timeout=CALL_TIMEOUT)
    assert reply.message == "Hello, Ada!"
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.report()
    events = _events(child)
    shutdown = events.index("service: shutdown (SIGTERM)")
    # The server drains first, then the features (tracing, metrics, logger: reverse of start).
    assert events[shutdown:] == [
        "service: shutdown (SIGTERM)",
        "grpc: stopping",
        "grpc: stopped",
        "tracing: stopping",
        "tracing: stopped",
        "metrics: stopping",
        "metrics: stopped",
        "logger: stopping",
        "logger: stopped",
        "service: stopped (exit code 0)",
    ], child.report()
    assert "Traceback" not in child.stderr


def test_idle_channels_do_not_hold_the_exit(spawn: Spawn, greeter: Greeter) -> None:
    """Ten idle grpcio connections (one call each, then nothing) → SIGTERM → exit 0 in < 2 s."""
    port = free_port()
    child = _spawn_greeter(spawn, port)
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) for _ in range(10)
    ]
    try:
        for channel in channels:
            stub = greeter.pb2_grpc.GreeterStub(channel)
            stub.SayHello(greeter.pb2.HelloRequest(name="idle"), timeout=CALL_TIMEOUT)
        sent = child.send(signal.SIGTERM)
        code = child.wait()
        elapsed = time.perf_counter() - sent
    finally:
        for channel in channels:
            channel.close()
    assert code == 0, child.report()
    # A behaviour bound, not a speed claim: purerpc's own server never
    # closes these connections, and the drain timeout is 5 s.
    assert elapsed < 2.0, child.report()
    assert "grpc: cut" not in child.stderr, child.report()


# -- shutdown under load ----------------------------------------------------------

#: Concurrent clients of the load, and what each of their RPCs asks for (≈ 200 ms).
CLIENTS = 32
COUNT = 4
INTERVAL_MS = 50


@dataclass(eq=False)  # kept in a set: by identity
class Shot:
    """One SayHelloStream of the load: when it began, got its first reply, ended, and how."""

    client: int
    started: float  # perf_counter before the call
    first: float = math.inf  # the first reply arrived: the handler is running
    done: float = math.inf
    replies: int = 0
    outcome: str = ""  # "OK" or the status code's name


class Load:
    """``CLIENTS`` grpc.aio clients calling SayHelloStream back to back on one channel.

    Runs on its own asyncio loop in a worker thread (the test's thread runs
    Trio). The same loop sends the SIGTERM and watches the child, so what
    "before the signal" and "after the drain began" mean is decided on one
    clock, between two steps of the clients.
    """

    def __init__(self, child: Child, port: int, greeter: Greeter) -> None:
        self.child = child
        self.port = port
        self.greeter = greeter
        self.shots: list[Shot] = []
        self.in_flight: set[Shot] = set()
        self.signalled = math.inf
        self.draining = math.inf  # "grpc: stopping" seen on stderr (the drain began before)
        self.exited = math.inf

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        async with (
            asyncio.timeout(PATIENCE),
            grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=GRPC_OPTIONS) as channel,
        ):
            stub = self.greeter.pb2_grpc.GreeterStub(channel)
            clients = [asyncio.create_task(self._client(stub, n)) for n in range(CLIENTS)]
            await asyncio.sleep(0.5)
            # Signal at an instant when every RPC begun has reached its handler
            # (its first reply is in), so "begun before the signal" means "in
            # flight at the server". Nothing else runs between check and kill.
            while any(shot.first == math.inf for shot in self.in_flight):  # noqa: ASYNC110
                await asyncio.sleep(0.0005)  # (many tasks, no one event to await)
            assert len(self.in_flight) == CLIENTS
            self.signalled = self.child.send(signal.SIGTERM)
            while self.child.proc.poll() is None:
                if self.draining == math.inf and "grpc: stopping" in self.child.stderr:
                    self.draining = time.perf_counter()
                await asyncio.sleep(0.001)
            self.exited = time.perf_counter()
            await asyncio.gather(*clients)

    async def _client(self, stub: Any, number: int) -> None:
        await asyncio.sleep(number * COUNT * INTERVAL_MS / 1000 / CLIENTS)  # spread the starts
        request = self.greeter.pb2.HelloStreamRequest(
            name=str(number), count=COUNT, interval_ms=INTERVAL_MS
        )
        while True:
            shot = Shot(number, time.perf_counter())
            self.in_flight.add(shot)
            try:
                async for _ in stub.SayHelloStream(request, timeout=CALL_TIMEOUT):
                    shot.first = min(shot.first, time.perf_counter())
                    shot.replies += 1
                shot.outcome = "OK"
            except grpc.aio.AioRpcError as error:
                shot.outcome = error.code().name
            shot.done = time.perf_counter()
            self.in_flight.discard(shot)
            self.shots.append(shot)
            if shot.outcome != "OK" and shot.started > self.signalled:
                return  # refused after the signal: this client is done


async def test_sigterm_under_load_finishes_in_flight_and_refuses_new(
    spawn: Spawn, tmp_path: Path, greeter: Greeter
) -> None:
    """SIGTERM amid 32 streaming RPCs: all begun before it finish OK, later ones get UNAVAILABLE."""
    config = _config(tmp_path, drain=3.0, shutdown=5.0)
    port = free_port()
    child = await trio.to_thread.run_sync(lambda: _spawn_greeter(spawn, port, config))
    load = Load(child, port, greeter)
    with trio.fail_after(15):
        await trio.to_thread.run_sync(load.run)
    code = await trio.to_thread.run_sync(child.wait)
    assert code == 0, child.report()
    # In flight is ≈ 200 ms; the bound is the drain timeout (3 s), not a speed.
    assert load.exited - load.signalled < 3.0, child.report()
    assert "grpc: cut" not in child.stderr, child.report()
    assert load.signalled < load.draining < load.exited, child.report()

    before = [shot for shot in load.shots if shot.started < load.signalled]
    assert len(before) >= 2 * CLIENTS  # the first waves, and the one in flight at the signal
    assert [s for s in before if (s.outcome, s.replies) != ("OK", COUNT)] == []
    assert sum(shot.done > load.signalled for shot in before) == CLIENTS  # drained, not cut
    refused = [s for s in load.shots if s.started > load.signalled and s.outcome != "OK"]
    assert sorted(shot.client for shot in refused) == list(range(CLIENTS))
    late = [shot for shot in load.shots if shot.started > load.draining]
    assert late
    assert [shot for shot in late if shot.outcome != "UNAVAILABLE"] == []


def test_stream_longer_than_the_drain_ends_with_a_status(
    spawn: Spawn, tmp_path: Path, greeter: Greeter
) -> None:
    """A 10 s stream at SIGTERM (drain 1 s) ends with an error status; exit 0 before shutdown."""
    config = _config(tmp_path, drain=1.0, shutdown=3.0)
    port = free_port()
    child = _spawn_greeter(spawn, port, config)
    request = greeter.pb2.HelloStreamRequest(name="long", count=100, interval_ms=100)
    with grpc_channel(port) as channel:
        call = greeter.pb2_grpc.GreeterStub(channel).SayHelloStream(request, timeout=8.0)
        replies = [next(call)]  # the handler runs
        sent = child.send(signal.SIGTERM)
        error = _rpc_error(lambda: replies.extend(call))
        ended = time.perf_counter()
    # It ended with a status of its own, not by the client's deadline (8 s).
    assert error.code() != grpc.StatusCode.DEADLINE_EXCEEDED, child.report()
    assert len(replies) < 100
    # It ends at the drain deadline, not before: the drain waits for work in flight.
    assert 1.0 <= ended - sent < 3.0, child.report()
    assert child.wait(timeout=3.0) == 0, child.report()  # a cut is a warning, not a failure
    assert time.perf_counter() - sent < 3.0, child.report()
    assert "grpc: cut (drain timeout 1 s)" in _events(child), child.report()
