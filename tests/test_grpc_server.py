"""The gRPC kind, in-process over real sockets: interop with grpcio both ways.

grpcio's C-core client calls every cardinality on our server, and our
:class:`~mikros_trio.grpc.ClientChannel` (through a generated purerpc stub)
calls a grpcio server. Also the shared support of every ``test_grpc_*``
module: the test servicer and container, service.toml writing, and grpcio
helpers. Every service starts through ``mikros_service`` (real lifecycle,
ephemeral ports on 127.0.0.1); every wait is bounded, grpcio calls carry
their own timeouts, and every grpcio channel and server is closed.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import trio
from dependency_injector import providers
from hpack import Decoder, Encoder
from hyperframe.frame import DataFrame, Frame, HeadersFrame, SettingsFrame
from purerpc.grpclib.exceptions import AbortedError

import mikros_trio.grpc
from helpers import parse_frames
from mikros_trio import (
    ConditionError,
    ConfigError,
    InternalError,
    NotFoundError,
    PermissionDeniedError,
    ServiceContainer,
    ServiceError,
    ValidationError,
)
from mikros_trio._definition import parse_definition
from mikros_trio._runtime_settings import GrpcSettings
from mikros_trio.testing import RunningService, ServiceStarter
from protos import testsvc_grpc, testsvc_pb2, testsvc_pb2_grpc

T = TypeVar("T")

#: No single wait in these tests may take longer than this (seconds).
BOUND = 5.0

#: grpcio channel options: never route 127.0.0.1 through a proxy from the environment.
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]

EchoRequest = testsvc_pb2.EchoRequest
EchoReply = testsvc_pb2.EchoReply

#: The user service's full name, as reflection and health list it.
ECHO = "mikros.testsvc.v1.Echo"

#: The HTTP/2 path of its Unary method.
UNARY = f"/{ECHO}/Unary"

#: ``EchoRequest.fail`` values that raise a ServiceError, with the gRPC code each must map to.
SERVICE_ERRORS: dict[str, tuple[type[ServiceError], grpc.StatusCode]] = {
    "validation": (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    "not-found": (NotFoundError, grpc.StatusCode.NOT_FOUND),
    "permission": (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    "condition": (ConditionError, grpc.StatusCode.FAILED_PRECONDITION),
    "internal": (InternalError, grpc.StatusCode.INTERNAL),
}


def _toml_value(value: Any) -> str:
    return json.dumps(str(value) if isinstance(value, Path) else value)


def _table(name: str, values: Mapping[str, Any]) -> list[str]:
    return ["", f"[{name}]", *(f"{key} = {_toml_value(v)}" for key, v in values.items())]


def write_toml(
    tmp_path: Path,
    *,
    grpc: Mapping[str, Any] | None = None,
    lifecycle: Mapping[str, Any] | None = None,
    clients: Mapping[str, int | tuple[str, int]] | None = None,
) -> Path:
    """A service.toml for a grpc service on 127.0.0.1, written into ``tmp_path``.

    ``clients`` maps client names to ports on 127.0.0.1, or to (host, port).
    """
    timeouts = {"start_timeout": 5.0, "drain_timeout": 3.0, "shutdown_timeout": 8.0}
    timeouts.update(lifecycle or {})
    lines = ['name = "echo"', 'types = ["grpc"]', 'version = "1.0.0"']
    lines += _table("runtime.grpc", {"host": "127.0.0.1", **(grpc or {})})
    lines += _table("lifecycle", timeouts)
    for name, target in (clients or {}).items():
        host, port = target if isinstance(target, tuple) else ("127.0.0.1", target)
        lines += _table(f"clients.{name}", {"host": host, "port": port})
    path = tmp_path / "service.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class EchoServicer(testsvc_grpc.EchoServicer):  # type: ignore[misc]  # generated, untyped
    """The test servicer: echoes, and behaves as ``EchoRequest`` asks.

    ``delay`` sleeps before answering (before each item when streaming);
    ``count`` is how many items ServerStream sends; ``fail`` raises (after
    the items, when streaming): a ``SERVICE_ERRORS`` key, ``"runtime"``
    (RuntimeError), ``"status"`` (purerpc's own ABORTED status error) or
    ``"forever"`` (blocks until cancelled). ``entered`` is set when a
    handler starts sleeping; ``finished`` counts handlers that ran to their
    end; ``cancelled`` counts handlers cancelled while blocked; ``active``
    counts handlers running now, and ``idle`` is set when it drops to 0.
    """

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.finished = 0
        self.cancelled = 0
        self.active = 0
        self.idle = trio.Event()

    @contextmanager
    def _running(self) -> Iterator[None]:
        self.active += 1
        self.idle = trio.Event()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    async def _fail(self, request: Any) -> None:
        if request.fail == "runtime":
            raise RuntimeError("the handler broke")
        if request.fail == "status":
            raise AbortedError("a status of the handler's choosing")
        if request.fail == "forever":
            self.entered.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled += 1
                raise
        if request.fail:
            cls, _ = SERVICE_ERRORS[request.fail]
            raise cls(f"raised {request.fail}", code=7)

    async def _delay(self, request: Any) -> None:
        if request.delay > 0:
            self.entered.set()
            await trio.sleep(request.delay)

    async def Unary(self, request: Any) -> Any:
        with self._running():
            await self._fail(request)
            await self._delay(request)
            self.finished += 1
            return EchoReply(text=request.text, size=len(request.payload))

    async def ServerStream(self, request: Any) -> AsyncIterator[Any]:
        # ``count`` items, ``delay`` apart; then ``fail``, if any.
        with self._running():
            for index in range(request.count):
                await self._delay(request)
                yield EchoReply(text=request.text, index=index)
            await self._fail(request)
            self.finished += 1

    async def ClientStream(self, requests: AsyncIterator[Any]) -> Any:
        with self._running():
            texts: list[str] = []
            size = 0
            async for request in requests:
                await self._fail(request)
                await self._delay(request)
                texts.append(request.text)
                size += len(request.payload)
            self.finished += 1
            return EchoReply(text=",".join(texts), index=len(texts), size=size)

    async def Bidi(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        with self._running():
            index = 0
            async for request in requests:
                await self._fail(request)
                await self._delay(request)
                yield EchoReply(text=request.text.upper(), index=index)
                index += 1
            self.finished += 1


class Container(ServiceContainer):
    echo = providers.Singleton(EchoServicer)


class ClientContainer(Container):
    """The echo service plus a channel to ``[clients.peer]``."""

    peer = mikros_trio.grpc.client("peer")


async def start(mikros_service: ServiceStarter, tmp_path: Path, **options: Any) -> RunningService:
    """Start :class:`Container` (or ``container=``) with a service.toml from ``options``."""
    overrides = options.pop("overrides", None)
    container = options.pop("container", Container)
    path = write_toml(tmp_path, **options)
    with trio.fail_after(BOUND):
        return await mikros_service.start(container, path, overrides=overrides)


def port(running: RunningService) -> int:
    """The port the service's gRPC server listens on."""
    return running.ports["grpc"]


def phase_time(running: RunningService, component: str, phase: str) -> float:
    """Trio time of the first event where ``component`` reached ``phase``."""
    for event in running.events:
        if event.component == component and event.phase == phase:
            return event.time
    raise AssertionError(f"{component} never reached {phase}: {running.events}")


@contextmanager
def grpc_channel(target: int | str) -> Iterator[grpc.Channel]:
    """A grpcio channel to 127.0.0.1:``target`` (a port) or to ``target``; closed on exit."""
    address = f"127.0.0.1:{target}" if isinstance(target, int) else target
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        yield channel


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking grpcio code in a worker thread, bounded.

    The thread is never abandoned: every grpcio call made there carries a
    timeout below :data:`BOUND`, so it returns on its own.
    """
    with trio.fail_after(2 * BOUND):
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def unary(port: int, request: Any, timeout: float = BOUND) -> Any:
    """One grpcio Unary call on a fresh channel (blocking; run it :func:`in_thread`)."""
    with grpc_channel(port) as channel:
        return testsvc_pb2_grpc.EchoStub(channel).Unary(request, timeout=timeout)


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    """The grpc.RpcError that ``fn()`` raises (fails the test if it returns)."""
    try:
        fn()
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded")


class RawClient:
    """A hand-driven HTTP/2 client on a raw socket, for what grpcio would never send.

    Frames are built with hyperframe and read back without a client state
    machine, so a test sees exactly what the server wrote, in order.
    """

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.frames: list[Frame] = []
        #: Decoded header blocks by stream id, in order (headers, then trailers).
        self.headers: dict[int, list[dict[str, str]]] = {}
        self.eof = False
        self._encoder = Encoder()
        self._decoder = Decoder()
        self._buffer = b""

    def request(
        self,
        stream_id: int,
        path: str,
        body: bytes | None,
        *,
        end_stream: bool = True,
        content_type: str = "application/grpc",
    ) -> bytes:
        """HEADERS and DATA frames of one gRPC request carrying ``body`` (framed already).

        ``body=None`` sends the HEADERS alone, ending the stream there.
        """
        block = self._encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "t"),
                ("content-type", content_type),
                ("te", "trailers"),
            ]
        )
        if body is None:
            return HeadersFrame(stream_id, block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        flags = ["END_STREAM"] if end_stream else []
        return (
            HeadersFrame(stream_id, block, flags=["END_HEADERS"]).serialize()
            + DataFrame(stream_id, body, flags=flags).serialize()
        )

    async def receive(self) -> None:
        """Read what the server sent next (bounded); parse every complete frame."""
        with trio.fail_after(BOUND):
            data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
            return
        frames, self._buffer = parse_frames(self._buffer + data)
        for frame in frames:
            self.frames.append(frame)
            if isinstance(frame, HeadersFrame):
                decoded = {str(k): str(v) for k, v in self._decoder.decode(frame.data)}
                self.headers.setdefault(frame.stream_id, []).append(decoded)

    def ended(self, stream_id: int) -> bool:
        return any(
            isinstance(f, HeadersFrame | DataFrame)
            and f.stream_id == stream_id
            and "END_STREAM" in f.flags
            for f in self.frames
        )

    async def trailers(self, stream_id: int) -> dict[str, str]:
        """The trailers that end ``stream_id`` (fails if the connection ends first)."""
        while not self.ended(stream_id):
            assert not self.eof, f"the connection ended before stream {stream_id} did"
            await self.receive()
        return self.headers[stream_id][-1]

    async def until_eof(self) -> None:
        """Read until the server closes the connection (bounded)."""
        while not self.eof:
            await self.receive()


def grpc_message(body: bytes, length: int | None = None) -> bytes:
    """One length-prefixed gRPC message; ``length`` overrides the declared length."""
    return b"\x00" + (len(body) if length is None else length).to_bytes(4, "big") + body


# -- grpcio client → our server ------------------------------------------------


async def test_grpcio_client_calls_every_cardinality(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """grpcio's C-core client gets unary, server-, client- and bidi-streaming answers."""
    running = await start(mikros_service, tmp_path)

    def calls(port: int) -> tuple[Any, list[Any], Any, list[Any]]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            one = stub.Unary(EchoRequest(text="hi", payload=b"abc"), timeout=BOUND)
            streamed = list(stub.ServerStream(EchoRequest(text="s", count=3), timeout=BOUND))
            requests = [EchoRequest(text=t, payload=b"x" * 10) for t in "abc"]
            gathered = stub.ClientStream(iter(requests), timeout=BOUND)
            bidi = list(stub.Bidi(iter(requests), timeout=BOUND))
            return one, streamed, gathered, bidi

    one, streamed, gathered, bidi = await in_thread(calls, port(running))
    assert (one.text, one.size) == ("hi", 3)
    assert [(r.text, r.index) for r in streamed] == [("s", 0), ("s", 1), ("s", 2)]
    assert (gathered.text, gathered.index, gathered.size) == ("a,b,c", 3, 30)
    assert [(r.text, r.index) for r in bidi] == [("A", 0), ("B", 1), ("C", 2)]
    assert running.container.echo().finished == 4


async def test_grpcio_client_empty_streams_and_large_messages(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Empty client/bidi streams and zero-item server streams end OK; 3 MiB messages pass."""
    running = await start(mikros_service, tmp_path)
    big = b"\x5a" * (3 * 1024 * 1024)

    def calls(port: int) -> tuple[Any, list[Any], list[Any], Any, Any]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            nothing = stub.ClientStream(iter([]), timeout=BOUND)
            no_items = list(stub.ServerStream(EchoRequest(count=0), timeout=BOUND))
            no_bidi = list(stub.Bidi(iter([]), timeout=BOUND))
            large = stub.Unary(EchoRequest(payload=big), timeout=BOUND)
            many = stub.ClientStream(iter([EchoRequest(payload=big)] * 3), timeout=BOUND)
            return nothing, no_items, no_bidi, large, many

    nothing, no_items, no_bidi, large, many = await in_thread(calls, port(running))
    assert (nothing.text, nothing.index) == ("", 0)
    assert no_items == []
    assert no_bidi == []
    assert large.size == len(big)
    assert (many.index, many.size) == (3, 3 * len(big))


async def test_grpcio_concurrent_calls_share_one_connection(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Fifty concurrent unary calls (futures) on one grpcio channel all answer, in any order."""
    running = await start(mikros_service, tmp_path)

    def calls(port: int) -> list[str]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            pending = [
                stub.Unary.future(EchoRequest(text=str(i), delay=0.05), timeout=BOUND)
                for i in range(50)
            ]
            return [call.result().text for call in pending]

    texts = await in_thread(calls, port(running))
    assert texts == [str(i) for i in range(50)]


async def test_grpcio_metadata_and_deadline(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """Metadata is accepted; a call past its deadline gets DEADLINE_EXCEEDED; the next works."""
    running = await start(mikros_service, tmp_path)

    def calls(port: int) -> tuple[Any, grpc.RpcError, Any]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            tagged = stub.Unary(
                EchoRequest(text="m"), metadata=[("x-request-id", "42")], timeout=BOUND
            )
            late = rpc_error(lambda: stub.Unary(EchoRequest(text="slow", delay=1.0), timeout=0.2))
            after = stub.Unary(EchoRequest(text="after"), timeout=BOUND)
            return tagged, late, after

    tagged, late, after = await in_thread(calls, port(running))
    assert tagged.text == "m"
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert after.text == "after"


# -- our ClientChannel → a grpcio server ---------------------------------------


class GrpcioEcho(testsvc_pb2_grpc.EchoServicer):  # type: ignore[misc]  # generated, untyped
    """The same echo behaviour, served by grpcio (handlers run in its thread pool)."""

    def __init__(self) -> None:
        self.entered = threading.Event()

    def Unary(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.fail:
            context.abort(grpc.StatusCode.NOT_FOUND, f"grpcio says {request.fail}")
        if request.delay > 0:
            self.entered.set()
            time.sleep(request.delay)
        return EchoReply(text=request.text, size=len(request.payload))

    def ServerStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        for index in range(request.count):
            yield EchoReply(text=request.text, index=index)

    def ClientStream(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        texts = [request.text for request in requests]
        return EchoReply(text=",".join(texts), index=len(texts))

    def Bidi(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for index, request in enumerate(requests):
            yield EchoReply(text=request.text.upper(), index=index)


class GrpcioPeer:
    """A running grpcio server: its port, its servicer, and the server itself."""

    def __init__(self, port: int, servicer: GrpcioEcho, server: grpc.Server) -> None:
        self.port = port
        self.servicer = servicer
        self.server = server


@asynccontextmanager
async def grpcio_peer(port: int = 0) -> AsyncIterator[GrpcioPeer]:
    """A grpcio server with :class:`GrpcioEcho` on 127.0.0.1, stopped on exit."""
    executor = futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.server(executor)
    servicer = GrpcioEcho()
    testsvc_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, f"grpcio could not bind 127.0.0.1:{port}"
    server.start()
    try:
        yield GrpcioPeer(bound, servicer, server)
    finally:
        await in_thread(lambda: server.stop(None).wait(BOUND))
        await in_thread(executor.shutdown)


@asynccontextmanager
async def grpcio_server(port: int = 0) -> AsyncIterator[int]:
    """A grpcio server with :class:`GrpcioEcho` on 127.0.0.1; yields its port, stops on exit."""
    async with grpcio_peer(port) as peer:
        yield peer.port


async def agen(items: list[Any], delay: float = 0.0) -> AsyncIterator[Any]:
    """The ``items`` as an async iterator (a client stream), ``delay`` seconds apart."""
    for item in items:
        yield item
        if delay:
            await trio.sleep(delay)


async def test_client_channel_calls_a_grpcio_server(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A purerpc stub over client("peer") calls every cardinality on a grpcio server."""
    async with grpcio_server() as peer_port:
        running = await start(
            mikros_service, tmp_path, container=ClientContainer, clients={"peer": peer_port}
        )
        stub = testsvc_grpc.EchoStub(running.container.peer())
        with trio.fail_after(BOUND):
            one = await stub.Unary(EchoRequest(text="hi", payload=b"abcd"))
            streamed = [r async for r in stub.ServerStream(EchoRequest(text="s", count=4))]
            requests = [EchoRequest(text=t) for t in "xyz"]
            gathered = await stub.ClientStream(agen(requests, delay=0.01))
            bidi = [r async for r in stub.Bidi(agen(requests))]
            big = await stub.Unary(EchoRequest(payload=b"q" * (2 * 1024 * 1024)))
        assert (one.text, one.size) == ("hi", 4)
        assert [r.index for r in streamed] == [0, 1, 2, 3]
        assert (gathered.text, gathered.index) == ("x,y,z", 3)
        assert [r.text for r in bidi] == ["X", "Y", "Z"]
        assert big.size == 2 * 1024 * 1024
        with trio.fail_after(BOUND):
            assert await running.stop() == 0


async def test_client_channel_concurrent_calls_and_grpcio_status(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Twenty concurrent calls share the channel; a grpcio abort arrives as purerpc's error."""
    from purerpc.grpclib.exceptions import NotFoundError as PurerpcNotFound

    async with grpcio_server() as peer_port:
        running = await start(
            mikros_service, tmp_path, container=ClientContainer, clients={"peer": peer_port}
        )
        stub = testsvc_grpc.EchoStub(running.container.peer())
        texts: dict[int, str] = {}

        async def one(i: int) -> None:
            texts[i] = (await stub.Unary(EchoRequest(text=str(i)))).text

        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
            try:
                await stub.Unary(EchoRequest(fail="gone"))
            except PurerpcNotFound as error:
                status = error.status
            else:
                raise AssertionError("the aborted call succeeded")
            after = await stub.Unary(EchoRequest(text="after"))
        assert texts == {i: str(i) for i in range(20)}
        assert status.status_message == "grpcio says gone"
        assert after.text == "after"
        with trio.fail_after(BOUND):
            assert await running.stop() == 0


# -- [runtime.grpc] limits are validated before anything starts -----------------------


def test_connection_limits_out_of_bounds_are_config_errors() -> None:
    """Zero streams, a negative keepalive, a 1e12 s idle limit: one ConfigError naming each key."""
    toml = "\n".join(
        [
            'name = "echo"',
            'types = ["grpc"]',
            'version = "1.0.0"',
            "[runtime.grpc]",
            "max_concurrent_streams = 0",
            "keepalive_time = -1.0",
            "max_connection_idle = 1e12",
        ]
    )
    with pytest.raises(ConfigError) as caught:
        parse_definition(toml)
    paths = [issue.path for issue in caught.value.issues]
    assert paths == [
        "runtime.grpc.max_concurrent_streams",
        "runtime.grpc.keepalive_time",
        "runtime.grpc.max_connection_idle",
    ]


def test_connection_limits_have_their_documented_defaults() -> None:
    """The defaults the README states: 100 streams, 16 MiB per connection, 5 min idle…"""
    settings = GrpcSettings()
    assert (settings.max_concurrent_streams, settings.max_connection_buffer) == (100, 16 << 20)
    assert (settings.max_connection_idle, settings.max_connection_age) == (300.0, None)
    assert (settings.keepalive_time, settings.keepalive_timeout) == (120.0, 20.0)
    assert (settings.keepalive_min_time, settings.max_ping_strikes) == (300.0, 2)
    assert (settings.max_resets_per_second, settings.send_stall_timeout) == (200, 30.0)
