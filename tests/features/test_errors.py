"""The errors feature and the error API: the wire shape, the policy, over HTTP and gRPC.

What Mikros Go and Rust send and read, peer by peer, is the conformance
table in ``tests/test_mikros_errors.py``. Here: our own round trip, what
``[features.errors]`` and ``MIKROS_HIDE_RESPONSE_FIELDS`` change, on real
sockets (httpx; grpcio's C-core client and our ``mikros_trio.grpc.call``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio
from dependency_injector import providers
from quart_trio import QuartTrio

import mikros_trio.grpc
from helpers import MIKROS_TRIO, Spawn
from mikros_trio import (
    ConditionError,
    ConfigError,
    CustomError,
    InternalError,
    Lifetime,
    NotFoundError,
    PermissionDeniedError,
    RPCError,
    ServiceContainer,
    ServiceError,
    ValidationError,
)
from mikros_trio._error_wire import ErrorPolicy, policy
from mikros_trio._telemetry import Telemetry
from mikros_trio.ext import BuildContext, parse_definition
from mikros_trio.features.errors import build_errors
from mikros_trio.features.settings import ErrorsSettings
from mikros_trio.testing import RunningService, ServiceStarter
from protos import testsvc_grpc, testsvc_pb2, testsvc_pb2_grpc

#: No single wait in these tests may take longer than this (seconds).
BOUND = 5.0

GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]

EchoRequest = testsvc_pb2.EchoRequest

#: Text an unexpected exception carries; must not reach callers with expose_details = false.
INTERNALS = "the database said: password authentication failed for user app"

KINDS: list[type[ServiceError]] = [
    ValidationError,
    InternalError,
    NotFoundError,
    ConditionError,
    PermissionDeniedError,
    RPCError,
    CustomError,
]


def compact(wire: dict[str, Any]) -> str:
    """JSON as Go's json.Marshal and serde_json write it: no spaces, keys in the given order."""
    return json.dumps(wire, separators=(",", ":"))


# -- the wire shape ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", KINDS, ids=lambda cls: cls.__name__)
def test_every_kind_round_trips(cls: type[ServiceError]) -> None:
    """to_wire → JSON → from_wire gives back the same kind and every field."""
    error = cls(
        "it failed",
        code=42,
        details="root cause",
        service_name="users",
        destination="billing",
        attributes={"user": 7},
    )
    back = ServiceError.from_wire(json.loads(compact(error.to_wire())))
    assert type(back) is cls
    assert back.kind == cls.kind
    assert (back.message, back.code, back.details) == ("it failed", 42, "root cause")
    assert (back.service_name, back.destination, back.attributes) == (
        "users",
        "billing",
        {"user": 7},
    )


def test_wire_is_mikros_go_v0_19_0_s_plus_go_main_s_cause() -> None:
    """Our JSON is Go v0.19.0's json.Marshal of the same errors.Error, then Go main's cause."""
    minimal = NotFoundError("not found", service_name="users")
    assert compact(minimal.to_wire()) == (
        '{"code":0,"service_name":"users","message":"not found","kind":"NotFoundError"}'
    )
    full = InternalError(
        "got an internal error",
        code=3,
        details="sql: no rows in result set",
        service_name="users",
        destination="billing",
    )
    assert compact(full.to_wire()) == (
        '{"code":3,"service_name":"users","message":"got an internal error",'
        '"destination":"billing","kind":"InternalError","details":"sql: no rows in result set",'
        '"cause":"sql: no rows in result set"}'
    )


@pytest.mark.parametrize("cls", KINDS, ids=lambda cls: cls.__name__)
def test_every_kind_carries_what_go_and_rust_require(cls: type[ServiceError]) -> None:
    """Even empty, an error sends code (an int32) and one of the kind strings Go and Rust know."""
    wire = cls("").to_wire()
    assert wire == {"code": 0, "kind": cls.kind.value}
    assert cls.kind.value in {
        "ValidationError",
        "InternalError",
        "NotFoundError",
        "ConditionError",
        "PermissionError",
        "RPCError",
        "CustomError",
    }


def test_code_must_fit_in_32_bits() -> None:
    """A code Go's int32 could not hold is refused when the error is made, not lost on the wire."""
    assert NotFoundError("x", code=-(2**31)).code == -(2**31)
    with pytest.raises(ValueError, match="32-bit"):
        NotFoundError("x", code=2**31)


def test_cause_is_another_name_for_details() -> None:
    """A payload spelling the cause ``cause`` decodes it into details; ``details`` wins if both."""
    cause = ServiceError.from_wire({"code": 0, "kind": "InternalError", "cause": "disk full"})
    assert cause.details == "disk full"
    assert (cause.to_wire()["details"], cause.to_wire()["cause"]) == ("disk full", "disk full")
    both = ServiceError.from_wire({"kind": "InternalError", "details": "a", "cause": "b"})
    assert both.details == "a"


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ({"code": 0, "kind": "TeapotError", "message": "m"}, (InternalError, 0, "m")),
        ({"message": "no kind"}, (InternalError, 0, "no kind")),
        ({"code": "7", "kind": "NotFoundError"}, (NotFoundError, 0, "")),
        ({"code": 2**40, "kind": "NotFoundError"}, (NotFoundError, 0, "")),
        ({"code": True, "kind": "NotFoundError"}, (NotFoundError, 0, "")),
        ({"code": 5, "kind": "NotFoundError", "message": None}, (NotFoundError, 5, "")),
        ({"code": 5, "kind": "NotFoundError", "message": 12}, (NotFoundError, 5, "12")),
    ],
)
def test_odd_payloads_decode_without_raising(
    wire: dict[str, Any], expected: tuple[type[ServiceError], int, str]
) -> None:
    """Unknown kinds are internal errors; a code Go could not decode reads 0; nothing raises."""
    error = ServiceError.from_wire(wire)
    assert (type(error), error.code, error.message) == expected


# -- the feature -------------------------------------------------------------------------------


def build_policy(table: str, environ: dict[str, str] | None = None) -> ErrorPolicy:
    """The policy build_errors publishes for ``[features.errors]`` ``table``; it builds nothing."""
    definition = parse_definition(
        f'name = "s"\ntypes = ["worker"]\nversion = "v1.0.0"\n[features.errors]\n{table}\n',
        environ=environ or {},
    )
    telemetry = Telemetry("s")
    settings = definition.features["errors"].settings
    context = BuildContext("errors", settings, definition, ServiceContainer(), telemetry)
    assert list(build_errors(context)) == []
    return telemetry.get(ErrorPolicy)


def test_without_the_feature_the_defaults_hold() -> None:
    """A hub nobody configured answers as the default policy: details shown, UNKNOWN, no hiding."""
    assert policy(Telemetry("s")) == ErrorPolicy(True, "unknown", frozenset())
    assert build_policy("") == ErrorPolicy(True, "unknown", frozenset())
    assert ErrorsSettings().grpc_status == "unknown"


@pytest.mark.parametrize("expose", [True, False])
def test_build_publishes_the_policy(expose: bool) -> None:
    """build_errors publishes expose_details, grpc_status and the keys hide_fields removes."""
    table = f'expose_details = {str(expose).lower()}\ngrpc_status = "mapped"\n'
    table += 'hide_fields = ["cause", "destination"]'
    assert build_policy(table) == ErrorPolicy(
        expose, "mapped", frozenset({"details", "cause", "destination"})
    )


def test_hide_response_fields_reads_as_rust_does_and_adds_to_the_file() -> None:
    """Comma-separated, any case, blanks and empty entries forgiven; added to hide_fields."""
    environ = {"MIKROS_HIDE_RESPONSE_FIELDS": " Message, SERVICE_NAME ,,attributes,"}
    found = build_policy('hide_fields = ["destination"]', environ)
    assert found.hidden == {"message", "service_name", "attributes", "destination"}
    assert build_policy("", {"MIKROS_HIDE_RESPONSE_FIELDS": ""}).hidden == frozenset()


@pytest.mark.parametrize(
    "variable",
    [
        "S__MIKROS_HIDE_RESPONSE_FIELDS",
        "s__MIKROS_HIDE_RESPONSE_FIELDS",
        "MIKROS_HIDE_RESPONSE_FIELDS_s",
    ],
)
def test_hide_response_fields_per_service_wins(variable: str) -> None:
    """Ours, Go's and Rust's per-service forms are read before the shared variable."""
    environ = {variable: "message", "MIKROS_HIDE_RESPONSE_FIELDS": "attributes"}
    assert build_policy("", environ).hidden == {"message"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("mesage", "no error field is called 'mesage' (did you mean 'message'?)"),
        ("message,kind", "'kind' cannot be hidden: Mikros clients cannot decode an error"),
        ("code", "'code' cannot be hidden"),
    ],
)
def test_a_field_that_cannot_be_hidden_is_a_config_error(value: str, reason: str) -> None:
    """A typo would leak what it meant to hide, and Rust cannot read an error without code/kind."""
    with pytest.raises(ConfigError) as caught:
        build_policy("", {"MIKROS_HIDE_RESPONSE_FIELDS": value})
    (issue,) = caught.value.issues
    assert issue.path == "features.errors.hide_fields"
    assert reason in issue.message
    assert "MIKROS_HIDE_RESPONSE_FIELDS" in issue.message


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_bad_hide_response_fields_stops_the_real_process(spawn: Spawn, command: str) -> None:
    """``mikros-trio check`` and ``run``: exit 2, the variable and the bad name, no traceback."""
    env = {"MIKROS_HIDE_RESPONSE_FIELDS": "message,kind"}
    child = spawn(MIKROS_TRIO, command, "examples/worker/main.py", env=env)
    assert child.wait() == 2, child.report()
    assert "MIKROS_HIDE_RESPONSE_FIELDS" in child.stderr
    assert "'kind' cannot be hidden" in child.stderr
    assert "Traceback" not in child.stdout + child.stderr


def test_hide_fields_in_the_file_is_checked_with_the_file() -> None:
    """hide_fields = ["code"] is rejected when service.toml is read, naming the key."""
    with pytest.raises(ConfigError) as caught:
        build_policy('hide_fields = ["code"]')
    assert "features.errors.hide_fields" in str(caught.value)


# -- over HTTP ---------------------------------------------------------------------------------


def create_app() -> QuartTrio:
    app = QuartTrio(__name__)

    @app.get("/users/<user_id>")
    async def user(user_id: str) -> dict[str, Any]:
        raise NotFoundError(f"no user {user_id}", code=404)

    @app.get("/boom")
    async def boom() -> dict[str, Any]:
        raise RuntimeError(INTERNALS)

    return app


class HttpContainer(ServiceContainer):
    app = providers.Singleton(create_app)


def write_toml(tmp_path: Path, kind: str, *, expose: bool = True, extra: str = "") -> Path:
    """A service.toml named ``users`` of ``kind`` on 127.0.0.1, with expose_details = ``expose``."""
    path = tmp_path / f"{kind}-{expose}.toml"
    path.write_text(
        f'name = "users"\ntypes = ["{kind}"]\nversion = "v1.0.0"\n'
        f'[runtime.{kind}]\nhost = "127.0.0.1"\n'
        f"[features.errors]\nexpose_details = {str(expose).lower()}\n"
        "[lifecycle]\nstart_timeout = 5.0\ndrain_timeout = 2.0\nshutdown_timeout = 5.0\n" + extra
    )
    return path


async def http_get(running: RunningService, path: str) -> httpx.Response:
    port = running.ports["http"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
        with trio.fail_after(BOUND):
            return await client.get(path)


async def test_not_found_over_http_arrives_as_the_same_kind(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A NotFoundError raised in a handler is a 404 whose body decodes to the same error."""
    running = await mikros_service.start(HttpContainer, write_toml(tmp_path, "http"))
    response = await http_get(running, "/users/7")
    assert response.status_code == 404
    error = ServiceError.from_wire(response.json())
    assert type(error) is NotFoundError
    assert (error.message, error.code, error.service_name) == ("no user 7", 404, "users")


@pytest.mark.parametrize("expose", [True, False])
async def test_expose_details_over_http(
    mikros_service: ServiceStarter, tmp_path: Path, expose: bool
) -> None:
    """An unexpected exception's text is in the 500's details only with expose_details = true."""
    running = await mikros_service.start(HttpContainer, write_toml(tmp_path, "http", expose=expose))
    response = await http_get(running, "/boom")
    assert response.status_code == 500
    error = ServiceError.from_wire(response.json())
    assert type(error) is InternalError
    assert (INTERNALS in response.text) is expose
    if expose:
        assert error.details == f"RuntimeError: {INTERNALS}"
    else:
        assert error.details == ""
        assert "RuntimeError" not in response.text


# -- over gRPC -----------------------------------------------------------------------------------


class Users(testsvc_grpc.EchoServicer):  # type: ignore[misc]  # generated, untyped
    """Unary raises NotFoundError for ``text``, or an unexpected error when ``fail`` says so."""

    async def Unary(self, request: Any) -> Any:
        if request.fail == "runtime":
            raise RuntimeError(INTERNALS)
        raise NotFoundError(f"no user {request.text}", code=404)


class GrpcContainer(ServiceContainer):
    users = providers.Singleton(Users)


async def idle(lifetime: Lifetime) -> None:
    """A worker with nothing to do until shutdown."""
    await lifetime.wait_stopping()


class CallerContainer(ServiceContainer):
    """A service with a channel to ``[clients.users]`` and nothing else to serve but a worker."""

    users = mikros_trio.grpc.client("users")
    worker = providers.Object(idle)


async def start_caller(
    mikros_service: ServiceStarter, tmp_path: Path, peer_port: int
) -> RunningService:
    """A worker service whose ``users`` channel points at 127.0.0.1:``peer_port``."""
    path = tmp_path / "caller.toml"
    path.write_text(
        'name = "caller"\ntypes = ["worker"]\nversion = "v1.0.0"\n'
        f'[clients.users]\nhost = "127.0.0.1"\nport = {peer_port}\n'
        "[lifecycle]\nstart_timeout = 5.0\ndrain_timeout = 2.0\nshutdown_timeout = 5.0\n"
    )
    return await mikros_service.start(CallerContainer, path)


def grpcio_unary(port: int, request: Any) -> grpc.RpcError:
    """The error grpcio's client gets for one Unary call (blocking; run it in a thread)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        try:
            testsvc_pb2_grpc.EchoStub(channel).Unary(request, timeout=BOUND)
        except grpc.RpcError as error:
            return error
    raise AssertionError("the call succeeded")


async def in_thread(fn: Any, *args: Any) -> Any:
    with trio.fail_after(2 * BOUND):
        return await trio.to_thread.run_sync(fn, *args)


async def test_not_found_over_grpc_with_grpcio(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """grpcio's client sees UNKNOWN (the default), the message decodes to the same NotFoundError."""
    running = await mikros_service.start(GrpcContainer, write_toml(tmp_path, "grpc"))
    error = await in_thread(grpcio_unary, running.ports["grpc"], EchoRequest(text="7"))
    assert error.code() == grpc.StatusCode.UNKNOWN
    typed = ServiceError.from_wire(json.loads(error.details()))
    assert type(typed) is NotFoundError
    assert (typed.message, typed.code, typed.service_name) == ("no user 7", 404, "users")


async def test_not_found_over_grpc_with_our_client(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """mikros_trio.grpc.call raises the server's NotFoundError again, naming the destination."""
    server = await mikros_service.start(GrpcContainer, write_toml(tmp_path, "grpc"))
    caller = await start_caller(mikros_service, tmp_path, server.ports["grpc"])
    stub = testsvc_grpc.EchoStub(caller.container.users())
    with trio.fail_after(BOUND), pytest.raises(NotFoundError) as caught:
        await mikros_trio.grpc.call(stub.Unary, EchoRequest(text="7"), destination="users")
    error = caught.value
    assert (error.message, error.code, error.service_name) == ("no user 7", 404, "users")
    assert error.destination == "users"


@pytest.mark.parametrize("expose", [True, False])
async def test_expose_details_over_grpc(
    mikros_service: ServiceStarter, tmp_path: Path, expose: bool
) -> None:
    """An unexpected exception's text is in the details only with expose_details = true."""
    running = await mikros_service.start(GrpcContainer, write_toml(tmp_path, "grpc", expose=expose))
    error = await in_thread(grpcio_unary, running.ports["grpc"], EchoRequest(fail="runtime"))
    assert error.code() == grpc.StatusCode.UNKNOWN
    typed = ServiceError.from_wire(json.loads(error.details()))
    assert type(typed) is InternalError
    assert (INTERNALS in error.details()) is expose
    assert typed.details == (f"RuntimeError: {INTERNALS}" if expose else "")


async def test_grpc_status_mapped_answers_go_main_s_codes(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """grpc_status = "mapped": NOT_FOUND with the JSON, as Go main sends; our client decodes it."""
    path = write_toml(tmp_path, "grpc", extra="")
    path.write_text(
        path.read_text().replace(
            "[features.errors]\n", '[features.errors]\ngrpc_status = "mapped"\n'
        )
    )
    server = await mikros_service.start(GrpcContainer, path)
    error = await in_thread(grpcio_unary, server.ports["grpc"], EchoRequest(text="7"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert type(ServiceError.from_wire(json.loads(error.details()))) is NotFoundError
    caller = await start_caller(mikros_service, tmp_path, server.ports["grpc"])
    stub = testsvc_grpc.EchoStub(caller.container.users())
    with trio.fail_after(BOUND), pytest.raises(NotFoundError):
        await mikros_trio.grpc.call(stub.Unary, EchoRequest(text="7"), destination="users")
