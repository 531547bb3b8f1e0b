"""The HTTP kind's transport: body limits, malformed input, timeouts, keep-alive, h2c and TLS.

Raw sockets where the bytes on the wire are the point (they also show
when the server closes a connection: reading returns end-of-file); httpx
and curl as real clients otherwise.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from helpers import BOUND, client_for, curl, raw_exchange, tls_files, url
from helpers import http_port as port
from helpers import start_http as start
from mikros_trio.testing import RunningService, ServiceStarter


async def exchange(running: RunningService, data: bytes) -> tuple[bytes, float]:
    return await raw_exchange(port(running), data)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


async def test_declared_oversize_body_is_413_and_the_connection_closes(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Content-Length over max_body_size is answered 413 JSON at once and the connection closed."""
    running = await start(mikros_service, tmp_path, http={"max_body_size": 1024})
    raw, _ = await exchange(
        running, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert status_of(raw) == 413
    assert b"connection: close" in head.lower()
    assert b"content-type: application/json" in head.lower()
    assert body == b'{"code":0,"kind":"ValidationError","message":"request body over 1024 bytes"}'
    # Exactly the limit is fine.
    async with client_for(running) as client:
        with trio.fail_after(BOUND):
            at_limit = await client.post("/echo", content=b"x" * 1024)
    assert (at_limit.status_code, at_limit.json()) == (200, {"length": 1024})


async def test_chunked_body_over_the_limit_is_413(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A chunked body (no Content-Length) that grows past max_body_size while read gets 413."""
    running = await start(mikros_service, tmp_path, http={"max_body_size": 1024})

    async def chunks(count: int) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield b"x" * 512

    async with client_for(running) as client:
        with trio.fail_after(BOUND):
            under = await client.post("/echo", content=chunks(2))
            over = await client.post("/echo", content=chunks(4))
    assert under.request.headers["transfer-encoding"] == "chunked"
    assert (under.status_code, under.json()) == (200, {"length": 1024})
    assert over.request.headers["transfer-encoding"] == "chunked"
    assert over.status_code == 413
    assert over.json()["kind"] == "ValidationError"


async def test_declared_oversize_body_over_http2_is_413_and_the_connection_lives(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Over HTTP/2 a Content-Length over max_body_size gets 413 JSON; the connection serves on."""
    running = await start(mikros_service, tmp_path, http={"max_body_size": 1024})
    async with client_for(running, http1=False, http2=True) as client:
        with trio.fail_after(BOUND):
            over = await client.post("/echo", content=b"x" * 2000)
            after = await client.post("/echo", content=b"x" * 1024)
    assert (over.http_version, over.status_code) == ("HTTP/2", 413)
    # The front's Connection: close is HTTP/1.1's; h2 strips it from HTTP/2 headers.
    assert "connection" not in over.headers
    assert over.json() == {
        "code": 0,
        "kind": "ValidationError",
        "message": "request body over 1024 bytes",
    }
    assert (after.status_code, after.json()) == (200, {"length": 1024})


@pytest.mark.parametrize(
    "garbage",
    [b"GARBAGE\r\n\r\n", b"GET /hello HTTP/1.1\r\nHost: t\r\nBad Header Line\r\n\r\n"],
    ids=["request-line", "header-line"],
)
async def test_malformed_http_is_400_and_closed_while_others_are_served(
    mikros_service: ServiceStarter, tmp_path: Path, garbage: bytes
) -> None:
    """Malformed HTTP gets 400 and a closed connection; a concurrent request elsewhere is served."""
    running = await start(mikros_service, tmp_path)
    app = running.container.app()
    other: list[httpx.Response] = []
    async with trio.open_nursery() as nursery:

        async def concurrent() -> None:
            async with client_for(running) as client:
                other.append(await client.get("/slow?seconds=0.3"))

        nursery.start_soon(concurrent)
        with trio.fail_after(BOUND):
            await app.entered.wait()
        raw, _ = await exchange(running, garbage)
        assert not other, "the other request was in flight throughout"
    assert status_of(raw) == 400
    assert b"connection: close" in raw.lower()
    assert other[0].status_code == 200
    assert running.health.ready


async def test_read_timeout_closes_a_stalled_request(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A client that stops sending mid-request is disconnected after read_timeout."""
    running = await start(
        mikros_service, tmp_path, http={"read_timeout": 1.0, "keep_alive_timeout": 5.0}
    )
    raw, took = await exchange(running, b"GET /hello HTTP/1.1\r\nHost: t\r\n")
    assert raw == b""
    assert 0.9 <= took < 2.0


async def test_read_timeout_closes_a_stalled_body(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A client that stops sending in the middle of a declared body is cut after read_timeout."""
    running = await start(
        mikros_service, tmp_path, http={"read_timeout": 1.0, "keep_alive_timeout": 5.0}
    )
    raw, took = await exchange(
        running, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    )
    assert b" 200 " not in raw
    assert 0.9 <= took < 2.0


async def test_read_timeout_is_per_wait_not_per_body(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A slow but steady upload, longer in total than read_timeout, is received whole."""
    running = await start(
        mikros_service, tmp_path, http={"read_timeout": 0.5, "keep_alive_timeout": 5.0}
    )

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 100
            await trio.sleep(0.25)

    async with client_for(running) as client:
        with trio.fail_after(BOUND):
            response = await client.post("/echo", content=trickle())
    assert (response.status_code, response.json()) == (200, {"length": 500})


async def test_read_timeout_does_not_cut_a_slow_handler(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """read_timeout bounds waiting for the client, not a handler working on a complete request."""
    running = await start(
        mikros_service, tmp_path, http={"read_timeout": 0.5, "keep_alive_timeout": 5.0}
    )
    async with client_for(running) as client:
        with trio.fail_after(BOUND):
            response = await client.get("/slow?seconds=1.2")
    assert response.status_code == 200
    assert running.container.app().finished == 1


async def test_keep_alive_timeout_closes_an_idle_connection(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """After a complete exchange, an idle connection is closed after keep_alive_timeout."""
    running = await start(
        mikros_service, tmp_path, http={"keep_alive_timeout": 1.0, "read_timeout": 10.0}
    )
    raw, took = await exchange(running, b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status_of(raw) == 200
    assert raw.endswith(b"\r\n\r\nhello")
    assert b"connection: close" not in raw.lower()
    assert 0.9 <= took < 2.0


async def test_http11_keep_alive_reuses_the_connection(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Sequential and pipelined HTTP/1.1 requests share one connection."""
    running = await start(mikros_service, tmp_path)
    async with client_for(running) as client:
        with trio.fail_after(BOUND):
            first = await client.get("/slow?seconds=0")
            second = await client.get("/slow?seconds=0")
    assert first.http_version == "HTTP/1.1"
    assert first.json()["client_port"] == second.json()["client_port"]
    # Two pipelined requests on one raw connection: two responses, in order.
    stream = await trio.open_tcp_stream("127.0.0.1", port(running))
    async with stream:
        request = b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"
        await stream.send_all(request + request.replace(b"/hello", b"/readyz"))
        received = b""
        with trio.fail_after(BOUND):
            while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"}"):
                chunk = await stream.receive_some(65536)
                assert chunk, f"closed early after {received!r}"
                received += chunk
    assert received.index(b"hello") < received.index(b'{"status":"ready"}')


@pytest.mark.parametrize("mode", ["--http2", "--http2-prior-knowledge"])
async def test_h2c_on_the_plain_port(
    mikros_service: ServiceStarter, tmp_path: Path, mode: str
) -> None:
    """curl's h2c Upgrade and prior-knowledge HTTP/2 both get HTTP/2 200 on the plain port."""
    running = await start(mikros_service, tmp_path)
    body, summary = await curl(mode, url(running, "/hello"))
    assert (body, summary) == ("hello", "2 200")
    body, summary = await curl(mode, url(running, "/readyz"))
    assert (body, summary) == ('{"status":"ready"}', "2 200")


async def test_httpx_http2_prior_knowledge(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """httpx with HTTP/2 prior knowledge (no TLS) is served: several streams, one connection."""
    running = await start(mikros_service, tmp_path)
    async with client_for(running, http1=False, http2=True) as client:
        responses: list[httpx.Response] = []

        async def call() -> None:
            responses.append(await client.get("/slow?seconds=0.1"))

        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(call)
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["client_port"] for r in responses}) == 1


@pytest.fixture(name="tls")
def fixture_tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1: (ca, cert, key)."""
    return tls_files(tmp_path)


async def test_tls_with_httpx_http1_and_http2(
    mikros_service: ServiceStarter, tmp_path: Path, tls: tuple[Path, Path, Path]
) -> None:
    """With certfile and keyfile the port speaks TLS; ALPN picks HTTP/2 or HTTP/1.1 per client."""
    ca, cert, key = tls
    running = await start(mikros_service, tmp_path, http={"certfile": cert, "keyfile": key})
    verify = ssl.create_default_context(cafile=str(ca))
    base = url(running, "", scheme="https")
    for http2, version in ((False, "HTTP/1.1"), (True, "HTTP/2")):
        async with httpx.AsyncClient(
            base_url=base, verify=verify, http2=http2, trust_env=False
        ) as client:
            with trio.fail_after(BOUND):
                hello = await client.get("/hello")
                ready = await client.get("/readyz")
        assert (hello.status_code, hello.text, hello.http_version) == (200, "hello", version)
        assert ready.status_code == 200
    # Plain HTTP on the TLS port gets no HTTP answer.
    async with client_for(running) as plain:
        with trio.fail_after(BOUND), pytest.raises(httpx.TransportError):
            await plain.get("/hello")
    # And an unknown CA is refused by a verifying client.
    async with httpx.AsyncClient(base_url=base, trust_env=False) as untrusting:
        with trio.fail_after(BOUND), pytest.raises(httpx.ConnectError):
            await untrusting.get("/hello")


@pytest.mark.parametrize(("mode", "version"), [("--http1.1", "1.1"), ("--http2", "2")])
async def test_tls_with_curl(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    tls: tuple[Path, Path, Path],
    mode: str,
    version: str,
) -> None:
    """curl --cacert reaches the TLS port over HTTP/1.1 and HTTP/2 (ALPN)."""
    ca, cert, key = tls
    running = await start(mikros_service, tmp_path, http={"certfile": cert, "keyfile": key})
    body, summary = await curl(mode, "--cacert", str(ca), url(running, "/hello", scheme="https"))
    assert (body, summary) == ("hello", f"{version} 200")
