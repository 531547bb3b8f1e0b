"""The gRPC kind's errors on the wire: status codes, Mikros JSON details, a server that survives."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

import mikros_trio.grpc
from helpers import (
    BOUND,
    SERVICE_ERRORS,
    ClientContainer,
    Container,
    EchoRequest,
    grpc_channel,
    in_thread,
    phase_time,
    port,
    rpc_error,
    start,
    unary,
    write_toml,
)
from mikros_trio import ErrorKind, InternalError, NotFoundError
from mikros_trio.ext import Call, Observer
from mikros_trio.testing import RunningService, ServiceStarter
from protos import testsvc_grpc, testsvc_pb2_grpc


async def failed_unary(port: int, request: Any) -> grpc.RpcError:
    """The error a grpcio Unary call with ``request`` gets."""
    return await in_thread(lambda: rpc_error(lambda: unary(port, request)))


async def test_unexpected_exception_is_internal_with_mikros_json(
    mikros_service: ServiceStarter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler raising RuntimeError answers UNKNOWN, InternalError JSON details; it is logged."""
    running = await start(mikros_service, tmp_path)
    with caplog.at_level(logging.ERROR, logger="mikros_trio.grpc"):
        error = await failed_unary(port(running), EchoRequest(fail="runtime"))
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert json.loads(error.details()) == {
        "code": 0,
        "kind": "InternalError",
        "message": "internal error",
        "details": "RuntimeError: the handler broke",
        "cause": "RuntimeError: the handler broke",
        "service_name": "echo",
    }
    # Only errors: the start's info lines ("listening") are records too.
    logged = [
        r for r in caplog.records if r.name == "mikros_trio.grpc" and r.levelno >= logging.ERROR
    ]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert logged[0].exc_info[0] is RuntimeError
    assert "mikros.testsvc.v1.Echo/Unary" in logged[0].getMessage()


async def start_mapped(mikros_service: ServiceStarter, tmp_path: Path) -> RunningService:
    """The echo service with ``[features.errors] grpc_status = "mapped"``."""
    path = write_toml(tmp_path)
    path.write_text(path.read_text() + '[features.errors]\ngrpc_status = "mapped"\n')
    with trio.fail_after(BOUND):
        return await mikros_service.start(Container, path)


@pytest.mark.parametrize("mapped", [False, True], ids=["unknown", "mapped"])
@pytest.mark.parametrize("kind", sorted(SERVICE_ERRORS))
async def test_service_errors_map_to_their_status(
    mikros_service: ServiceStarter, tmp_path: Path, kind: str, mapped: bool
) -> None:
    """Each ServiceError subclass answers UNKNOWN (default) or its mapped code, with its JSON."""
    if mapped:
        running = await start_mapped(mikros_service, tmp_path)
    else:
        running = await start(mikros_service, tmp_path)
    cls, code = SERVICE_ERRORS[kind]
    error = await failed_unary(port(running), EchoRequest(fail=kind))
    assert error.code() == (code if mapped else grpc.StatusCode.UNKNOWN)
    assert json.loads(error.details()) == {
        "code": 7,
        "kind": cls.kind.value,
        "message": f"raised {kind}",
        "service_name": "echo",
    }


async def test_errors_in_streaming_calls(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """A server stream fails after its items, client and bidi streams mid-way: each a status."""
    running = await start(mikros_service, tmp_path)

    def calls(port: int) -> dict[str, Any]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            items: list[int] = []

            def server_stream() -> None:
                request = EchoRequest(count=2, fail="not-found")
                items.extend(r.index for r in stub.ServerStream(request, timeout=BOUND))

            streamed = rpc_error(server_stream)
            requests = [EchoRequest(text="a"), EchoRequest(fail="validation"), EchoRequest()]
            gathered = rpc_error(lambda: stub.ClientStream(iter(requests), timeout=BOUND))
            bidi = rpc_error(lambda: list(stub.Bidi(iter(requests), timeout=BOUND)))
            after = stub.Unary(EchoRequest(text="after"), timeout=BOUND)
            return {
                "items": items,
                "streamed": (streamed.code(), json.loads(streamed.details())["kind"]),
                "gathered": (gathered.code(), json.loads(gathered.details())["kind"]),
                "bidi": (bidi.code(), json.loads(bidi.details())["kind"]),
                "after": after.text,
            }

    found = await in_thread(calls, port(running))
    assert found == {
        "items": [0, 1],
        "streamed": (grpc.StatusCode.UNKNOWN, "NotFoundError"),
        "gathered": (grpc.StatusCode.UNKNOWN, "ValidationError"),
        "bidi": (grpc.StatusCode.UNKNOWN, "ValidationError"),
        "after": "after",
    }


async def test_purerpc_status_error_keeps_its_status(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A handler raising purerpc's own status error (ABORTED) answers exactly that status."""
    running = await start(mikros_service, tmp_path)
    error = await failed_unary(port(running), EchoRequest(fail="status"))
    assert error.code() == grpc.StatusCode.ABORTED
    assert error.details() == "a status of the handler's choosing"


async def test_unknown_method_and_service_are_unimplemented(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A method or service the server does not have answers UNIMPLEMENTED, naming it."""
    running = await start(mikros_service, tmp_path)

    def call(port: int, path: str) -> grpc.RpcError:
        with grpc_channel(port) as channel:
            method = channel.unary_unary(path)
            return rpc_error(lambda: method(b"", timeout=BOUND))

    for path in ("/mikros.testsvc.v1.Echo/Nope", "/no.such.Service/Unary"):
        error = await in_thread(call, port(running), path)
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED, path
        assert path.lstrip("/") in error.details()


async def test_a_thousand_faulting_calls_leave_the_service_serving(
    mikros_service: ServiceStarter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1 000 failing calls in a row (100 at a time, one channel) change nothing; then one works."""
    running = await start(mikros_service, tmp_path)
    kinds = ["runtime", "validation", "status", "not-found"]

    def calls(port: int) -> tuple[dict[grpc.StatusCode, int], str]:
        codes: dict[grpc.StatusCode, int] = {}
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            for batch in range(10):
                pending = [
                    stub.Unary.future(EchoRequest(fail=kinds[(batch + i) % 4]), timeout=BOUND)
                    for i in range(100)
                ]
                for call in pending:
                    code = call.exception().code()
                    codes[code] = codes.get(code, 0) + 1
            return codes, stub.Unary(EchoRequest(text="still here"), timeout=BOUND).text

    with caplog.at_level(logging.CRITICAL, logger="mikros_trio.grpc"):
        codes, text = await in_thread(calls, port(running))
    assert codes == {grpc.StatusCode.UNKNOWN: 750, grpc.StatusCode.ABORTED: 250}
    assert text == "still here"
    assert running.health.ready
    assert running.health.components["grpc"].value == "serving"


async def test_a_cancelled_call_leaves_the_connection_working(
    mikros_service: ServiceStarter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A call past its deadline (the client resets the stream) is cancelled alone: others go on."""
    running = await start(mikros_service, tmp_path)
    servicer = running.container.echo()

    def calls(port: int) -> tuple[grpc.StatusCode, str, str]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            late = stub.Unary.future(EchoRequest(text="late", delay=0.6), timeout=0.2)
            slow = stub.Unary.future(EchoRequest(text="slow", delay=0.8), timeout=BOUND)
            code = late.exception().code()
            return code, slow.result().text, stub.Unary(EchoRequest(text="next")).text

    with caplog.at_level(logging.WARNING, logger="mikros_trio.grpc"):
        late, slow, after = await in_thread(calls, port(running))
    assert late == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (slow, after) == ("slow", "next")
    assert servicer.finished == 2, "the late call's handler was cancelled with its stream"
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "mikros_trio.grpc" and r.levelno >= logging.WARNING
    ]
    assert warnings == []


async def test_cancellation_is_never_swallowed(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A handler blocked forever is cancelled at the drain deadline: 'grpc: cut', client errors."""
    running = await start(mikros_service, tmp_path, lifecycle={"drain_timeout": 0.5})
    servicer = running.container.echo()
    codes: list[grpc.StatusCode] = []
    async with trio.open_nursery() as nursery:

        async def in_flight() -> None:
            error = await failed_unary(port(running), EchoRequest(fail="forever"))
            codes.append(error.code())

        nursery.start_soon(in_flight)
        with trio.fail_after(BOUND):
            await servicer.entered.wait()
        running.service.stop("test")
        with trio.fail_after(BOUND):
            assert await running.wait() == 0
    assert servicer.cancelled == 1
    cut = [str(e) for e in running.events if e.component == "grpc" and e.phase == "cut"]
    assert len(cut) == 1
    assert cut[0].endswith("grpc: cut (drain timeout 0.5 s)")
    stopping = phase_time(running, "grpc", "stopping")
    assert phase_time(running, "grpc", "cut") == pytest.approx(stopping + 0.5, abs=0.2)
    assert codes == [grpc.StatusCode.UNAVAILABLE]


class ClientCalls(Observer):
    """Records the client side's finished calls: (status, failed, error kind)."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, bool, ErrorKind | None]] = []

    def finished(self, call: Call) -> None:
        if call.side == "client":
            self.ended.append((call.status, call.failed, call.error_kind))


async def test_our_client_records_the_kind_a_status_carries(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """UNKNOWN carrying a NotFoundError is the caller's fault, an InternalError the server's."""
    (tmp_path / "target").mkdir()
    target = await start(mikros_service, tmp_path / "target")
    caller = await start(
        mikros_service, tmp_path, container=ClientContainer, clients={"peer": port(target)}
    )
    calls = ClientCalls()
    caller.service.telemetry.add_observer(calls)
    stub = testsvc_grpc.EchoStub(caller.container.peer())
    for fail, cls in (("not-found", NotFoundError), ("internal", InternalError)):
        with trio.fail_after(BOUND), pytest.raises(cls):
            await mikros_trio.grpc.call(stub.Unary, EchoRequest(fail=fail), destination="peer")
    assert calls.ended == [
        ("UNKNOWN", False, ErrorKind.NOT_FOUND),
        ("UNKNOWN", True, ErrorKind.INTERNAL),
    ]
