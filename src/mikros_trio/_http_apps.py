"""The apps the HTTP kind serves: how each kind of ASGI app answers errors as Mikros JSON.

Three shapes of app, told apart by their class (nothing is imported to tell):

* a Quart (QuartTrio) app gets error handlers registered on it (its own,
  more specific handlers still win), its calls named by route rule, and
  Quart's body limits set from ``[runtime.http]``;
* a Starlette app (FastAPI is one) gets exception handlers registered the
  same way, and a thin wrapper that names calls by route template, bounds a
  request body the front could not (a chunked one) and its whole-body time,
  and keeps a BaseException from reaching the server unanswered;
* any other ASGI 3 callable gets only that wrapper's last duty.

Everything here is what the kind needs from the app; the connection
handling lives in :mod:`mikros_trio.http`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import trio

from ._error_wire import masked_wire, unexpected_error, wire_error
from ._runtime_settings import HttpSettings
from ._telemetry import UNMATCHED, Telemetry, current_call
from ._validation import invalid_request
from .errors import ErrorKind, ServiceError

__all__ = [
    "HTTP_STATUS",
    "adapt_app",
    "install_error_handlers",
    "is_cancellation",
    "json_bytes",
    "send_json",
    "wire_for_status",
]

# The kind's logger: handler errors are the HTTP kind's log lines.
log = logging.getLogger("mikros_trio.http")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

#: HTTP status for each Mikros error kind.
HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.VALIDATION: 400,
    ErrorKind.PERMISSION: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONDITION: 412,
    ErrorKind.INTERNAL: 500,
    ErrorKind.RPC: 500,
    ErrorKind.CUSTOM: 500,
}


def is_cancellation(error: BaseException) -> bool:
    """True for Trio's Cancelled, alone or grouped (QuartTrio's request nursery groups it)."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[1] is None
    return isinstance(error, trio.Cancelled)


def wire_for_status(status: int, message: str) -> dict[str, Any]:
    """The Mikros error body for a plain HTTP error status."""
    kind = {
        403: ErrorKind.PERMISSION,
        404: ErrorKind.NOT_FOUND,
        412: ErrorKind.CONDITION,
    }.get(status, ErrorKind.VALIDATION if status < 500 else ErrorKind.INTERNAL)
    return {"code": 0, "kind": kind.value, "message": message}


class _Answers:
    """The Mikros answer to each kind of error, whatever the framework: (body, status).

    Each also records the error on the current call, so the access log,
    metrics and traces see what the client got.
    """

    __slots__ = ("hub", "service_name")

    def __init__(self, service_name: str, hub: Telemetry) -> None:
        self.service_name = service_name
        self.hub = hub

    def service_error(self, error: ServiceError) -> tuple[dict[str, Any], int]:
        call = current_call()
        if call is not None:
            call.error_kind = error.kind
            call.error = error
        return wire_error(error, self.service_name, self.hub), HTTP_STATUS[error.kind]

    def http_error(self, status: int, message: str) -> tuple[dict[str, Any], int]:
        # abort(403, description) text is the handler's: it may quote a secret.
        return masked_wire(wire_for_status(status, message), self.hub), status

    def unexpected(self, error: BaseException) -> tuple[dict[str, Any], int]:
        log.error("unhandled error in an HTTP handler", exc_info=error)
        call = current_call()
        if call is not None:
            call.error_kind = ErrorKind.INTERNAL
            call.error = error
        internal = unexpected_error(error, self.hub)
        return wire_error(internal, self.service_name, self.hub), 500


def json_bytes(body: Any) -> bytes:
    """``body`` as compact JSON, the form every answer of the kind takes."""
    return json.dumps(body, separators=(",", ":")).encode()


async def send_json(send: Any, status: int, body: Any, *, close: bool = False) -> None:
    """Answer with ``body`` as JSON, whole; ``close`` adds ``Connection: close``."""
    payload = json_bytes(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def install_error_handlers(app: Any, service_name: str, telemetry: Telemetry | None = None) -> None:
    """Make a Quart ``app`` answer every error with Mikros JSON, and name calls by route (once).

    Registered on the user's Quart app so its own, more specific handlers
    still win. ``telemetry`` (the service's hub) decides whether an
    unexpected error's text is sent (``[features.errors] expose_details``)
    and masks secrets in what is.
    """
    if getattr(app, "_mikros_trio_errors", False):
        return
    from quart import has_request_context, has_websocket_context, request
    from werkzeug.exceptions import HTTPException

    answers = _Answers(service_name, telemetry or Telemetry(service_name))

    async def service_error(error: ServiceError) -> tuple[dict[str, Any], int]:
        return answers.service_error(error)

    async def http_error(error: HTTPException) -> tuple[dict[str, Any], int]:
        return answers.http_error(error.code or 500, error.description or error.name)

    async def unexpected(error: BaseException) -> tuple[dict[str, Any], int]:
        return answers.unexpected(error)

    handle_user_exception = app.handle_user_exception

    async def handle_user_exception_raised(error: Exception) -> Any:
        # A handler turning an error into another (a lookup failure into
        # NotFoundError) raises it from inside Quart's error handling,
        # which answered that as a 500. It is handled as if the route had
        # raised it, once: a handler failing again still ends as a 500.
        try:
            return await handle_user_exception(error)
        except Exception as raised:
            if raised is error:
                raise
            return await handle_user_exception(raised)

    handle_request = app.handle_request

    async def handle_request_or_fail(request: Any) -> Any:
        # Quart handles Exception only: SystemExit, KeyboardInterrupt or
        # another BaseException from a handler reached hypercorn, whose
        # client got an empty 500. Any but Trio's cancellation fails this
        # request only, as an Exception does.
        try:
            return await handle_request(request)
        except BaseException as error:
            if isinstance(error, Exception) or is_cancellation(error):
                raise
            body, status = answers.unexpected(error)
            return app.response_class(
                json_bytes(body), status=status, content_type="application/json"
            )

    log_exception = app.log_exception

    def log_request_exception(exc_info: Any) -> None:
        # Quart logs a failing before_serving or after_serving as a bare
        # "Exception" line before re-raising it; the kind reports that
        # failure itself, its root cause first. Request errors still pass.
        if has_request_context() or has_websocket_context():
            log_exception(exc_info)

    async def name_call() -> None:
        # The route rule, not the path: a bounded label for metrics and
        # span names. Runs before any other hook, even when nothing matched.
        call = current_call()
        if call is not None:
            rule = request.url_rule
            call.name = rule.rule if rule is not None else UNMATCHED

    app.register_error_handler(ServiceError, service_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
    schema = sys.modules.get("quart_schema.validation")
    if schema is not None:
        # Loaded only by an app that declares models with quart-schema;
        # its failure is a BadRequest whose description names no field.
        async def invalid(error: Any) -> tuple[dict[str, Any], int]:
            return answers.service_error(invalid_request(error.validation_error))

        app.register_error_handler(schema.RequestSchemaValidationError, invalid)
    app.handle_user_exception = handle_user_exception_raised
    app.before_request_funcs.setdefault(None, []).insert(0, name_call)
    app.handle_request = handle_request_or_fail
    app.log_exception = log_request_exception
    app._mikros_trio_errors = True


#: Set on an exception our Starlette handler answered: Starlette's outermost
#: middleware re-raises it (for a server to log), and the log line is ours.
_ANSWERED = "_mikros_trio_answered"


class _Refused(Exception):
    """A request body refused by :class:`_BodyReader` (over the limit, or too slow)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _BodyReader:
    """One request's ``receive``, bounding its body's size and the time the whole body takes.

    The front refuses a declared Content-Length over the limit before the
    app runs; a chunked body declares nothing, so it is counted here. The
    deadline starts at the app's first read and is checked as each part
    arrives, not with a cancel scope around each wait: the connection's
    read_timeout already bounds every wait, so a trickling body is cut at
    most one read_timeout past body_timeout, and a body read at once (the
    common case) costs no scope: a scope per read was most of what the
    adaptation added to a small Starlette POST (bench/quart_cost.py). Once the body is
    whole, ``receive`` waits for the disconnect, unbounded.
    """

    __slots__ = ("_deadline", "_done", "_left", "_max_body", "_receive", "_refuse", "_timeout")

    def __init__(
        self,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        settings: HttpSettings,
        refuse: Callable[[int, str], Exception],
    ) -> None:
        self._receive = receive
        self._max_body = self._left = settings.max_body_size
        self._timeout = settings.body_timeout
        self._deadline: float | None = None
        self._done = False
        self._refuse = refuse

    async def receive(self) -> dict[str, Any]:
        if self._done:
            return await self._receive()
        if self._deadline is None:
            self._deadline = trio.current_time() + self._timeout
        message = await self._receive()
        if message["type"] != "http.request":
            self._done = True
            return message
        self._left -= len(message.get("body", b""))
        if self._left < 0:
            raise self._refuse(413, f"request body over {self._max_body} bytes")
        if not message.get("more_body", False):
            self._done = True
        elif trio.current_time() > self._deadline:
            raise self._refuse(408, f"request body not received within {self._timeout:g} s")
        return message


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """True when a request says a body follows (a Content-Length above 0, or chunked)."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


class _Served:
    """An ASGI app other than Quart, as the kind serves it.

    Per request it costs one call and, when a body follows, one
    :class:`_BodyReader`; errors are answered by the handlers registered on
    a Starlette app, and here only for what escapes them (a BaseException,
    or any error of an app that is not Starlette's).
    """

    __slots__ = ("_answers", "_names", "_refuse", "_settings", "app")

    def __init__(
        self,
        app: ASGIApp,
        answers: _Answers,
        settings: HttpSettings,
        refuse: Callable[[int, str], Exception],
        *,
        names: bool,
    ) -> None:
        self.app = app
        self._answers = answers
        self._settings = settings
        self._refuse = refuse
        self._names = names

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)  # lifespan, websocket
        if _has_body(scope["headers"]):
            receive = _BodyReader(receive, self._settings, self._refuse).receive
        try:
            await self.app(scope, receive, send)
        except BaseException as error:
            if getattr(error, _ANSWERED, False):
                return None
            if is_cancellation(error):
                raise
            if isinstance(error, _Refused):
                body, status = self._answers.http_error(error.status, str(error))
                close = True
            else:
                body, status = self._answers.unexpected(error)
                close = False
            if not await _try_answer(send, status, body, close=close):
                raise
        finally:
            if self._names:
                _name_by_route(scope)
        return None


async def _try_answer(send: Any, status: int, body: dict[str, Any], *, close: bool) -> bool:
    """Send a whole JSON answer; False if the response had already started (or the peer left)."""
    try:
        await send_json(send, status, body, close=close)
    except Exception:
        return False
    return True


def _name_by_route(scope: dict[str, Any]) -> None:
    """Name the current call by the route template Starlette matched (``/orders/{id}``)."""
    call = current_call()
    if call is not None and not call.name:
        route = scope.get("route")
        path = getattr(route, "path", None)
        call.name = path if isinstance(path, str) and path else UNMATCHED


def _is_fastapi_default(handler: Any) -> bool:
    return getattr(handler, "__module__", "") == "fastapi.exception_handlers"


def _install_starlette_handlers(app: Any, answers: _Answers) -> Callable[[int, str], Exception]:
    """Register Mikros answers on a Starlette (or FastAPI) app; return how to refuse a body.

    A handler the user registered for the same key is kept (FastAPI's
    defaults are not the user's: they are replaced).
    """
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response

    def respond(answer: tuple[dict[str, Any], int], headers: Any = None) -> Response:
        body, status = answer
        return Response(json_bytes(body), status, headers, media_type="application/json")

    async def service_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ServiceError)
        return respond(answers.service_error(error))

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return respond(answers.http_error(error.status_code, error.detail), error.headers)

    async def unexpected(request: Request, error: Exception) -> Response:
        # Starlette re-raises this error once answered: mark it so the
        # wrapper knows it has been logged and answered.
        with suppress(AttributeError):
            setattr(error, _ANSWERED, True)
        # What reaches this last handler unanswered but is a Mikros or HTTP
        # error was raised by another handler (one turning an error into
        # NotFoundError) or a middleware: it is answered as itself.
        if isinstance(error, ServiceError):
            return await service_error(request, error)
        if isinstance(error, HTTPException):
            return await http_error(request, error)
        return respond(answers.unexpected(error))

    handlers: dict[Any, Any] = {
        ServiceError: service_error,
        HTTPException: http_error,
        Exception: unexpected,
    }
    if _is_fastapi_default(app.exception_handlers.get(HTTPException)):
        from fastapi.exceptions import RequestValidationError

        async def invalid(request: Request, error: Exception) -> Response:
            assert isinstance(error, RequestValidationError)
            # FastAPI's own status for it, 422, is kept: its clients and
            # its OpenAPI document expect it.
            body, _ = answers.service_error(invalid_request(error))
            return respond((body, 422))

        handlers[RequestValidationError] = invalid
    existing = app.exception_handlers
    for key, handler in handlers.items():
        current = existing.get(key)
        if current is None or _is_fastapi_default(current):
            existing[key] = handler
    # The middleware stack holds the handlers it was built with: rebuild it.
    app.middleware_stack = None

    def refuse(status: int, message: str) -> Exception:
        # Raised from ``receive`` inside the app, so its own handlers
        # answer it; the connection closes, the rest of the body unread.
        return HTTPException(status, message, headers={"connection": "close"})

    return refuse


def _inline_request_handler(app: Any) -> None:
    """Run a QuartTrio request's handler in the request's own task, not in a task of its own.

    QuartTrio spawns two tasks per request into a nursery of its own: one
    reads the body and waits for a disconnect, one runs the handler; each
    cancels the nursery when done. Running the handler as the nursery's
    body instead keeps every behaviour (the reader still cancels it on a
    disconnect, its errors are grouped the same way, it still cancels the
    reader when done) and saves one task spawn and its steps per request
    (see bench/quart_cost.py). An app with its own connection class keeps it.
    """
    from quart_trio.asgi import TrioASGIHTTPConnection

    if app.asgi_http_class is TrioASGIHTTPConnection:
        app.asgi_http_class = _inline_connection_class()


@functools.cache
def _inline_connection_class() -> type[Any]:
    """QuartTrio's HTTP connection, its handler run in the request's task (built once)."""
    from quart.wrappers.response import DataBody, Response
    from quart_trio.asgi import TrioASGIHTTPConnection

    from ._http_h11 import SEND_SLICE

    class InlineHTTPConnection(TrioASGIHTTPConnection):
        async def __call__(self, receive: Any, send: Any) -> None:
            request = self._create_request_from_scope(send)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.handle_messages, nursery, request, receive)
                await self.handle_request(nursery, request, send)

        async def handle_request(  # type: ignore[override]  # as QuartTrio's own
            self, nursery: trio.Nursery, request: Any, send: Any
        ) -> None:
            # As QuartTrio's, but a response whose body is in memory and at
            # most one write is sent without Quart's RESPONSE_TIMEOUT scope
            # when that timeout is no shorter than send_timeout: the kind
            # already bounds that one write by send_timeout, so the scope
            # could never fire first, and it cost a cancel scope a request.
            response = await self.app.handle_request(request)
            if isinstance(response, Response) and response.timeout != Ellipsis:
                timeout = response.timeout
            else:
                timeout = self.app.config["RESPONSE_TIMEOUT"]
            body = getattr(response, "response", None)
            bounded = (
                isinstance(body, DataBody)
                and len(body.data) <= SEND_SLICE
                and timeout is not None
                and timeout >= getattr(self.app, "_mikros_trio_send_timeout", math.inf)
            )
            if timeout is None or bounded:
                await self._send_response(send, response)
            else:
                with trio.move_on_after(timeout):
                    await self._send_response(send, response)
            nursery.cancel_scope.cancel()

    return InlineHTTPConnection


def _framework(app: Any) -> str:
    """``quart``, ``starlette`` (FastAPI too) or ``asgi``, from the app's classes' modules."""
    for cls in type(app).__mro__:
        module = cls.__module__
        if module == "quart.app":
            return "quart"
        if module == "starlette.applications":
            return "starlette"
    return "asgi"


def adapt_app(app: Any, settings: HttpSettings, service_name: str, telemetry: Telemetry) -> Any:
    """Prepare the container's app to be served: Mikros errors, call names, body limits."""
    framework = _framework(app)
    if framework == "quart":
        install_error_handlers(app, service_name, telemetry)
        _inline_request_handler(app)
        app._mikros_trio_send_timeout = settings.send_timeout
        app.config["MAX_CONTENT_LENGTH"] = settings.max_body_size
        # Quart's whole-body deadline (408): read_timeout bounds each
        # wait, so without it a body trickling a byte at a time would
        # hold a handler for Quart's default 60 s.
        app.config["BODY_TIMEOUT"] = settings.body_timeout
        return app
    answers = _Answers(service_name, telemetry)
    if framework == "starlette":
        refuse = _install_starlette_handlers(app, answers)
        return _Served(app, answers, settings, refuse, names=True)
    return _Served(app, answers, settings, _Refused, names=False)
