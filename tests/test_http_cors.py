"""CORS from ``[runtime.http] cors_*``: real services, httpx and raw sockets.

Every app here counts the requests that reach it, so a test can show a
preflight never does.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from dependency_injector import providers

from helpers import BOUND, client_for, in_thread, parse_responses, start_http
from mikros_trio import ConfigError, ServiceContainer
from mikros_trio.testing import ServiceStarter

ORIGIN = "https://app.example"
CORS = {
    "cors_allowed_origins": [ORIGIN],
    "cors_allowed_methods": ["GET", "POST", "DELETE"],
    "cors_allowed_headers": ["Content-Type", "X-Token"],
    "cors_exposed_headers": ["X-Request-Id"],
    "cors_max_age": 600,
}


class Counting:
    """A bare ASGI app answering 200 "ok"; ``calls`` counts the requests it saw."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        headers = [(b"content-type", b"text/plain"), (b"x-request-id", b"r1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


class CountingContainer(ServiceContainer):
    app = providers.Singleton(Counting)


async def _start(mikros_service: ServiceStarter, tmp_path: Path, **http: Any) -> Any:
    return await start_http(mikros_service, tmp_path, http=http, container=CountingContainer)


def _cors_headers(response: Any) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


async def _preflight(client: Any, origin: str, method: str = "POST", **headers: str) -> Any:
    """A CORS preflight for ``method`` on /x from ``origin``, with ``headers`` added."""
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    asked.update({name.replace("_", "-"): value for name, value in headers.items()})
    return await client.options("/x", headers=asked)


async def test_allowed_origin_gets_the_allow_headers(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A request from an allowed origin is served, with Allow-Origin and Expose-Headers."""
    running = await _start(mikros_service, tmp_path, **CORS)
    async with client_for(running) as client:
        response = await client.get("/x", headers={"Origin": ORIGIN})
    assert (response.status_code, response.text) == (200, "ok")
    assert _cors_headers(response) == {
        "access-control-allow-origin": ORIGIN,
        "access-control-expose-headers": "X-Request-Id",
    }
    assert "Origin" in response.headers.get_list("vary")


async def test_preflight_is_answered_without_the_app(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A preflight from an allowed origin gets 204 and every allow header; the app never runs."""
    running = await _start(mikros_service, tmp_path, **CORS)
    async with client_for(running) as client:
        response = await _preflight(
            client, ORIGIN, "DELETE", Access_Control_Request_Headers="x-token"
        )
    assert (response.status_code, response.content) == (204, b"")
    assert _cors_headers(response) == {
        "access-control-allow-origin": ORIGIN,
        "access-control-allow-methods": "GET,POST,DELETE",
        "access-control-allow-headers": "Content-Type,X-Token",
        "access-control-max-age": "600",
    }
    assert running.container.app().calls == 0


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "https://app.example.evil", "null", ORIGIN.upper()]
)
async def test_disallowed_origin_gets_no_cors_header(
    mikros_service: ServiceStarter, tmp_path: Path, origin: str
) -> None:
    """An origin not listed (a look-alike, "null", another case) gets no CORS header at all."""
    running = await _start(mikros_service, tmp_path, **CORS)
    async with client_for(running) as client:
        simple = await client.get("/x", headers={"Origin": origin})
        preflight = await _preflight(
            client, origin, "DELETE", Access_Control_Request_Headers="x-token"
        )
    assert simple.status_code == 200
    assert _cors_headers(simple) == {}
    assert preflight.status_code == 204
    assert _cors_headers(preflight) == {}
    assert running.container.app().calls == 1  # the simple request only


async def test_request_without_origin_is_untouched(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """No Origin: no CORS header, and an OPTIONS that is not a preflight reaches the app."""
    running = await _start(mikros_service, tmp_path, **CORS)
    async with client_for(running) as client:
        plain = await client.get("/x")
        options = await client.options("/x", headers={"Origin": ORIGIN})
    assert _cors_headers(plain) == {}
    assert "vary" not in plain.headers
    assert options.status_code == 200  # the app's answer
    assert running.container.app().calls == 2


async def test_any_origin_and_asked_headers_echoed(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Origin "*" without credentials answers "*"; no allowed headers set echoes what is asked."""
    running = await _start(mikros_service, tmp_path, cors_allowed_origins=["*"])
    async with client_for(running) as client:
        response = await _preflight(
            client, "https://any.example", Access_Control_Request_Headers="x-one, x-two"
        )
    assert _cors_headers(response) == {
        "access-control-allow-origin": "*",
        "access-control-allow-methods": "GET,HEAD,POST",
        "access-control-allow-headers": "x-one, x-two",
    }


async def test_credentials_reflect_the_origin(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """With credentials the allowed origin itself is sent (never "*"), with Allow-Credentials."""
    running = await _start(
        mikros_service, tmp_path, cors_allowed_origins=[ORIGIN], cors_allow_credentials=True
    )
    async with client_for(running) as client:
        response = await client.get("/x", headers={"Origin": ORIGIN})
    assert _cors_headers(response) == {
        "access-control-allow-origin": ORIGIN,
        "access-control-allow-credentials": "true",
    }


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"cors_allowed_origins": ["*"], "cors_allow_credentials": True}, '"*"'),
        ({"cors_allowed_origins": [ORIGIN], "cors_allowed_methods": []}, "methods is empty"),
    ],
    ids=["any-with-credentials", "no-methods"],
)
async def test_invalid_cors_is_a_config_error_when_strict(
    mikros_service: ServiceStarter, tmp_path: Path, settings: dict[str, Any], problem: str
) -> None:
    """Go's rules, cors_strict (the default): an unusable CORS setting fails the start."""
    with pytest.raises(ConfigError) as caught:
        await _start(mikros_service, tmp_path, **settings)
    assert "runtime.http" in caught.value.render()
    assert problem in caught.value.render()


async def test_invalid_cors_not_strict_serves_without_cors(
    mikros_service: ServiceStarter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """cors_strict = false: a warning, and the service serves with no CORS header."""
    running = await _start(
        mikros_service,
        tmp_path,
        cors_allowed_origins=["*"],
        cors_allow_credentials=True,
        cors_strict=False,
    )
    async with client_for(running) as client:
        response = await client.get("/x", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert _cors_headers(response) == {}
    assert "invalid CORS settings" in caplog.text


def _flood(port: int, count: int) -> bytes:
    """``count`` pipelined preflights on one connection, then a GET; everything read back."""
    preflight = (
        b"OPTIONS /x HTTP/1.1\r\nHost: t\r\nOrigin: " + ORIGIN.encode() + b"\r\n"
        b"Access-Control-Request-Method: POST\r\n\r\n"
    )
    last = b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        sock.sendall(preflight * count + last)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


async def test_preflight_flood_is_served_like_any_request(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """2000 pipelined preflights: each answered 204 in order, none reaches the app, then the GET."""
    running = await _start(mikros_service, tmp_path, **CORS)
    with trio.fail_after(BOUND):
        raw = await in_thread(_flood, running.ports["http"], 2000)
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [204] * 2000 + [200]
    assert running.container.app().calls == 1


async def test_preflight_with_an_oversized_head_gets_431(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A preflight is a request like any other: a head over max_header_bytes gets 431."""
    running = await _start(mikros_service, tmp_path, max_header_bytes=4096, **CORS)
    async with client_for(running) as client:
        response = await _preflight(client, ORIGIN, X_Filler="a" * 5000)
    assert response.status_code == 431
    assert running.container.app().calls == 0
