"""The Mikros error conformance table: Go v0.19.0, Go main and Rust, both ways, HTTP and gRPC.

From them to us: each payload in ``tests/assets/mikros_errors/`` is what a
Mikros server sends, written from its source (each case names the file and
revision). A grpcio
server answers it as the status a Mikros gRPC server sends, a plain HTTP
server as the response a Mikros HTTP handler writes; our gRPC client
(``mikros_trio.grpc.call``) and ``ServiceError.decode`` on an httpx
response must give back the kind, message, code, cause and destination.

From us to them: our real services answer each kind; grpcio and httpx
fetch what they send, and the decoding logic of each Mikros client,
re-expressed below from its source (with Go's ``encoding/json`` and Rust's
``serde_json`` rules that matter), must read it right.

Sources: mikros-dev/mikros at v0.19.0 (99a473d, the latest release) and at
main (4eed9c9); mikros-dev/mikros-rs at 94ba736.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio
from dependency_injector import providers
from quart_trio import QuartTrio

import mikros_trio.grpc
from helpers import BOUND, ClientContainer, EchoRequest, grpc_channel, in_thread, rpc_error, start
from mikros_trio import (
    ErrorKind,
    InternalError,
    ServiceContainer,
    ServiceError,
)
from mikros_trio.testing import RunningService, ServiceStarter
from protos import testsvc_grpc, testsvc_pb2_grpc

Code = grpc.StatusCode

#: Marks an expected message for a payload that is not Mikros JSON: ours names the status.
PLAIN = "<plain>"

# -- what their servers send -------------------------------------------------------------------
#
# The payloads are data: tests/assets/mikros_errors/<peer>.json, each case naming the source
# file and revision it was written from (see the README there). The caller names the peer
# "users", the destination an error without one gets.

ASSETS = Path(__file__).parent / "assets" / "mikros_errors"


def peer_cases(transport: str) -> list[Any]:
    """Every peer's cases a ``transport`` ("grpc_status" or "http_status") server sends."""
    cases = [
        case
        for peer in ("go-v0.19.0", "go-main", "rust")
        for case in json.loads((ASSETS / f"{peer}.json").read_text())
    ]
    return [pytest.param(case, id=case["id"]) for case in cases if case[transport] is not None]


def check(error: ServiceError, case: dict[str, Any], status: str) -> None:
    """``error`` is what ``case`` expects; attributes its payload sent are kept."""
    expect = case["expect"]
    message = expect["message"]
    if message is None:  # not Mikros JSON: ours names what carried it
        message = f"users answered {status} without a Mikros error"
    assert error.kind.value == expect["kind"]
    assert (error.message, error.code, error.details) == (message, expect["code"], expect["cause"])
    assert (error.destination, error.service_name) == (
        expect["destination"],
        expect["service_name"],
    )
    payload = case["payload"]
    sent = json.loads(payload) if payload.startswith("{") else {}
    assert error.attributes == sent.get("attributes")


class MikrosPeer(testsvc_pb2_grpc.EchoServicer):  # type: ignore[misc]  # generated, untyped
    """Answers as the Mikros server of a case: the status named by ``fail``, ``text`` as message."""

    def Unary(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(Code[request.fail], request.text)


@pytest.fixture(name="grpc_peer", scope="module")
def _grpc_peer() -> Iterator[int]:
    """A grpcio server standing in for every Mikros gRPC peer; its port."""
    executor = futures.ThreadPoolExecutor(max_workers=2)
    server = grpc.server(executor)
    testsvc_pb2_grpc.add_EchoServicer_to_server(MikrosPeer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None).wait(BOUND)
    executor.shutdown()


#: What the HTTP peer answers for ``GET /<id>``: status, content type, body.
HTTP_ANSWERS: dict[str, tuple[int, str, str]] = {}


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, content_type, body = HTTP_ANSWERS[self.path.lstrip("/")]
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reports what matters."""


@pytest.fixture(name="http_peer", scope="module")
def _http_peer() -> Iterator[int]:
    """A plain HTTP server standing in for every Mikros HTTP peer; its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(BOUND)


@pytest.mark.parametrize("case", peer_cases("grpc_status"))
async def test_their_grpc_errors_decode_here(
    mikros_service: ServiceStarter, tmp_path: Path, grpc_peer: int, case: dict[str, Any]
) -> None:
    """The status a Mikros gRPC server sends is raised by our client as its kind and fields."""
    caller = await start(
        mikros_service, tmp_path, container=ClientContainer, clients={"peer": grpc_peer}
    )
    stub = testsvc_grpc.EchoStub(caller.container.peer())
    request = EchoRequest(fail=case["grpc_status"], text=case["payload"])
    with trio.fail_after(BOUND), pytest.raises(ServiceError) as caught:
        await mikros_trio.grpc.call(stub.Unary, request, destination="users")
    check(caught.value, case, case["grpc_status"])


@pytest.mark.parametrize("case", peer_cases("http_status"))
async def test_their_http_errors_decode_here(http_peer: int, case: dict[str, Any]) -> None:
    """The response a Mikros HTTP handler writes decodes to its kind and fields."""
    status = case["http_status"]
    HTTP_ANSWERS[case["id"]] = (status, case["content_type"], case["payload"])
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(BOUND):
            response = await client.get(f"http://127.0.0.1:{http_peer}/{case['id']}")
    assert (response.status_code, response.headers["content-type"]) == (
        status,
        case["content_type"],
    )
    error = ServiceError.decode(response.content, destination="users", status=str(status))
    check(error, case, str(status))
    if case["expect"]["message"] is not None:  # a Mikros error: its kind's status
        assert HTTP_STATUS_OF[error.kind.value] == status


# -- their clients' logic, re-expressed ------------------------------------------------------


class GoDecodeError(Exception):
    """json.Unmarshal returned an error."""


class RustPanic(Exception):
    """serde_json::from_str(...).unwrap() panicked."""


class _Fraction(float):
    """A JSON number written with a fraction or exponent (Go and serde refuse it for integers)."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Go and serde_json reject them


def go_unmarshal(text: str, fields: dict[str, type]) -> dict[str, Any]:
    """Go's encoding/json.Unmarshal of ``text`` into a struct of string and int32 fields.

    What matters here of Go's rules: keys match field names exactly or else
    case-insensitively, unknown keys are skipped, null leaves a field as
    it was, a value of the wrong type (a number with a fraction or out of
    int32's range for an int32) makes Unmarshal return an error, and an
    escaped lone surrogate decodes to U+FFFD.
    """
    try:
        value = json.loads(text, parse_constant=_refuse, parse_float=_Fraction)
    except ValueError as error:
        raise GoDecodeError(str(error)) from None
    result: dict[str, Any] = {name: "" if kind is str else 0 for name, kind in fields.items()}
    if value is None:
        return result
    if not isinstance(value, dict):
        raise GoDecodeError("cannot unmarshal into a struct")
    failed = False
    for key, item in value.items():
        name = key if key in fields else next((f for f in fields if f.lower() == key.lower()), "")
        if not name or item is None:
            continue
        if fields[name] is str and isinstance(item, str):
            result[name] = _SURROGATE.sub("\ufffd", item)
        elif fields[name] is int and _int32(item):
            result[name] = item
        else:
            failed = True  # Go keeps going, then returns an UnmarshalTypeError
    if failed:
        raise GoDecodeError("cannot unmarshal a field")
    return result


def _int32(value: object) -> bool:
    return type(value) is int and -(2**31) <= value < 2**31


#: Go v0.19.0's errors.Error (internal/components/errors/errors.go), by JSON name.
GO_V019_ERROR = {
    "code": int,
    "service_name": str,
    "message": str,
    "destination": str,
    "kind": str,
    "details": str,
}

#: Go main's grpcErrorMessage (internal/components/errors/errors.go), by JSON name.
GO_MAIN_MESSAGE = {
    "kind": str,
    "message": str,
    "cause": str,
    "code": int,
    "service_name": str,
    "destination": str,
}

#: The calling service's own name, which Go's clients put in the errors they decode.
CALLER = "caller"


def go_v019_client(code: Code, message: str, to: str) -> dict[str, Any]:
    """FromGRPCStatus of internal/components/errors/errors.go at v0.19.0."""
    try:
        error = go_unmarshal(message, GO_V019_ERROR)
    except GoDecodeError:
        return {
            "code": 0,
            "service_name": CALLER,
            "message": "got an internal error",
            "destination": to,
            "kind": "InternalError",
            "details": message,
        }
    if code != Code.UNKNOWN:  # "a non-mikros error": the kind is lost
        error["kind"] = "InternalError"
        error["details"] = message
    return error


def go_main_client(message: str, to: str) -> dict[str, Any]:
    """FromGRPCStatus of internal/components/errors/errors.go at main (any status code)."""
    try:
        sent = go_unmarshal(message, GO_MAIN_MESSAGE)
    except GoDecodeError:
        sent = {"kind": "InternalError", "message": "got an internal error", "cause": message}
        sent["code"] = 0
    return {**sent, "service_name": CALLER, "destination": to}


def rust_client(message: str) -> dict[str, Any]:
    """``impl From<tonic::Status> for ServiceError`` of mikros/src/errors.rs (any status code).

    serde_json into ``ServiceError``: ``code`` (i32) and ``kind`` (String)
    required, ``message``, ``service_name``, ``destination``
    ``Option<String>``, ``attributes`` any JSON, unknown keys skipped, a
    field given twice an error, an escaped lone surrogate an error. Any
    error panics (``unwrap``).
    """

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(keys) != len(set(keys)):
            raise RustPanic(f"duplicate field in {keys}")
        return dict(pairs)

    try:
        value = json.loads(
            message, parse_constant=_refuse, parse_float=_Fraction, object_pairs_hook=no_duplicates
        )
    except ValueError as error:
        raise RustPanic(str(error)) from None
    if _has_surrogate(value):
        raise RustPanic("lone surrogate in hex escape")
    if not isinstance(value, dict) or "code" not in value or "kind" not in value:
        raise RustPanic(f"missing field in {message!r}")
    if not _int32(value["code"]) or not isinstance(value["kind"], str):
        raise RustPanic(f"invalid type in {message!r}")
    for name in ("message", "service_name", "destination"):
        if not isinstance(value.get(name), str | None):
            raise RustPanic(f"invalid type for {name}")
    names = ("code", "kind", "message", "service_name", "attributes", "destination")
    return {name: value.get(name) for name in names}


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(item) for item in value)
    return False


#: HTTP status of each kind: Go's errorToStatusCode (components/http/response.go, the same
#: at v0.19.0 and main) and Rust's IntoResponse (mikros/src/errors.rs) agree on it.
HTTP_STATUS_OF = {
    "NotFoundError": 404,
    "PermissionError": 403,
    "ConditionError": 412,
    "ValidationError": 400,
    "InternalError": 500,
    "RPCError": 500,
    "CustomError": 500,
}


# -- what we send --------------------------------------------------------------------------------

#: Each kind's wire name and class (through the decoder: every kind, no list to keep in step).
KINDS: dict[str, type[ServiceError]] = {
    kind.value: type(ServiceError.from_wire({"kind": kind.value})) for kind in ErrorKind
}

#: An error whose every string and attribute is hostile to some Mikros client: a lone
#: surrogate (a file name decoded with surrogateescape; serde_json refuses it), NaN (no
#: JSON number), objects json.dumps cannot encode, a non-string key.
HOSTILE_DETAILS = "open /srv/caf\udce9.txt: no such file"
HOSTILE_ATTRIBUTES = {
    "ratio": float("nan"),
    "when": datetime.date(2026, 12, 5),
    "tags": ("a", "b"),
    7: "seven",
}


def raised(name: str) -> ServiceError:
    """The error our handlers raise for ``name``: a kind's value, ``"hostile"`` or ``"huge-N"``."""
    if name == "hostile":
        return InternalError("caf\udce9", details=HOSTILE_DETAILS, attributes=HOSTILE_ATTRIBUTES)
    if name.startswith("huge-"):  # a cause of that many characters ("%": 3 bytes each on gRPC)
        size = int(name.removeprefix("huge-"))
        return InternalError("m" * (size // 10), details="%" * size, attributes={"a": "b" * size})
    return KINDS[name](
        f"raised {name}",
        code=7,
        details="the cause",
        destination="billing",
        attributes={"key": "value"},
    )


class Raiser(testsvc_grpc.EchoServicer):  # type: ignore[misc]  # generated, untyped
    """Unary raises :func:`raised` of the request's ``fail``."""

    async def Unary(self, request: Any) -> Any:
        raise raised(request.fail)


class GrpcUsers(ServiceContainer):
    users = providers.Singleton(Raiser)


def create_app() -> QuartTrio:
    app = QuartTrio(__name__)

    @app.get("/raise/<name>")
    async def fail(name: str) -> dict[str, Any]:
        raise raised(name)

    return app


class HttpUsers(ServiceContainer):
    app = providers.Singleton(create_app)


async def start_users(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    kind: str,
    errors: str = "",
    environ: dict[str, str] | None = None,
) -> RunningService:
    """Our ``users`` service of ``kind`` on 127.0.0.1, with ``errors`` as [features.errors]."""
    path = tmp_path / f"users-{kind}.toml"
    path.write_text(
        f'name = "users"\ntypes = ["{kind}"]\nversion = "v1.0.0"\n'
        f'[runtime.{kind}]\nhost = "127.0.0.1"\n'
        f"[features.errors]\n{errors}\n"
        "[lifecycle]\nstart_timeout = 5.0\ndrain_timeout = 2.0\nshutdown_timeout = 5.0\n"
    )
    container = GrpcUsers if kind == "grpc" else HttpUsers
    with trio.fail_after(BOUND):
        return await mikros_service.start(container, path, environ=environ or {})


def grpcio_failures(port: int, names: list[str]) -> dict[str, tuple[Code, str]]:
    """Status code and message grpcio's client gets for each of ``names`` (blocking)."""
    with grpc_channel(port) as channel:
        stub = testsvc_pb2_grpc.EchoStub(channel)
        found = {}
        for name in names:
            call = functools.partial(stub.Unary, EchoRequest(fail=name), timeout=BOUND)
            error = rpc_error(call)
            found[name] = (error.code(), error.details())
        return found


@pytest.mark.parametrize("mode", ["unknown", "mapped"])
async def test_what_we_send_over_grpc_decodes_in_their_clients(
    mikros_service: ServiceStarter, tmp_path: Path, mode: str
) -> None:
    """Every kind, in both modes, read by Go v0.19.0's, Go main's and Rust's client logic.

    "unknown" (the default) keeps every kind for all three; "mapped" loses
    them for Go v0.19.0 only (its client makes any code but UNKNOWN an
    InternalError), except CustomError, which mapped sends as UNKNOWN too.
    """
    running = await start_users(mikros_service, tmp_path, "grpc", f'grpc_status = "{mode}"')
    found = await in_thread(grpcio_failures, running.ports["grpc"], list(KINDS))
    for kind, (code, message) in found.items():
        assert (code == Code.UNKNOWN) is (mode == "unknown" or kind == "CustomError"), kind
        v019 = go_v019_client(code, message, to="users")
        if code == Code.UNKNOWN:
            assert v019 == {
                "code": 7,
                "service_name": "users",
                "message": f"raised {kind}",
                "destination": "billing",
                "kind": kind,
                "details": "the cause",
            }
        else:
            assert (v019["kind"], v019["details"]) == ("InternalError", message)
        assert go_main_client(message, to="users") == {
            "kind": kind,
            "message": f"raised {kind}",
            "cause": "the cause",
            "code": 7,
            "service_name": CALLER,
            "destination": "users",
        }
        assert rust_client(message) == {
            "code": 7,
            "kind": kind,
            "message": f"raised {kind}",
            "service_name": "users",
            "attributes": {"key": "value"},
            "destination": "billing",
        }


async def test_what_we_send_over_http_decodes_in_their_clients(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Every kind's HTTP status is Go's and Rust's, its body read by each one's decoding."""
    running = await start_users(mikros_service, tmp_path, "http")
    async with httpx.AsyncClient(trust_env=False) as client:
        for kind in KINDS:
            with trio.fail_after(BOUND):
                response = await client.get(
                    f"http://127.0.0.1:{running.ports['http']}/raise/{kind}"
                )
            assert response.status_code == HTTP_STATUS_OF[kind], kind
            body = response.text
            v019 = go_unmarshal(body, GO_V019_ERROR)
            assert (v019["kind"], v019["details"], v019["code"]) == (kind, "the cause", 7)
            main = go_unmarshal(body, GO_MAIN_MESSAGE)
            assert (main["kind"], main["cause"], main["message"]) == (
                kind,
                "the cause",
                f"raised {kind}",
            )
            rust = rust_client(body)
            assert (rust["kind"], rust["destination"], rust["attributes"]) == (
                kind,
                "billing",
                {"key": "value"},
            )


async def test_hostile_strings_and_attributes_still_decode_everywhere(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A lone surrogate, NaN, a date, a tuple, an int key: every client still gets the kind."""
    grpc_users = await start_users(mikros_service, tmp_path, "grpc")
    ((code, message),) = (
        await in_thread(grpcio_failures, grpc_users.ports["grpc"], ["hostile"])
    ).values()
    http_users = await start_users(mikros_service, tmp_path, "http")
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(BOUND):
            response = await client.get(
                f"http://127.0.0.1:{http_users.ports['http']}/raise/hostile"
            )
    for sent in (message, response.text):
        rust = rust_client(sent)
        assert (rust["kind"], rust["message"]) == ("InternalError", "caf\ufffd")
        assert rust["attributes"] == {
            "ratio": "nan",
            "when": "2026-12-05",
            "tags": ["a", "b"],
            "7": "seven",
        }
        assert go_v019_client(code, sent, to="users")["details"] == (
            "open /srv/caf\ufffd.txt: no such file"
        )
        assert go_main_client(sent, to="users")["kind"] == "InternalError"


async def test_a_huge_error_still_reaches_every_client_with_its_kind(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Past grpcio's 8 KiB trailers the call failed RESOURCE_EXHAUSTED, far past it hung: cut."""
    users = await start_users(mikros_service, tmp_path, "grpc")
    names = ["huge-3000", "huge-7000", "huge-200000"]
    found = await in_thread(grpcio_failures, users.ports["grpc"], names)
    for name, (code, message) in found.items():
        assert code == Code.UNKNOWN, (name, message)
        assert rust_client(message)["kind"] == "InternalError", name
        v019 = go_v019_client(code, message, to="users")
        assert v019["kind"] == "InternalError"
        assert v019["details"] == go_main_client(message, to="users")["cause"]
        assert v019["details"].endswith("characters cut)"), name


async def test_hidden_fields_leave_what_rust_hides(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """MIKROS_HIDE_RESPONSE_FIELDS as a Rust service sets it: Rust's JSON, over both kinds."""
    environ = {"MIKROS_HIDE_RESPONSE_FIELDS": "message,service_name,attributes,destination"}
    grpc_users = await start_users(mikros_service, tmp_path, "grpc", environ=environ)
    ((_, message),) = (
        await in_thread(grpcio_failures, grpc_users.ports["grpc"], ["RPCError"])
    ).values()
    assert json.loads(message) == {
        "code": 7,
        "kind": "RPCError",
        "details": "the cause",
        "cause": "the cause",
    }
    assert rust_client(message) == rust_client('{"code":7,"kind":"RPCError"}')
    http_users = await start_users(
        mikros_service, tmp_path, "http", 'hide_fields = ["details"]', environ=environ
    )
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(BOUND):
            response = await client.get(
                f"http://127.0.0.1:{http_users.ports['http']}/raise/RPCError"
            )
    assert json.loads(response.text) == {"code": 7, "kind": "RPCError"}  # as Rust's, all hidden
    assert ServiceError.decode(response.content).kind.value == "RPCError"
