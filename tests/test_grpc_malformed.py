"""Malformed input on raw sockets: only the offending connection (or call) suffers.

Each test keeps a grpcio client busy on another connection while the bad
bytes arrive, and checks the server still serves afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from hyperframe.frame import DataFrame, GoAwayFrame, RstStreamFrame, WindowUpdateFrame

from helpers import (
    BOUND,
    ECHO,
    UNARY,
    EchoRequest,
    RawClient,
    grpc_channel,
    grpc_frame,
    in_thread,
    port,
    rpc_error,
    start,
    unary,
)
from mikros_trio.testing import RunningService, ServiceStarter
from protos import testsvc_pb2_grpc


class Neighbour:
    """The replies a well-behaved grpcio client got while the test ran."""

    def __init__(self) -> None:
        self.replies: list[str] = []
        self._changed = trio.Event()

    def add(self, text: str) -> None:
        self.replies.append(text)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        """Return once ``count`` replies have come, bounded."""
        with trio.fail_after(BOUND):
            while len(self.replies) < count:
                await self._changed.wait()


@asynccontextmanager
async def busy_neighbour(running: RunningService) -> AsyncIterator[Neighbour]:
    """A grpcio client calling in a loop on its own connection while the test runs.

    On exit it makes one last call and checks that every call succeeded.
    """
    neighbour = Neighbour()
    stop = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def loop(port: int) -> None:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            index = 0
            while not trio.from_thread.run_sync(stop.is_set, trio_token=token):
                reply = stub.Unary(EchoRequest(text=str(index), delay=0.01), timeout=BOUND)
                trio.from_thread.run_sync(neighbour.add, reply.text, trio_token=token)
                index += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, loop, port(running))
        await neighbour.wait_for(1)
        try:
            yield neighbour
        finally:
            stop.set()
    assert neighbour.replies == [str(i) for i in range(len(neighbour.replies))]
    assert (await in_thread(unary, port(running), EchoRequest(text="after"))).text == "after"
    assert running.health.ready


async def raw_connection(running: RunningService) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port(running))


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + b"\xff" * 64,
        b"\x00" * 4096,
    ],
    ids=["http1", "bad-preface", "zeros"],
)
async def test_garbage_instead_of_http2_drops_only_that_connection(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    garbage: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bytes that are not HTTP/2 end that connection (EOF); the neighbour's calls go on."""
    running = await start(mikros_service, tmp_path)
    with caplog.at_level(logging.DEBUG, logger="mikros_trio.grpc"):
        async with busy_neighbour(running) as neighbour:
            before = len(neighbour.replies)
            async with await raw_connection(running) as stream:
                client = RawClient(stream)
                await stream.send_all(garbage)
                await client.until_eof()
            await neighbour.wait_for(before + 3)
    ours = [r for r in caplog.records if r.name == "mikros_trio.grpc"]
    assert [r for r in ours if r.levelno >= logging.WARNING] == [], "not the server's fault"


async def test_truncated_message_is_answered_and_the_connection_lives(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A length prefix longer than its data, then END_STREAM: INTERNAL; the connection lives."""
    running = await start(mikros_service, tmp_path)
    async with busy_neighbour(running), await raw_connection(running) as stream:
        client = RawClient(stream)
        truncated = grpc_frame(b"\x0a\x02hi", length=100)
        await stream.send_all(client.PREFACE + client.request(1, UNARY, truncated))
        trailers = await client.trailers(1)
        assert trailers["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
        assert "malformed" in trailers["grpc-message"]
        whole = grpc_frame(EchoRequest(text="whole").SerializeToString())
        await stream.send_all(client.request(3, UNARY, whole))
        assert (await client.trailers(3))["grpc-status"] == "0"


async def test_request_without_a_message_is_answered(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A unary request whose stream ends with no message at all gets INTERNAL, not silence."""
    running = await start(mikros_service, tmp_path)
    async with await raw_connection(running) as stream:
        client = RawClient(stream)
        await stream.send_all(client.PREFACE + client.request(1, UNARY, b""))
        trailers = await client.trailers(1)
    assert trailers["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])


async def test_request_of_headers_only_is_a_request_with_no_messages(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """HEADERS carrying END_STREAM: a unary call gets INTERNAL, a client stream of zero items OK."""
    running = await start(mikros_service, tmp_path)
    async with busy_neighbour(running), await raw_connection(running) as stream:
        client = RawClient(stream)
        await stream.send_all(client.PREFACE + client.request(1, UNARY, None))
        trailers = await client.trailers(1)
        assert trailers["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
        await stream.send_all(client.request(3, f"/{ECHO}/ClientStream", None))
        assert (await client.trailers(3))["grpc-status"] == "0"


async def test_request_with_bad_headers_resets_only_its_stream(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A request that is not gRPC (content-type, path) is reset; the connection goes on."""
    running = await start(mikros_service, tmp_path)
    whole = grpc_frame(EchoRequest(text="ok").SerializeToString())
    async with busy_neighbour(running), await raw_connection(running) as stream:
        client = RawClient(stream)
        await stream.send_all(
            client.PREFACE
            + client.request(1, UNARY, whole, content_type="text/plain")
            + client.request(3, "/not/a/grpc/path", whole)
            + client.request(5, UNARY, whole)
        )
        assert (await client.trailers(5))["grpc-status"] == "0"
        while {1, 3} - {f.stream_id for f in client.frames if isinstance(f, RstStreamFrame)}:
            await client.receive()
        resets = [f for f in client.frames if isinstance(f, RstStreamFrame)]
        assert {(f.stream_id, f.error_code) for f in resets} == {(1, 1), (3, 1)}  # PROTOCOL_ERROR


async def test_message_over_max_message_size_is_resource_exhausted(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Over [runtime.grpc] max_message_size: that call fails, a call beside it on the same
    connection and the neighbour's calls do not."""
    running = await start(mikros_service, tmp_path, grpc={"max_message_size": 1024})
    servicer = running.container.echo()

    def calls(port: int) -> tuple[grpc.RpcError, Any, Any]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            beside = stub.Unary.future(EchoRequest(text="beside", delay=0.5), timeout=BOUND)
            deadline = time.monotonic() + BOUND
            while not servicer.entered.is_set() and time.monotonic() < deadline:
                time.sleep(0.005)  # the slow call is in flight here before the big one goes
            big = rpc_error(lambda: stub.Unary(EchoRequest(payload=b"x" * 4096), timeout=BOUND))
            small = stub.Unary(EchoRequest(payload=b"x" * 512), timeout=BOUND)
            return big, beside.result(), small

    async with busy_neighbour(running):
        big, beside, small = await in_thread(calls, port(running))
    assert big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1024" in big.details()
    assert beside.text == "beside"
    assert small.size == 512


async def test_oversized_message_on_a_raw_stream(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A raw request declaring 1 MiB against a 1 KiB limit is refused; the connection lives."""
    running = await start(mikros_service, tmp_path, grpc={"max_message_size": 1024})
    async with busy_neighbour(running), await raw_connection(running) as stream:
        client = RawClient(stream)
        huge = grpc_frame(b"\x00" * 1000, length=1024 * 1024)
        await stream.send_all(client.PREFACE + client.request(1, UNARY, huge, end_stream=False))
        trailers = await client.trailers(1)
        assert trailers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        # The client goes on sending on the refused stream: ignored, nothing breaks.
        await stream.send_all(DataFrame(1, b"\x00" * 500, flags=["END_STREAM"]).serialize())
        await stream.send_all(client.request(3, UNARY, grpc_frame(b"")))
        assert (await client.trailers(3))["grpc-status"] == "0"


async def test_window_update_and_reset_on_a_stream_h2_forgot_are_ignored(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """WINDOW_UPDATE and RST_STREAM on a stream the server has answered, arriving after the
    next call's HEADERS (h2 forgets closed streams when one opens), are ignored: no GOAWAY,
    the next calls on the connection are answered."""
    running = await start(mikros_service, tmp_path)
    body = grpc_frame(EchoRequest(text="x").SerializeToString())
    async with busy_neighbour(running), await raw_connection(running) as stream:
        client = RawClient(stream)
        await stream.send_all(client.PREFACE + client.request(1, UNARY, body))
        assert (await client.trailers(1))["grpc-status"] == "0"
        # grpcio's window update for the response's DATA crossed the trailers on the
        # wire, behind another call it had started meanwhile.
        await stream.send_all(
            client.request(3, UNARY, body)
            + WindowUpdateFrame(1, window_increment=5).serialize()
            + RstStreamFrame(1, error_code=0x8).serialize()
        )
        assert (await client.trailers(3))["grpc-status"] == "0"
        await stream.send_all(client.request(5, UNARY, body))
        assert (await client.trailers(5))["grpc-status"] == "0"
    assert not [f for f in client.frames if isinstance(f, GoAwayFrame)]
