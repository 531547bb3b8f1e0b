"""The gRPC kind's graceful drain, in-process over real sockets, with grpcio clients.

In-flight RPCs finish (requests still streaming in are read to their end),
streams in flight end with a status, new connections are refused and new
RPCs fail UNAVAILABLE once draining begins, idle connections do not hold
the stop up, and what outlives drain_timeout is cut at the deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import trio
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame, RstStreamFrame

from helpers import (
    BOUND,
    UNARY,
    EchoRequest,
    RawClient,
    grpc_channel,
    grpc_frame,
    in_thread,
    phase_time,
    port,
    rpc_error,
    start,
    unary,
)
from mikros_trio.testing import RunningService, ServiceStarter
from protos import testsvc_pb2_grpc


async def wait_draining(running: RunningService) -> None:
    """Return once the gRPC server has begun draining, bounded."""
    health = running.health
    with trio.fail_after(BOUND):
        version = health.version
        while health.components["grpc"].value != "draining":
            version = await health.wait_changed(version)
    await trio.sleep(0.05)  # the drain task runs right after the state change


def stop_took(running: RunningService) -> float:
    """Seconds (Trio time) from the shutdown trigger to the service stopped."""
    return phase_time(running, "service", "stopped") - phase_time(running, "service", "shutdown")


async def test_in_flight_unary_finishes_and_new_calls_are_unavailable(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A 0.5 s call in flight at stop answers OK; new connections and new calls get UNAVAILABLE."""
    running = await start(mikros_service, tmp_path)
    servicer = running.container.echo()
    replies: list[Any] = []
    with grpc_channel(port(running)) as channel:
        stub = testsvc_pb2_grpc.EchoStub(channel)
        async with trio.open_nursery() as nursery:

            async def in_flight() -> None:
                request = EchoRequest(text="slow", delay=0.5)
                replies.append(await in_thread(stub.Unary, request, timeout=BOUND))

            nursery.start_soon(in_flight)
            with trio.fail_after(BOUND):
                await servicer.entered.wait()
            running.service.stop("test")
            await wait_draining(running)
            fresh = await in_thread(
                lambda: rpc_error(lambda: unary(port(running), EchoRequest(), timeout=1.0))
            )
            same = await in_thread(
                lambda: rpc_error(lambda: stub.Unary(EchoRequest(), timeout=1.0))
            )
            assert not replies, "the in-flight call is still running"
        assert fresh.code() == grpc.StatusCode.UNAVAILABLE
        assert same.code() == grpc.StatusCode.UNAVAILABLE
    assert replies[0].text == "slow"
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    assert running.phases("grpc") == ["starting", "started", "stopping", "stopped"]
    assert servicer.finished == 1


async def test_in_flight_client_stream_is_read_to_its_end(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Requests still streaming in after the GOAWAY are all read, and the call answers OK."""
    running = await start(mikros_service, tmp_path)
    sent_one = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def requests() -> Iterator[Any]:
        for index in range(6):
            yield EchoRequest(text=str(index))
            if index == 0:
                trio.from_thread.run_sync(sent_one.set, trio_token=token)
            time.sleep(0.1)

    def call(port: int) -> Any:
        with grpc_channel(port) as channel:
            return testsvc_pb2_grpc.EchoStub(channel).ClientStream(requests(), timeout=BOUND)

    replies: list[Any] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            replies.append(await in_thread(call, port(running)))

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await sent_one.wait()
        running.service.stop("test")
    assert (replies[0].text, replies[0].index) == ("0,1,2,3,4,5", 6)
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    assert "cut" not in running.phases("grpc")


async def test_server_stream_within_the_drain_ends_ok(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A server stream in flight at stop sends every item, then OK; the stop waits for it only."""
    running = await start(mikros_service, tmp_path)
    servicer = running.container.echo()

    def call(port: int) -> tuple[list[int], grpc.StatusCode]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            responses = stub.ServerStream(EchoRequest(count=5, delay=0.1), timeout=BOUND)
            items = [r.index for r in responses]
            return items, responses.code()

    results: list[tuple[list[int], grpc.StatusCode]] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            results.append(await in_thread(call, port(running)))

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await servicer.entered.wait()
        running.service.stop("test")
    assert results == [([0, 1, 2, 3, 4], grpc.StatusCode.OK)]
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    assert "cut" not in running.phases("grpc")
    assert stop_took(running) < 1.0


async def test_server_stream_longer_than_the_drain_is_cut_with_a_status(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A server stream outliving drain_timeout is cut at the deadline: items, then an error."""
    running = await start(mikros_service, tmp_path, lifecycle={"drain_timeout": 0.5})
    servicer = running.container.echo()
    items: list[int] = []

    def call(port: int) -> grpc.RpcError:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            responses = stub.ServerStream(EchoRequest(count=1000, delay=0.05), timeout=BOUND)
            return rpc_error(lambda: items.extend(r.index for r in responses))

    errors: list[grpc.RpcError] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            errors.append(await in_thread(call, port(running)))

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await servicer.entered.wait()
        running.service.stop("test")
        with trio.fail_after(BOUND):
            assert await running.wait() == 0
    assert errors[0].code() == grpc.StatusCode.UNAVAILABLE
    assert 5 < len(items) < 1000
    assert items == list(range(len(items)))
    cut = [str(e) for e in running.events if e.component == "grpc" and e.phase == "cut"]
    assert len(cut) == 1
    assert cut[0].endswith("grpc: cut (drain timeout 0.5 s)")


async def test_idle_channels_do_not_delay_stop(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Ten connected, idle grpcio channels are closed at once: stop is far under drain_timeout."""
    running = await start(mikros_service, tmp_path, lifecycle={"drain_timeout": 5.0})
    with grpc_channel(port(running)) as c0, grpc_channel(port(running)) as c1:
        channels = [c0, c1]
        # Eight more, each its own connection (distinct channel arguments, no subchannel sharing).
        more = [
            grpc.insecure_channel(
                f"127.0.0.1:{port(running)}",
                options=[("grpc.enable_http_proxy", 0), ("test.channel", i)],
            )
            for i in range(8)
        ]
        try:
            channels += more

            def connect_all() -> list[str]:
                return [
                    testsvc_pb2_grpc.EchoStub(c).Unary(EchoRequest(text=str(i)), timeout=BOUND).text
                    for i, c in enumerate(channels)
                ]

            assert await in_thread(connect_all) == [str(i) for i in range(10)]
            running.service.stop("test")
            with trio.fail_after(BOUND):
                assert await running.wait() == 0
            took = stop_took(running)
            assert took < 1.0, f"stop took {took:.3f} s with idle channels open"
            assert "cut" not in running.phases("grpc")

            def call_again() -> grpc.StatusCode:
                stub = testsvc_pb2_grpc.EchoStub(channels[0])
                code: grpc.StatusCode = rpc_error(
                    lambda: stub.Unary(EchoRequest(), timeout=1.0)
                ).code()
                return code

            assert await in_thread(call_again) == grpc.StatusCode.UNAVAILABLE
        finally:
            for channel in more:
                channel.close()


# -- on the wire -----------------------------------------------------------------


async def test_wire_order_goaway_then_response_then_eof(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """On the wire: GOAWAY(any stream) and a PING at stop, GOAWAY(last stream 1) once the PING
    goes unanswered for 1 s, then the response and trailers, EOF."""
    delay = 0.3
    running = await start(mikros_service, tmp_path)
    servicer = running.container.echo()
    body = grpc_frame(EchoRequest(text="wire", delay=delay).SerializeToString())
    async with await trio.open_tcp_stream("127.0.0.1", port(running)) as stream:
        client = RawClient(stream)
        await stream.send_all(client.PREFACE + client.request(1, UNARY, body))
        with trio.fail_after(BOUND):
            await servicer.entered.wait()
        running.service.stop("test")
        await client.until_eof()
    seen = client.frames
    goaways = [i for i, f in enumerate(seen) if isinstance(f, GoAwayFrame)]
    assert [(seen[i].error_code, seen[i].last_stream_id) for i in goaways] == [  # type: ignore[attr-defined]
        (0, 2**31 - 1),
        (0, 1),
    ]
    assert isinstance(seen[goaways[0] + 1], PingFrame)
    after = [f for f in seen[goaways[0] :] if f.stream_id == 1]
    assert any(isinstance(f, DataFrame) and f.data for f in after), "no response message"
    assert client.ended(1)
    assert client.headers[1][-1]["grpc-status"] == "0"
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    assert stop_took(running) < 1.0 + 0.5  # the unanswered PING's bound, then close


async def test_streams_opened_after_goaway_are_refused_not_run(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A stream opened above the final GOAWAY's last stream id is reset REFUSED_STREAM, never run;
    one opened between the first GOAWAY and the final one is served."""
    delay = 1.5  # in flight past the final GOAWAY (1 s: the raw client never answers PINGs)
    running = await start(mikros_service, tmp_path)
    servicer = running.container.echo()
    body = grpc_frame(EchoRequest(text="first", delay=delay).SerializeToString())
    late = grpc_frame(EchoRequest(text="late").SerializeToString())
    async with await trio.open_tcp_stream("127.0.0.1", port(running)) as stream:
        client = RawClient(stream)
        await stream.send_all(client.PREFACE + client.request(1, UNARY, body))
        with trio.fail_after(BOUND):
            await servicer.entered.wait()
        running.service.stop("test")
        while not any(isinstance(f, GoAwayFrame) for f in client.frames):
            await client.receive()
        await stream.send_all(client.request(3, UNARY, late))  # between the two GOAWAYs
        while not [f for f in client.frames if isinstance(f, GoAwayFrame) and f.last_stream_id < 9]:
            await client.receive()
        await stream.send_all(client.request(5, UNARY, late))  # after the final GOAWAY
        await client.until_eof()
    final = [f for f in client.frames if isinstance(f, GoAwayFrame)][-1]
    assert isinstance(final, GoAwayFrame)
    assert final.last_stream_id == 3
    resets = [f for f in client.frames if isinstance(f, RstStreamFrame) and f.stream_id == 5]
    assert [f.error_code for f in resets] == [7]  # REFUSED_STREAM
    assert not any(isinstance(f, DataFrame) and f.stream_id == 5 for f in client.frames)
    assert client.headers[1][-1]["grpc-status"] == "0"
    assert client.headers[3][-1]["grpc-status"] == "0"


async def test_a_connection_h2_has_closed_does_not_stop_the_drain(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A connection whose client sent GOAWAY (h2 then sends nothing more, PINGs included) gets
    no drain PING; the drain goes on to the other connections and the service exits 0."""
    running = await start(mikros_service, tmp_path)
    servicer = running.container.echo()
    body = grpc_frame(EchoRequest(text="busy", delay=0.3).SerializeToString())
    async with (
        await trio.open_tcp_stream("127.0.0.1", port(running)) as leaving,
        await trio.open_tcp_stream("127.0.0.1", port(running)) as busy,
    ):
        gone = RawClient(leaving)
        await leaving.send_all(gone.PREFACE + GoAwayFrame(0, last_stream_id=0).serialize())
        client = RawClient(busy)
        await busy.send_all(client.PREFACE + client.request(1, UNARY, body))
        with trio.fail_after(BOUND):
            await servicer.entered.wait()
        running.service.stop("test")
        await client.until_eof()
        with trio.fail_after(BOUND):
            assert await running.wait() == 0
    assert client.headers[1][-1]["grpc-status"] == "0"
    finals = [f.last_stream_id for f in client.frames if isinstance(f, GoAwayFrame)]
    assert finals == [2**31 - 1, 1]
    assert not [f for f in gone.frames if isinstance(f, PingFrame)]


async def test_a_call_reset_in_the_read_that_opened_it_never_runs(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A unary request and the client's RST_STREAM of it arriving in one read: its handler
    never runs (nor answers), though the request's events are read without checkpoints; the
    connection's next call is served."""
    running = await start(mikros_service, tmp_path)
    servicer = running.container.echo()
    body = grpc_frame(EchoRequest(text="gone").SerializeToString())
    after = grpc_frame(EchoRequest(text="after").SerializeToString())
    async with await trio.open_tcp_stream("127.0.0.1", port(running)) as stream:
        client = RawClient(stream)
        reset = RstStreamFrame(1, error_code=0x8).serialize()  # CANCEL
        await stream.send_all(client.PREFACE + client.request(1, UNARY, body) + reset)
        await stream.send_all(client.request(3, UNARY, after))
        assert (await client.trailers(3))["grpc-status"] == "0"
    assert servicer.finished == 1  # the call after, only
    assert not any(isinstance(f, DataFrame) and f.stream_id == 1 for f in client.frames)


async def test_client_cancelled_streams_cancel_their_handlers(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Streams the client cancelled mid-way (RST_STREAM) cancel their handlers at once."""
    running = await start(mikros_service, tmp_path, lifecycle={"drain_timeout": 3.0})
    servicer = running.container.echo()
    cancelled = trio.Event()
    stopped = threading.Event()
    token = trio.lowlevel.current_trio_token()

    def cancelled_calls(port: int) -> list[grpc.StatusCode]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)

            def requests() -> Iterator[Any]:
                yield EchoRequest(text="first")
                stopped.wait(BOUND)  # never ends its requests: the client cancels instead

            bidi = stub.Bidi(requests(), timeout=BOUND)
            assert next(bidi).text == "FIRST"
            bidi.cancel()
            gathered = stub.ClientStream.future(requests(), timeout=BOUND)
            time.sleep(0.1)  # the handler read the first request and waits for more
            gathered.cancel()
            assert stub.Unary(EchoRequest(text="x"), timeout=BOUND).text == "x"
            trio.from_thread.run_sync(cancelled.set, trio_token=token)
            # The connection stays open until the service has stopped.
            stopped.wait(2 * BOUND)
            return [bidi.code(), gathered.code()]

    async with trio.open_nursery() as nursery:
        codes: list[list[grpc.StatusCode]] = []

        async def client() -> None:
            codes.append(await in_thread(cancelled_calls, port(running)))

        nursery.start_soon(client)
        with trio.fail_after(BOUND):
            await cancelled.wait()
        # The resets cancel both handlers (the channel, and its connection, stay open).
        with trio.fail_after(BOUND):
            await servicer.idle.wait()
        running.service.stop("test")
        try:
            with trio.fail_after(BOUND):
                assert await running.wait() == 0
        finally:
            stopped.set()
    assert codes == [[grpc.StatusCode.CANCELLED, grpc.StatusCode.CANCELLED]]
    assert "cut" not in running.phases("grpc")
    assert stop_took(running) < 1.0
    assert servicer.finished == 1  # the unary call; the cancelled handlers were cancelled
