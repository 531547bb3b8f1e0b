"""The HTTP kind's auth hook (``[runtime.http] auth``): real services and httpx clients.

The app is a Starlette one that answers with the identity the hook attached
(``request.state.identity``); the hook knows two tokens, and raises for
two others.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from dependency_injector import providers
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from helpers import BOUND, client_for, get, in_thread, start_http
from mikros_trio import ConfigError, PermissionDeniedError, ServiceContainer
from mikros_trio.http import AuthRequest
from mikros_trio.testing import ServiceStarter

USERS = {"Bearer alice-token": "alice", "Bearer bob-token": "bob"}


class Hook:
    """Bearer tokens to users; ``seen`` records (method, path) of every call."""

    challenge = 'Bearer realm="tests"'

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, request: AuthRequest) -> str | None:
        self.seen.append((request.method, request.path))
        await trio.lowlevel.checkpoint()  # an async hook, as one asking a service would be
        token = request.header("Authorization")
        if token == "Bearer banned":
            raise PermissionDeniedError("this account is suspended")
        if token == "Bearer broken":
            raise RuntimeError("the token store is down")
        return USERS.get(token or "")


def create_app() -> Starlette:
    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"identity": request.state.identity, "path": request.url.path})

    return Starlette(routes=[Route("/whoami", whoami)])


class AuthContainer(ServiceContainer):
    app = providers.Singleton(create_app)
    authenticator = providers.Singleton(Hook)


async def _start(mikros_service: ServiceStarter, tmp_path: Path, **http: Any) -> Any:
    http = {"auth": "authenticator", **http}
    return await start_http(mikros_service, tmp_path, http=http, container=AuthContainer)


async def test_identity_reaches_the_app(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """A request the hook knows is served; the app reads the identity from its state."""
    running = await _start(mikros_service, tmp_path)
    response = await get(running, "/whoami", authorization="Bearer alice-token")
    assert response.status_code == 200
    assert response.json() == {"identity": "alice", "path": "/whoami"}
    assert running.container.authenticator().seen == [("GET", "/whoami")]


async def test_identity_never_outlives_its_request(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """On one keep-alive connection each request gets its own identity, or none and a 401."""
    running = await _start(mikros_service, tmp_path)
    async with client_for(running) as client:
        first = await client.get("/whoami", headers={"Authorization": "Bearer alice-token"})
        second = await client.get("/whoami", headers={"Authorization": "Bearer bob-token"})
        third = await client.get("/whoami")
    assert first.json()["identity"] == "alice"
    assert second.json()["identity"] == "bob"
    assert third.status_code == 401


async def test_no_identity_is_401_with_a_mikros_body(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """The hook returning None: 401, a Mikros PermissionError body, and the hook's challenge."""
    running = await _start(mikros_service, tmp_path)
    for token in (None, "Bearer forged"):
        headers = {"authorization": token} if token else {}
        response = await get(running, "/whoami", **headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="tests"'
        body = response.json()
        assert (body["kind"], body["message"]) == ("PermissionError", "authentication required")
        assert body["service_name"] == "web"


async def test_hook_raising_a_service_error_sets_the_status(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A PermissionDeniedError from the hook is 403 with its Mikros body; the app never runs."""
    running = await _start(mikros_service, tmp_path)
    response = await get(running, "/whoami", authorization="Bearer banned")
    assert response.status_code == 403
    body = response.json()
    assert (body["kind"], body["message"]) == ("PermissionError", "this account is suspended")


async def test_hook_failing_is_a_500_and_the_service_goes_on(
    mikros_service: ServiceStarter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Any other exception from the hook: 500 InternalError, logged; the next request is served."""
    running = await _start(mikros_service, tmp_path)
    broken = await get(running, "/whoami", authorization="Bearer broken")
    assert broken.status_code == 500
    assert broken.json()["kind"] == "InternalError"
    assert "the token store is down" in caplog.text
    assert (await get(running, "/whoami", authorization="Bearer bob-token")).status_code == 200


async def test_probes_and_preflights_skip_the_hook(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Probes, /health and CORS preflights are answered without asking the hook."""
    running = await _start(mikros_service, tmp_path, cors_allowed_origins=["https://app.example"])
    for probe in ("/livez", "/readyz", "/healthz", "/health"):
        assert (await get(running, probe)).status_code == 200
    async with client_for(running) as client:
        preflight = await client.options(
            "/whoami",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        )
        # A refusal still carries the CORS headers, so the page can read it.
        refused = await client.get("/whoami", headers={"Origin": "https://app.example"})
    assert preflight.status_code == 204
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://app.example"
    assert running.container.authenticator().seen == [("GET", "/whoami")]


async def test_disable_auth_serves_without_the_hook(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """disable_auth = true (Go's key): the hook is never called."""
    calls: list[str] = []

    class NoIdentity(AuthContainer):
        app = providers.Singleton(
            lambda: Starlette(routes=[Route("/open", lambda r: JSONResponse({"open": True}))])
        )
        authenticator = providers.Object(lambda request: calls.append(request.path) or "x")

    running = await start_http(
        mikros_service,
        tmp_path,
        http={"auth": "authenticator", "disable_auth": True},
        container=NoIdentity,
    )
    assert (await get(running, "/open")).json() == {"open": True}
    assert calls == []


async def test_auth_naming_no_provider_is_a_config_error(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """auth naming a provider the container lacks fails before anything starts, at its key."""
    with pytest.raises(ConfigError) as caught:
        await _start(mikros_service, tmp_path, auth="nobody")
    text = caught.value.render()
    assert "runtime.http.auth" in text
    assert "'nobody'" in text


async def test_no_hook_means_no_auth(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """Without [runtime.http] auth the service starts and serves (Go v0.19.0 without a plugin)."""
    running = await start_http(mikros_service, tmp_path)
    assert (await get(running, "/hello")).status_code == 200


async def test_every_protocol_meets_the_hook(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """HTTP/2 requests and WebSocket handshakes pass the hook too: no way around it."""

    class WithSocket(AuthContainer):
        app = providers.Singleton(create_app_with_socket)

    running = await start_http(
        mikros_service, tmp_path, http={"auth": "authenticator"}, container=WithSocket
    )
    async with client_for(running, http1=False, http2=True) as client:
        refused = await client.get("/whoami")
        served = await client.get("/whoami", headers={"Authorization": "Bearer bob-token"})
        # hypercorn gives every stream of a connection one state: bob's must not stay in it.
        after = await client.get("/whoami")
    assert (refused.http_version, refused.status_code) == ("HTTP/2", 401)
    assert served.json()["identity"] == "bob"
    assert after.status_code == 401
    port = running.ports["http"]
    refused_socket = await in_thread(_handshake, port, "")
    accepted_socket = await in_thread(_handshake, port, "Authorization: Bearer alice-token\r\n")
    assert refused_socket.startswith(b"HTTP/1.1 403"), refused_socket
    assert accepted_socket.startswith(b"HTTP/1.1 101"), accepted_socket


def create_app_with_socket() -> Starlette:
    async def greet(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text(f"hello {socket.state.identity}")
        await socket.close()

    app = create_app()
    app.router.routes.append(WebSocketRoute("/ws", greet))
    return app


def _handshake(port: int, extra: str) -> bytes:
    request = (
        "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        sock.sendall(request.encode())
        received = b""
        while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
    return received


async def test_quart_reads_the_identity_from_the_scope(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A QuartTrio handler reads the identity as request.scope["state"]["identity"]."""
    from quart import request
    from quart_trio import QuartTrio

    def create_quart() -> QuartTrio:
        app = QuartTrio(__name__)

        @app.get("/whoami")
        async def whoami() -> dict[str, Any]:
            return {"identity": request.scope["state"]["identity"]}

        return app

    class QuartAuth(AuthContainer):
        app = providers.Singleton(create_quart)

    running = await start_http(
        mikros_service, tmp_path, http={"auth": "authenticator"}, container=QuartAuth
    )
    response = await get(running, "/whoami", authorization="Bearer alice-token")
    assert response.json() == {"identity": "alice"}
    assert (await get(running, "/whoami")).status_code == 401
