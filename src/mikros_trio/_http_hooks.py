"""What the HTTP kind puts between its front and the app, each only when configured.

From the outside in, as Go Mikros chains them: CORS (``[runtime.http]
cors_*``), then the auth hook (``auth``, unless ``disable_auth``), then the
base path (``base_path``). Each is an ASGI layer made at start; a service
that configures none of them calls its app directly, so the request path
pays nothing for what it does not use.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._http_apps import _Answers, send_json, wire_for_status
from ._runtime_settings import HttpSettings
from .errors import PermissionDeniedError, ServiceError

__all__ = ["IDENTITY", "Auth", "AuthRequest", "BasePath", "Cors"]

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

#: The key of ``scope["state"]`` holding what the auth hook returned
#: (Starlette and FastAPI: ``request.state.identity``).
IDENTITY = "identity"


class BasePath:
    """Serve the app under ``base_path``: the prefix goes into ``root_path``, other paths get 404.

    The path stays whole, as Quart and Starlette expect (they route on the
    part after ``root_path`` and build URLs with it); the prefix must end at
    a segment boundary (``/api`` does not serve ``/apiary``).
    """

    __slots__ = ("_app", "_base", "_under")

    def __init__(self, app: ASGIApp, base: str) -> None:
        self._app = app
        self._base = base
        self._under = base + "/"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            return await self._app(scope, receive, send)
        path = scope["path"]
        if path != self._base and not path.startswith(self._under):
            if kind == "http":
                message = f"no route here: this service is served under {self._base}"
                return await send_json(send, 404, wire_for_status(404, message))
            await send({"type": "websocket.close", "code": 1008})
            return None
        scope["root_path"] = self._base
        return await self._app(scope, receive, send)


class Cors:
    """Cross-origin resource sharing from ``[runtime.http] cors_*``, as Go Mikros answers it.

    A request without ``Origin`` passes untouched. A preflight (``OPTIONS``
    with ``Access-Control-Request-Method``) is answered here, 204, and never
    reaches the auth hook or the app. Any other request from an allowed
    origin gets the allow headers added to its response; one from an origin
    not allowed gets no CORS header at all (only ``Vary: Origin``), so the
    browser keeps the response from the page.
    """

    __slots__ = (
        "_any",
        "_app",
        "_credentials",
        "_expose",
        "_headers",
        "_max_age",
        "_methods",
        "_origins",
    )

    def __init__(self, app: ASGIApp, settings: HttpSettings) -> None:
        self._app = app
        origins = settings.cors_allowed_origins
        self._origins = frozenset(origin.encode() for origin in origins)
        self._any = "*" in origins
        self._credentials = settings.cors_allow_credentials
        self._methods = ",".join(settings.cors_allowed_methods).encode()
        self._headers = ",".join(settings.cors_allowed_headers).encode()
        self._expose = ",".join(settings.cors_exposed_headers).encode()
        self._max_age = b"%d" % settings.cors_max_age if settings.cors_max_age else b""

    def _allowed(self, origin: bytes) -> bytes | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, or None if not allowed."""
        if self._any and not self._credentials:
            return b"*"
        return origin if origin in self._origins else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        origin = asks_method = asks_headers = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = origin or value
            elif name == b"access-control-request-method":
                asks_method = value
            elif name == b"access-control-request-headers":
                asks_headers = value
        if origin is None:
            return await self._app(scope, receive, send)
        allowed = self._allowed(origin)
        extra = [(b"vary", b"Origin")]
        if allowed is not None:
            extra.append((b"access-control-allow-origin", allowed))
            if self._credentials:
                extra.append((b"access-control-allow-credentials", b"true"))
        if scope["method"] == "OPTIONS" and asks_method is not None:
            return await self._preflight(send, extra, allowed is not None, asks_headers)
        if allowed is None:
            return await self._app(scope, receive, _with_headers(send, extra))
        if self._expose:
            extra.append((b"access-control-expose-headers", self._expose))
        return await self._app(scope, receive, _with_headers(send, extra))

    async def _preflight(
        self,
        send: Any,
        headers: list[tuple[bytes, bytes]],
        allowed: bool,
        asks_headers: bytes | None,
    ) -> None:
        headers.append((b"vary", b"Access-Control-Request-Method, Access-Control-Request-Headers"))
        if allowed:
            headers.append((b"access-control-allow-methods", self._methods))
            allow_headers = self._headers or asks_headers
            if allow_headers:
                headers.append((b"access-control-allow-headers", allow_headers))
            if self._max_age:
                headers.append((b"access-control-max-age", self._max_age))
        headers.append((b"content-length", b"0"))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _with_headers(send: Any, extra: Sequence[tuple[bytes, bytes]]) -> Any:
    """``send``, adding ``extra`` to the response's head."""

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *extra]
        await send(message)

    return sending


class AuthRequest:
    """What the auth hook sees of a request (HTTP or WebSocket), before the app runs.

    The hook is ``[runtime.http] auth``, a container provider whose value is
    called as ``hook(request)`` (sync or async) for every request but
    probes, metrics and CORS preflights. It returns the caller's identity
    (any object but None), which the app reads as
    ``scope["state"]["identity"]`` (Starlette and FastAPI:
    ``request.state.identity``); returns None for a request that says who it
    is not (401, a Mikros ``PermissionError`` body and ``WWW-Authenticate``);
    or raises a :class:`~mikros_trio.ServiceError` to refuse with that
    error's status and body (``PermissionDeniedError``: 403). Any other
    exception is a 500, logged. Example::

        def bearer(request: AuthRequest) -> str | None:
            token = request.header("authorization")
            return users.get(token.removeprefix("Bearer ")) if token else None
    """

    __slots__ = ("scope",)

    def __init__(self, scope: dict[str, Any]) -> None:
        #: The ASGI scope, for what the properties below do not give.
        self.scope = scope

    @property
    def method(self) -> str:
        """The request method (``GET`` for a WebSocket handshake)."""
        method: str = self.scope.get("method", "GET")
        return method

    @property
    def path(self) -> str:
        """The whole path, base path included."""
        path: str = self.scope["path"]
        return path

    @property
    def query_string(self) -> bytes:
        query: bytes = self.scope.get("query_string", b"")
        return query

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The raw headers, names lower-case, in the order they came."""
        headers: list[tuple[bytes, bytes]] = self.scope["headers"]
        return headers

    @property
    def client(self) -> tuple[str, int] | None:
        client: tuple[str, int] | None = self.scope.get("client")
        return client

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), decoded as Latin-1, or None."""
        wanted = name.lower().encode("latin-1")
        for key, value in self.scope["headers"]:
            if key == wanted:
                return str(value.decode("latin-1"))
        return None


class Auth:
    """The auth hook before the app (see :class:`AuthRequest` for its contract)."""

    __slots__ = ("_answers", "_app", "_challenge", "_hook")

    def __init__(self, app: ASGIApp, hook: Callable[[AuthRequest], Any], answers: _Answers):
        self._app = app
        self._hook = hook
        self._answers = answers
        # RFC 9110 15.5.2: a 401 says how to authenticate; the hook may say
        # (a ``challenge`` attribute), else a bearer token is asked for.
        challenge = getattr(hook, "challenge", "Bearer")
        self._challenge = str(challenge).encode("latin-1")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await self._app(scope, receive, send)
        extra: list[tuple[bytes, bytes]] = []
        try:
            identity = self._hook(AuthRequest(scope))
            if inspect.isawaitable(identity):
                identity = await identity
        except ServiceError as error:
            body, status = self._answers.service_error(error)
        except Exception as error:
            body, status = self._answers.unexpected(error)
        else:
            if identity is not None:
                # A fresh state per request: hypercorn hands every request
                # of a connection the same one, and an identity must never
                # outlive its request.
                scope["state"] = {**scope.get("state", {}), IDENTITY: identity}
                return await self._app(scope, receive, send)
            body, _ = self._answers.service_error(PermissionDeniedError("authentication required"))
            status = 401
            extra.append((b"www-authenticate", self._challenge))
        if scope["type"] != "http":
            # A refused WebSocket handshake: closed before it is accepted,
            # which the server answers 403.
            await send({"type": "websocket.close", "code": 1008})
            return None
        return await send_json(_with_headers(send, extra) if extra else send, status, body)
