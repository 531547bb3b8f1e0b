"""``grpc.health.v1`` and server reflection, read by grpcio's own clients.

Health reads the supervisor's one health state: SERVING only while the
service serves, NOT_SERVING while it warms up or from the moment shutdown
begins. Reflection answers ``v1alpha`` and ``v1`` with descriptors a
``descriptor_pool`` can load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import trio
from dependency_injector import providers
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from helpers import (
    BOUND,
    ECHO,
    Container,
    grpc_channel,
    in_thread,
    port,
    rpc_error,
    start,
    write_toml,
)
from mikros_trio import Service
from mikros_trio.testing import ServiceStarter

HEALTH = "grpc.health.v1.Health"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

#: Every service the server lists, sorted.
LISTED = sorted(
    [
        ECHO,
        HEALTH,
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
)


def check(port: int, service: str) -> Any:
    """One health Check on a fresh grpcio channel (blocking)."""
    with grpc_channel(port) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=BOUND)


# -- health --------------------------------------------------------------------


async def test_check_is_serving_for_the_server_and_each_service(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Check answers SERVING for "" (the whole server) and for the user service by name."""
    running = await start(mikros_service, tmp_path)
    for name in ("", ECHO):
        assert (await in_thread(check, port(running), name)).status == SERVING, name


async def test_check_unknown_service_is_not_found(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Check for a service the server does not have fails NOT_FOUND (the health spec's answer)."""
    running = await start(mikros_service, tmp_path)
    error = await in_thread(lambda: rpc_error(lambda: check(port(running), "no.such.Service")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no.such.Service" in error.details()
    # The server answers the next call as usual.
    assert (await in_thread(check, port(running), "")).status == SERVING


async def test_watch_sees_not_serving_when_shutdown_begins_then_ends(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Watch streams SERVING, then NOT_SERVING at the trigger, then ends with a status: no hang."""
    running = await start(
        mikros_service, tmp_path, lifecycle={"readiness_delay": 0.5, "drain_timeout": 2.0}
    )
    first = trio.Event()
    seen: list[int] = []

    def watch(port: int) -> grpc.StatusCode:
        with grpc_channel(port) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            responses = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=BOUND)
            for response in responses:
                seen.append(response.status)
                if len(seen) == 1:
                    trio.from_thread.run_sync(first.set)
            code: grpc.StatusCode = responses.code()
            return code

    async with trio.open_nursery() as nursery:
        codes: list[grpc.StatusCode] = []

        async def watcher() -> None:
            codes.append(await in_thread(watch, port(running)))

        nursery.start_soon(watcher)
        with trio.fail_after(BOUND):
            await first.wait()
        running.service.stop("test")
        # Inside the readiness delay the server still answers, and says so.
        assert (await in_thread(check, port(running), ECHO)).status == NOT_SERVING
        assert running.health.components["grpc"].value == "serving"
    assert seen == [SERVING, NOT_SERVING]
    assert codes == [grpc.StatusCode.OK]
    with trio.fail_after(BOUND):
        assert await running.wait() == 0
    assert "cut" not in running.phases("grpc")


async def test_watch_unknown_service_streams_service_unknown(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Watch for an unknown service streams SERVICE_UNKNOWN (it may be added later, per spec)."""
    running = await start(mikros_service, tmp_path)

    def watch_first(port: int) -> int:
        with grpc_channel(port) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            responses = stub.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=BOUND)
            status: int = next(responses).status
            responses.cancel()
            return status

    assert await in_thread(watch_first, port(running)) == SERVICE_UNKNOWN


class Gate:
    """A processing component whose warmup blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.waiting = trio.Event()
        self.opened = trio.Event()

    async def warmup(self) -> None:
        self.waiting.set()
        await self.opened.wait()


class GatedContainer(Container):
    gate = providers.Singleton(Gate)


async def test_check_is_not_serving_while_warming_up(tmp_path: Path) -> None:
    """During warmup the gRPC server is bound and answers NOT_SERVING; SERVING once ready."""
    service = Service(
        GatedContainer, write_toml(tmp_path), environ={**os.environ, "MIKROS_GRPC_PORT": "0"}
    )
    with trio.fail_after(3 * BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run)
            try:
                gate = service.container.gate()
                await gate.waiting.wait()
                bound = service.supervisor.addresses["grpc"][1]
                assert (await in_thread(check, bound, "")).status == NOT_SERVING
                assert (await in_thread(check, bound, ECHO)).status == NOT_SERVING
                assert not service.health.ready
                gate.opened.set()
                version = service.health.version
                while not service.health.ready:
                    version = await service.health.wait_changed(version)
                assert (await in_thread(check, bound, ECHO)).status == SERVING
            finally:
                service.stop("test over")
    assert service.exit_code == 0


# -- reflection ----------------------------------------------------------------


def reflect(
    port: int, requests: list[reflection_pb2.ServerReflectionRequest], version: str = "v1alpha"
) -> list[reflection_pb2.ServerReflectionResponse]:
    """Send ``requests`` on one ServerReflectionInfo stream of ``version``; all the answers.

    ``v1`` is called with the ``v1alpha`` messages: the two versions differ
    only in their package, not on the wire.
    """
    with grpc_channel(port) as channel:
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(info(iter(requests), timeout=BOUND))


async def test_reflection_lists_services_on_v1alpha_and_v1(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """list_services names the user service, Health and both reflection versions, on both."""
    running = await start(mikros_service, tmp_path)
    request = reflection_pb2.ServerReflectionRequest(host="h", list_services="")
    for version in ("v1alpha", "v1"):
        [answer] = await in_thread(reflect, port(running), [request], version)
        assert answer.valid_host == "h"
        assert answer.original_request == request
        assert sorted(s.name for s in answer.list_services_response.service) == LISTED, version


async def test_reflection_descriptors_load_into_a_pool(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """grpcio-reflection's client database feeds a DescriptorPool: services, messages, deps."""
    running = await start(mikros_service, tmp_path)

    def load(port: int) -> dict[str, Any]:
        with grpc_channel(port) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(database)
            listed = sorted(database.get_services())
            echo = pool.FindServiceByName(ECHO)
            request = pool.FindMessageTypeByName("mikros.testsvc.v1.EchoRequest")
            health = pool.FindServiceByName(HEALTH)
            return {
                "listed": listed,
                "methods": [(m.name, m.client_streaming, m.server_streaming) for m in echo.methods],
                "file": echo.file.name,
                "dependencies": [d.name for d in echo.file.dependencies],
                "sent": request.fields_by_name["sent"].message_type.full_name,
                "health": [m.name for m in health.methods],
            }

    found = await in_thread(load, port(running))
    assert found["listed"] == LISTED
    assert found["methods"] == [
        ("Unary", False, False),
        ("ServerStream", False, True),
        ("ClientStream", True, False),
        ("Bidi", True, True),
    ]
    assert found["file"] == "testsvc.proto"
    assert found["dependencies"] == ["google/protobuf/timestamp.proto"]
    assert found["sent"] == "google.protobuf.Timestamp"
    assert found["health"] == ["Check", "Watch"]


async def test_reflection_file_requests_and_not_found(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """One v1 stream answers each request in turn; unknown names get error_response NOT_FOUND."""
    running = await start(mikros_service, tmp_path)
    Request = reflection_pb2.ServerReflectionRequest
    requests = [
        Request(file_containing_symbol=ECHO),
        Request(file_containing_symbol="mikros.testsvc.v1.Echo.Bidi"),
        Request(file_by_filename="google/protobuf/timestamp.proto"),
        Request(file_containing_symbol="no.such.Symbol"),
        Request(file_by_filename="nope.proto"),
        Request(file_containing_symbol=HEALTH),
    ]
    answers = await in_thread(reflect, port(running), requests, "v1")
    assert len(answers) == len(requests)

    def files(answer: Any) -> list[str]:
        assert answer.WhichOneof("message_response") == "file_descriptor_response"
        names = []
        for raw in answer.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            names.append(proto.name)
        return names

    assert files(answers[0]) == ["testsvc.proto", "google/protobuf/timestamp.proto"]
    assert files(answers[1])[0] == "testsvc.proto"
    assert files(answers[2]) == ["google/protobuf/timestamp.proto"]
    for answer in answers[3:5]:
        assert answer.WhichOneof("message_response") == "error_response"
        assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert files(answers[5]) == ["grpc/health/v1/health.proto"]
