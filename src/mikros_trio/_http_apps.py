"""The apps the HTTP kind serves: how each kind of ASGI app answers errors as Mikros JSON.

A QuartTrio app gets error handlers registered on it (its own, more
specific handlers still win), its calls named by route rule, and Quart's
body limits set from ``[runtime.http]``. Everything here is what the kind
needs from the app; the connection handling lives in :mod:`mikros_trio.http`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio

from ._runtime_settings import HttpSettings
from ._telemetry import UNMATCHED, Telemetry, current_call
from ._wire import masked_wire, unexpected_error, wire_error
from .errors import ErrorKind, ServiceError

__all__ = [
    "HTTP_STATUS",
    "adapt_app",
    "install_error_handlers",
    "is_cancellation",
    "wire_for_status",
]

# The kind's logger: handler errors are the HTTP kind's log lines.
log = logging.getLogger("mikros_trio.http")

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


def install_error_handlers(app: Any, service_name: str, telemetry: Telemetry | None = None) -> None:
    """Make ``app`` answer every error with Mikros JSON, and name calls by route (once per app).

    Registered on the user's Quart app so its own, more specific handlers
    still win. ``telemetry`` (the service's hub) decides whether an
    unexpected error's text is sent (``[features.errors] expose_details``)
    and masks secrets in what is.
    """
    if getattr(app, "_mikros_trio_errors", False):
        return
    from quart import has_request_context, has_websocket_context, request
    from werkzeug.exceptions import HTTPException

    hub = telemetry or Telemetry(service_name)

    async def service_error(error: ServiceError) -> tuple[dict[str, Any], int]:
        call = current_call()
        if call is not None:
            call.error_kind = error.kind
            call.error = error
        return wire_error(error, service_name, hub), HTTP_STATUS[error.kind]

    async def http_error(error: HTTPException) -> tuple[dict[str, Any], int]:
        status = error.code or 500
        # abort(403, description) text is the handler's: it may quote a secret.
        return masked_wire(wire_for_status(status, error.description or error.name), hub), status

    async def unexpected(error: BaseException) -> tuple[dict[str, Any], int]:
        log.error("unhandled error in an HTTP handler", exc_info=error)
        call = current_call()
        if call is not None:
            call.error_kind = ErrorKind.INTERNAL
            call.error = error
        return wire_error(unexpected_error(error, hub), service_name, hub), 500

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
            body, status = await unexpected(error)
            return app.response_class(
                json.dumps(body, separators=(",", ":")),
                status=status,
                content_type="application/json",
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
    app.before_request_funcs.setdefault(None, []).insert(0, name_call)
    app.handle_request = handle_request_or_fail
    app.log_exception = log_request_exception
    app._mikros_trio_errors = True


def adapt_app(app: Any, settings: HttpSettings, service_name: str, telemetry: Telemetry) -> Any:
    """Prepare the container's app to be served: Mikros errors, call names, body limits."""
    if not hasattr(app, "register_error_handler"):
        return app  # a plain ASGI callable: the HTTP path answers its failures
    install_error_handlers(app, service_name, telemetry)
    if hasattr(app, "config"):
        app.config["MAX_CONTENT_LENGTH"] = settings.max_body_size
        # Quart's whole-body deadline (408): read_timeout bounds each
        # wait, so without it a body trickling a byte at a time would
        # hold a handler for Quart's default 60 s.
        app.config["BODY_TIMEOUT"] = settings.body_timeout
    return app
