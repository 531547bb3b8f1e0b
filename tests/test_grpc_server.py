"""The gRPC kind, in-process over real sockets: interop with grpcio both ways.

grpcio's C-core client calls every cardinality on our server, and our
:class:`~mikros_trio.grpc.ClientChannel` (through a generated purerpc stub)
calls a grpcio server. The test servicer and container, service.toml
writing and the grpcio helpers every ``test_grpc_*`` module shares are in
``helpers.py``. Every service starts through ``mikros_service`` (real
lifecycle, ephemeral ports on 127.0.0.1); every wait is bounded, grpcio
calls carry their own timeouts, and every grpcio channel and server is closed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from helpers import (
    BOUND,
    ClientContainer,
    EchoRequest,
    agen,
    grpc_channel,
    grpcio_server,
    in_thread,
    port,
    rpc_error,
    start,
)
from mikros_trio import ConfigError
from mikros_trio._definition import parse_definition
from mikros_trio._runtime_settings import GrpcSettings
from mikros_trio.testing import ServiceStarter
from protos import testsvc_grpc, testsvc_pb2_grpc

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
