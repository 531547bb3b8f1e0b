"""``[runtime.http] base_path`` and ``max_header_bytes`` (Go's keys), on real sockets.

The base path is tried with the two frameworks that route on ``root_path``
(Quart, Starlette) and a WebSocket; the header limit on each path a request
can take: the HTTP/1.1 loop, hypercorn's HTTP/1.1 behind TLS, and HTTP/2.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest
import trio
from dependency_injector import providers
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from helpers import BOUND, client_for, curl, get, in_thread, start_http, tls_files, url
from mikros_trio import ServiceContainer
from mikros_trio.testing import ServiceStarter

BASE = "/example/v1"


@pytest.mark.parametrize("written", ["/example/v1", "example/v1/", " /example/v1// "])
async def test_quart_app_served_under_the_base_path(
    mikros_service: ServiceStarter, tmp_path: Path, written: str
) -> None:
    """Quart routes under base_path (normalised as Go does); elsewhere is Mikros 404 JSON."""
    running = await start_http(mikros_service, tmp_path, http={"base_path": written})
    hello = await get(running, BASE + "/hello")
    assert (hello.status_code, hello.text) == (200, "hello")
    item = await get(running, BASE + "/items/missing")
    assert (item.status_code, item.json()["kind"]) == (404, "NotFoundError")
    for outside in ("/hello", "/example/v1hello", "/example", BASE):
        response = await get(running, outside)
        assert response.status_code == 404, outside
        assert response.json()["kind"] == "NotFoundError"
    # Probes stay at the root, where orchestrators look for them.
    for probe in ("/livez", "/readyz", "/healthz", "/health"):
        assert (await get(running, probe)).status_code == 200
        assert (await get(running, BASE + probe)).status_code == 404


class StarletteContainer(ServiceContainer):
    @staticmethod
    def _app() -> Starlette:
        async def where(request: Request) -> JSONResponse:
            return JSONResponse({"path": request.url.path, "url": str(request.url_for("where"))})

        return Starlette(routes=[Route("/where", where, name="where")])

    app = providers.Singleton(_app)


async def test_starlette_routes_and_builds_urls_under_the_base_path(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Starlette routes on the rest of the path and its url_for includes the base path."""
    running = await start_http(
        mikros_service, tmp_path, http={"base_path": BASE}, container=StarletteContainer
    )
    response = await get(running, BASE + "/where")
    assert response.status_code == 200
    assert response.json()["path"] == BASE + "/where"
    assert response.json()["url"].endswith(BASE + "/where")
    assert (await get(running, "/where")).status_code == 404


def _websocket_handshake(port: int, path: str) -> bytes:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        sock.sendall(request.encode())
        return sock.recv(65536)


async def test_websocket_outside_the_base_path_is_refused(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A WebSocket handshake under base_path is accepted (101); outside it is refused (403)."""
    running = await start_http(mikros_service, tmp_path, http={"base_path": BASE})
    port = running.ports["http"]
    inside = await in_thread(_websocket_handshake, port, BASE + "/ws")
    outside = await in_thread(_websocket_handshake, port, "/ws")
    assert inside.startswith(b"HTTP/1.1 101"), inside
    assert outside.startswith(b"HTTP/1.1 403"), outside


# -- max_header_bytes --------------------------------------------------------------


def _head(filler: int) -> bytes:
    return b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Filler: " + b"a" * filler + b"\r\n\r\n"


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize("filler", [5000, 20_000, 200_000])
async def test_head_over_max_header_bytes_is_431_and_closed(
    mikros_service: ServiceStarter, tmp_path: Path, filler: int
) -> None:
    """A head over max_header_bytes gets 431, whole in one read or in many; nothing after runs."""
    running = await start_http(mikros_service, tmp_path, http={"max_header_bytes": 4096})
    port = running.ports["http"]
    after = b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n"
    raw = await in_thread(_exchange, port, _head(filler) + after)
    assert raw.startswith(b"HTTP/1.1 431"), raw[:100]
    assert raw.count(b"HTTP/1.1 ") == 1
    # Under the limit is served.
    fits = await in_thread(_exchange, port, _head(3000)[:-2] + b"Connection: close\r\n\r\n")
    assert fits.startswith(b"HTTP/1.1 200"), fits[:100]


async def test_max_header_bytes_above_the_default(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A limit above the 64 KiB default lets a 100 KB header through (Go allows 1 MiB)."""
    running = await start_http(mikros_service, tmp_path, http={"max_header_bytes": 1 << 20})
    async with client_for(running) as client:
        response = await client.get("/hello", headers={"X-Filler": "a" * 100_000})
    assert response.status_code == 200


async def test_max_header_bytes_over_tls(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """Behind TLS (hypercorn's HTTP/1.1) the same limit gives the same 431."""
    ca, cert, key = tls_files(tmp_path)
    http = {"max_header_bytes": 4096, "certfile": cert, "keyfile": key}
    running = await start_http(mikros_service, tmp_path, http=http)
    verify = ssl.create_default_context(cafile=str(ca))
    async with httpx.AsyncClient(
        base_url=url(running, "", scheme="https"), verify=verify, trust_env=False
    ) as client:
        with trio.fail_after(BOUND):
            big = await client.get("/hello", headers={"X-Filler": "a" * 5000})
            small = await client.get("/hello")
    assert big.status_code == 431
    assert small.status_code == 200


async def test_max_header_bytes_over_http2_is_refused(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """HTTP/2 refuses a header block over the limit: 431 on its stream, or, once the client
    has our SETTINGS (HPACK then stops decoding it), GOAWAY ENHANCE_YOUR_CALM.
    """
    running = await start_http(mikros_service, tmp_path, http={"max_header_bytes": 4096})
    body, summary = await curl("--http2-prior-knowledge", url(running, "/hello"))
    assert (body, summary) == ("hello", "2 200")
    for filler in (5000, 70_000):
        async with client_for(running, http1=False, http2=True) as client:
            outcome = await _refusal(client, filler)
        assert outcome in {"431", "error_code:11"}, outcome  # 11: ENHANCE_YOUR_CALM


async def _refusal(client: httpx.AsyncClient, filler: int) -> str:
    """The status of a GET with a ``filler``-byte header, or the connection error's code."""
    try:
        with trio.fail_after(BOUND):
            response = await client.get("/hello", headers={"X-Filler": "a" * filler})
    except httpx.RemoteProtocolError as error:
        return "error_code:11" if "error_code:11" in str(error) else str(error)
    return str(response.status_code)
