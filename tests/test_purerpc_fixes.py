"""The server's HTTP/2 policing, sans-io: PING enforcement and the reset budget, on Trio's clock.

A real h2 client connection writes the frames; the server's protocol state
(``_ServerConnection``) reads them with no socket, and the autojump clock
moves time, so the grpc-go rules (min time between pings, strikes,
forgiveness after a write; resets per second) are pinned without sleeping.
"""

from __future__ import annotations

import h2.config
import h2.connection
import pytest
import trio
from hyperframe.frame import RstStreamFrame, WindowUpdateFrame
from purerpc.grpclib.config import GRPCConfiguration

from mikros_trio._purerpc_fixes import _Abuse, _ClientConnection, _ServerConnection
from mikros_trio._runtime_settings import GrpcSettings


def pair(**settings: object) -> tuple[h2.connection.H2Connection, _ServerConnection]:
    """A client h2 connection and the server's protocol state, past the preface."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server = _ServerConnection(GRPCConfiguration(client_side=False), GrpcSettings(**settings))  # type: ignore[arg-type]
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


def ping(client: h2.connection.H2Connection, server: _ServerConnection) -> None:
    client.ping(b"pingpong")
    server.receive_data(client.data_to_send())


async def test_pings_closer_than_keepalive_min_time_are_struck_out(
    autojump_clock: trio.abc.Clock,
) -> None:
    """With a call in flight: pings 300 s apart are fine; the third strike (pings 1 s apart) is
    abuse."""
    client, server = pair()
    server.rpc_started()
    server.wrote = False
    for _ in range(3):
        ping(client, server)
        await trio.sleep(300)
    for _ in range(3):  # 301 s after the last, then strikes 1 and 2: tolerated
        await trio.sleep(1)
        ping(client, server)
    await trio.sleep(1)
    with pytest.raises(_Abuse, match="too_many_pings"):
        ping(client, server)


async def test_a_response_written_forgives_the_pings(autojump_clock: trio.abc.Clock) -> None:
    """grpcio pings as responses stream in: after each write, a ping is never a strike."""
    client, server = pair()
    server.rpc_started()
    for _ in range(10):
        server.wrote = True  # a response message went out
        await trio.sleep(0.1)
        ping(client, server)


async def test_pings_on_an_idle_connection_need_permission(
    autojump_clock: trio.abc.Clock,
) -> None:
    """No call in flight: pings every minute are strikes, unless keepalive_permit_without_calls."""
    client, server = pair(max_ping_strikes=0)
    ping(client, server)
    await trio.sleep(60)
    with pytest.raises(_Abuse):
        ping(client, server)
    client, server = pair(max_ping_strikes=0, keepalive_permit_without_calls=True)
    for _ in range(3):
        ping(client, server)
        await trio.sleep(301)


def open_and_reset(client: h2.connection.H2Connection, stream: int) -> None:
    """Open ``stream`` with a gRPC request's headers, then reset it (one unit of the budget)."""
    client.send_headers(
        stream,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/a/b"),
            (":authority", "t"),
            ("content-type", "application/grpc"),
        ],
    )
    client.reset_stream(stream)


async def test_resets_over_the_budget_per_second_are_abuse(autojump_clock: trio.abc.Clock) -> None:
    """max_resets_per_second 5: five resets a second, second after second, are fine; six in one
    second cut the client off."""
    client, server = pair(max_resets_per_second=5)
    stream = 1
    for _ in range(3):
        for _ in range(5):
            open_and_reset(client, stream)
            server.receive_data(client.data_to_send())
            stream += 2
        await trio.sleep(1)
    for n in range(6):
        open_and_reset(client, stream)
        stream += 2
        if n < 5:
            server.receive_data(client.data_to_send())
    with pytest.raises(_Abuse, match="too_many_resets"):
        server.receive_data(client.data_to_send())


def test_client_ignores_frames_on_a_stream_h2_forgot() -> None:
    """A server's RST_STREAM after its trailers (grpcio and grpc-go send one), or a late
    WINDOW_UPDATE, arriving once the client opened another stream (h2 then forgets the
    ended one) is ignored, not a connection error that ends every call."""
    client = _ClientConnection(GRPCConfiguration(client_side=True))
    client.initiate_connection()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    request = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/mikros.testsvc.v1.Echo/Unary"),
        (":authority", "test"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    client.h2_connection.send_headers(1, request, end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    server.send_headers(1, [("grpc-status", "0")], end_stream=True)
    client.receive_data(server.data_to_send())
    client.h2_connection.send_headers(3, request, end_stream=True)  # h2 forgets stream 1
    server.receive_data(client.data_to_send())
    late = RstStreamFrame(1, error_code=0).serialize()
    late += WindowUpdateFrame(1, window_increment=5).serialize()
    assert client.receive_data(late) == []
    assert client.data_to_send() == b""  # no GOAWAY, no RST_STREAM
