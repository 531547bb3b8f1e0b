"""``mikros_trio.grpc.client``: a ClientChannel that fails fast, reconnects, and never hangs.

The channel lives in a real service (``[clients.peer]`` in its
service.toml) and calls, through a generated purerpc stub, either a grpcio
server in this process or another mikros_trio service.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from dependency_injector import providers
from hyperframe.frame import GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame
from purerpc.grpclib.exceptions import RpcFailedError
from purerpc.grpclib.status import Status, StatusCode

import mikros_trio.grpc
from helpers import (
    BOUND,
    ClientContainer,
    EchoRequest,
    EchoServicer,
    free_port,
    grpcio_peer,
    grpcio_server,
    in_thread,
    port,
    rpc_error,
    start,
    unary,
    write_toml,
)
from mikros_trio import NotFoundError, RPCError, Service, ServiceContainer
from mikros_trio.grpc import ClientChannel
from mikros_trio.testing import RunningService, ServiceStarter
from protos import testsvc_grpc


async def start_client(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    peer_port: int,
    host: str = "127.0.0.1",
    **options: Any,
) -> RunningService:
    """Start the echo service with ``[clients.peer]`` on ``host``:``peer_port``."""
    directory = tmp_path / f"client-{peer_port}"
    directory.mkdir()
    clients = {"peer": (host, peer_port)}
    return await start(
        mikros_service, directory, container=ClientContainer, clients=clients, **options
    )


def peer(running: RunningService, connect_timeout: float = 0.5) -> tuple[ClientChannel, Any]:
    """The service's channel to ``peer`` (with a short connect timeout) and a stub over it."""
    channel: ClientChannel = running.container.peer()
    channel.connect_timeout = connect_timeout
    return channel, testsvc_grpc.EchoStub(channel)


async def test_call_while_the_target_is_down_fails_fast_then_reconnects(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Target down: RPCError naming the client within connect_timeout; once it is up, calls work."""
    peer_port = free_port()
    running = await start_client(mikros_service, tmp_path, peer_port)
    assert running.health.ready, "a service starts while its peers are down"
    _, stub = peer(running)
    for _ in range(2):
        started = trio.current_time()
        with trio.fail_after(BOUND), pytest.raises(RPCError) as caught:
            await stub.Unary(EchoRequest(text="hi"))
        assert trio.current_time() - started < 0.5 + 0.2
        assert caught.value.destination == "peer"
        assert f"client 'peer': 127.0.0.1:{peer_port} is unavailable" in str(caught.value)
    async with grpcio_server(peer_port):
        with trio.fail_after(BOUND):
            assert (await stub.Unary(EchoRequest(text="up"))).text == "up"


async def test_call_to_an_unroutable_address_is_bounded_by_connect_timeout(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A peer that never answers the TCP handshake fails with RPCError at connect_timeout."""
    # TEST-NET-1 (RFC 5737): either unreachable at once, or silently dropped until the timeout.
    running = await start_client(mikros_service, tmp_path, 9, host="192.0.2.1")
    _, stub = peer(running, connect_timeout=0.3)
    started = trio.current_time()
    with trio.fail_after(BOUND), pytest.raises(RPCError) as caught:
        await stub.Unary(EchoRequest())
    assert trio.current_time() - started < 0.3 + 0.2
    assert "client 'peer': 192.0.2.1:9 is unavailable" in str(caught.value)


async def test_reconnects_after_the_server_restarts_while_idle(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """The grpcio peer stops (GOAWAY, close) while the channel is idle: the next call reconnects."""
    peer_port = free_port()
    async with grpcio_server(peer_port):
        running = await start_client(mikros_service, tmp_path, peer_port)
        _, stub = peer(running)
        with trio.fail_after(BOUND):
            assert (await stub.Unary(EchoRequest(text="one"))).text == "one"
    await trio.sleep(0.1)  # the channel notices the closed connection
    async with grpcio_server(peer_port):
        with trio.fail_after(BOUND):
            assert (await stub.Unary(EchoRequest(text="two"))).text == "two"
    assert running.health.ready
    with trio.fail_after(BOUND):
        assert await running.stop() == 0
    assert running.service.supervisor.failures == []


async def test_reconnects_after_a_mikros_peer_drains(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A mikros_trio peer drains (GOAWAY) while idle, another starts on its port: calls go on."""
    (tmp_path / "a").mkdir()
    target = await start(mikros_service, tmp_path / "a")
    peer_port = port(target)
    running = await start_client(mikros_service, tmp_path, peer_port)
    _, stub = peer(running)
    with trio.fail_after(BOUND):
        assert (await stub.Unary(EchoRequest(text="one"))).text == "one"
        assert await target.stop() == 0
    with trio.fail_after(BOUND), pytest.raises(RPCError):
        await stub.Unary(EchoRequest(text="nobody"))
    async with grpcio_server(peer_port):
        with trio.fail_after(BOUND):
            assert (await stub.Unary(EchoRequest(text="two"))).text == "two"
    with trio.fail_after(BOUND):
        assert await running.stop() == 0
    assert running.service.supervisor.failures == []


async def test_call_in_flight_when_the_peer_drains_gets_its_answer(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """The peer begins draining during a 0.5 s call: the call still gets its reply."""
    (tmp_path / "a").mkdir()
    target = await start(mikros_service, tmp_path / "a")
    running = await start_client(mikros_service, tmp_path, port(target))
    _, stub = peer(running)
    servicer = target.container.echo()
    replies: list[Any] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            with trio.fail_after(BOUND):
                replies.append(await stub.Unary(EchoRequest(text="slow", delay=0.5)))

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await servicer.entered.wait()
        target.service.stop("test")
    assert replies[0].text == "slow"
    with trio.fail_after(BOUND):
        assert await target.wait() == 0
    assert running.health.ready
    assert running.service.supervisor.failures == []


async def test_peer_dying_mid_stream_is_an_error_not_a_hang(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """The peer is cut mid server-stream: the caller gets an error after the items it got."""
    (tmp_path / "a").mkdir()
    target = await start(mikros_service, tmp_path / "a", lifecycle={"drain_timeout": 0.3})
    running = await start_client(mikros_service, tmp_path, port(target))
    _, stub = peer(running)
    items: list[int] = []
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            request = EchoRequest(count=1000, delay=0.02)
            with trio.fail_after(BOUND):
                try:
                    async for reply in stub.ServerStream(request):
                        items.append(reply.index)  # noqa: PERF401 - kept as they arrive
                except Exception as error:
                    errors.append(error)

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await target.container.echo().entered.wait()
        target.service.stop("test")
    [error] = errors
    assert isinstance(error, RPCError)
    assert error.destination == "peer"
    assert f"the connection to 127.0.0.1:{port(target)} ended mid-call" in str(error)
    assert 0 < len(items) < 1000
    with trio.fail_after(BOUND):
        assert await target.wait() == 0
    # The channel reconnects for the next call (to nobody: a clean RPCError).
    with trio.fail_after(BOUND), pytest.raises(RPCError):
        await stub.Unary(EchoRequest())
    assert running.health.ready
    assert running.service.supervisor.failures == []


async def test_call_in_flight_when_a_grpcio_peer_stops_gracefully(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """grpcio's graceful stop (GOAWAY, PING, GOAWAY) during a call: the call gets its reply."""
    async with grpcio_peer() as target:
        running = await start_client(mikros_service, tmp_path, target.port)
        _, stub = peer(running)
        replies: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def in_flight() -> None:
                with trio.fail_after(BOUND):
                    replies.append(await stub.Unary(EchoRequest(text="slow", delay=0.5)))

            nursery.start_soon(in_flight)
            await in_thread(target.servicer.entered.wait, BOUND)
            await in_thread(lambda: target.server.stop(grace=BOUND).wait(BOUND))
        assert replies[0].text == "slow"
        with trio.fail_after(BOUND), pytest.raises(RPCError):
            await stub.Unary(EchoRequest(text="nobody"))
    assert running.health.ready
    assert running.service.supervisor.failures == []


class RelayServicer(EchoServicer):
    """Echo, but Unary relays the request to ``peer`` and returns its answer."""

    def __init__(self, channel: ClientChannel) -> None:
        super().__init__()
        channel.connect_timeout = 0.3
        self.stub = testsvc_grpc.EchoStub(channel)

    async def Unary(self, request: Any) -> Any:
        return await self.stub.Unary(request)


class RelayContainer(ServiceContainer):
    peer = mikros_trio.grpc.client("peer")
    echo = providers.Singleton(RelayServicer, peer)


async def test_handler_relaying_to_a_dead_peer_answers_its_caller(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A handler whose peer call fails answers its own caller RPCError (UNKNOWN), never hangs."""
    running = await start(
        mikros_service, tmp_path, container=RelayContainer, clients={"peer": free_port()}
    )
    error = await in_thread(
        lambda: rpc_error(lambda: unary(port(running), EchoRequest(text="relay")))
    )
    assert error.code() == grpc.StatusCode.UNKNOWN  # [features.errors] grpc_status default
    wire = json.loads(error.details())
    assert (wire["kind"], wire["destination"]) == ("RPCError", "peer")


async def test_handler_relaying_to_a_peer_that_dies_mid_call_answers_its_caller(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """The relayed call's peer is cut mid-call: the relaying handler still answers its caller."""
    (tmp_path / "a").mkdir()
    target = await start(mikros_service, tmp_path / "a", lifecycle={"drain_timeout": 0.3})
    running = await start(
        mikros_service, tmp_path, container=RelayContainer, clients={"peer": port(target)}
    )
    codes: list[tuple[grpc.StatusCode, dict[str, Any]]] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            request = EchoRequest(fail="forever")
            error = await in_thread(lambda: rpc_error(lambda: unary(port(running), request)))
            codes.append((error.code(), json.loads(error.details())))

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await target.container.echo().entered.wait()
        target.service.stop("test")
    assert [code for code, _ in codes] == [grpc.StatusCode.UNKNOWN]
    assert [details["kind"] for _, details in codes] == ["RPCError"]
    assert running.health.ready


async def test_forced_exit_with_a_channel_is_clean(tmp_path: Path) -> None:
    """A forced exit of a service holding a client channel ends with an exit code, not a crash."""
    path = write_toml(tmp_path, clients={"peer": free_port()})
    service = Service(ClientContainer, path, environ={**os.environ, "MIKROS_GRPC_PORT": "0"})
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            service.supervisor.force()
    assert service.exit_code == 1
    assert service.supervisor.failures == []


# -- a call the server refused unprocessed is retried once, on a fresh connection ----


class RefusingProxy:
    """A TCP proxy to ``port`` whose first connection refuses the first call it sees.

    ``how`` is ``"rst"`` (RST_STREAM REFUSED_STREAM), ``"goaway"`` (GOAWAY
    naming stream 0: stream 1 was not processed) or ``"cancel"`` (RST_STREAM
    CANCEL: the server may have processed it). Later connections are piped
    to the real server. ``connections`` counts the connections made.
    """

    def __init__(self, port: int, how: str) -> None:
        self.target = port
        self.how = how
        self.connections = 0
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            if self.connections == 1:
                await self._refuse(client)
                return
            server = await trio.open_tcp_stream("127.0.0.1", self.target)
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, server)
                await self._pipe(server, client)
                nursery.cancel_scope.cancel()

    @staticmethod
    async def _pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for data in source:
                await sink.send_all(data)

    async def _refuse(self, client: trio.SocketStream) -> None:
        received = b""
        while HeadersFrame.type.to_bytes(1, "big") not in received[24 + 9 :]:
            received += await client.receive_some(65536)  # the preface, SETTINGS, HEADERS(1)
        answer = SettingsFrame(0).serialize()
        if self.how == "goaway":
            answer += GoAwayFrame(0, last_stream_id=0, error_code=0).serialize()
        else:
            code = {"rst": 7, "cancel": 8}[self.how]  # REFUSED_STREAM, CANCEL
            answer += RstStreamFrame(1, error_code=code).serialize()
        await client.send_all(answer)
        await trio.sleep_forever()  # held open: the channel must not wait on it


@pytest.mark.parametrize("how", ["rst", "goaway"])
async def test_a_refused_call_is_retried_once_on_a_fresh_connection(
    mikros_service: ServiceStarter, tmp_path: Path, how: str
) -> None:
    """Refused unprocessed (REFUSED_STREAM, or above the GOAWAY's last stream id): the call is
    sent again on a new connection and answers; the server ran it once."""
    (tmp_path / "a").mkdir()
    target = await start(mikros_service, tmp_path / "a")
    async with trio.open_nursery() as nursery:
        proxy = RefusingProxy(port(target), how)
        await nursery.start(proxy.serve)
        running = await start_client(mikros_service, tmp_path, proxy.port)
        _, stub = peer(running)
        with trio.fail_after(BOUND):
            assert (await stub.Unary(EchoRequest(text="again"))).text == "again"
            items = [r.index async for r in stub.ServerStream(EchoRequest(count=3))]
        assert items == [0, 1, 2]
        assert proxy.connections == 2
        assert target.container.echo().finished == 2
        nursery.cancel_scope.cancel()


async def test_a_call_the_server_may_have_processed_is_not_retried(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """RST_STREAM CANCEL (not a refusal): the call fails CANCELLED at once, and is not resent."""
    from purerpc.grpclib.exceptions import CancelledError

    (tmp_path / "a").mkdir()
    target = await start(mikros_service, tmp_path / "a")
    async with trio.open_nursery() as nursery:
        proxy = RefusingProxy(port(target), "cancel")
        await nursery.start(proxy.serve)
        running = await start_client(mikros_service, tmp_path, proxy.port)
        _, stub = peer(running)
        with trio.fail_after(BOUND), pytest.raises(CancelledError):
            await stub.Unary(EchoRequest(text="once"))
        assert proxy.connections == 1
        assert target.container.echo().finished == 0
        nursery.cancel_scope.cancel()


async def test_call_hands_a_fake_the_request_alone() -> None:
    """A fake stub method taking only the request works; a status it raises comes out typed."""
    seen: list[Any] = []

    async def say_hello(request: EchoRequest) -> EchoRequest:
        seen.append(request)
        return EchoRequest(text=request.text.upper())

    async def missing(request: EchoRequest) -> EchoRequest:
        wire = NotFoundError("no such user", service_name="users").to_wire()
        raise RpcFailedError(Status(StatusCode.NOT_FOUND, json.dumps(wire)))

    reply = await mikros_trio.grpc.call(say_hello, EchoRequest(text="hi"), destination="users")
    assert reply.text == "HI"
    assert [request.text for request in seen] == ["hi"]
    with pytest.raises(NotFoundError) as caught:
        await mikros_trio.grpc.call(missing, EchoRequest(), destination="users")
    assert (caught.value.message, caught.value.destination) == ("no such user", "users")


async def test_call_passes_metadata_when_given() -> None:
    """With ``metadata=``, the method gets it as stubs take it: ``metadata=`` by keyword."""
    seen: list[Any] = []

    async def say_hello(request: EchoRequest, *, metadata: Any = None) -> EchoRequest:
        seen.append(metadata)
        return request

    await mikros_trio.grpc.call(say_hello, EchoRequest(), metadata=[("x-tenant", "acme")])
    await mikros_trio.grpc.call(say_hello, EchoRequest())
    assert seen == [[("x-tenant", "acme")], None]
