"""Mikros errors as the server kinds send them: service name filled, secrets masked.

Shared by the HTTP and gRPC kinds so both answer the same error the same
way. What an unexpected exception reveals is the errors feature's choice
(``[features.errors] expose_details``, read from the service's telemetry).
"""

from __future__ import annotations

from typing import Any

from ._telemetry import Telemetry
from .errors import InternalError, ServiceError

__all__ = ["unexpected_error", "wire_error"]


def wire_error(error: ServiceError, service_name: str, telemetry: Telemetry) -> dict[str, Any]:
    """The Mikros JSON object for ``error``, from ``service_name``, with secrets masked."""
    wire = error.to_wire()
    wire.setdefault("service_name", service_name)
    if telemetry.has_secrets:
        wire = _masked(wire, telemetry)
    return wire


def _masked(value: Any, telemetry: Telemetry) -> Any:
    # Rust's ``attributes`` nest: mask every string, at any depth.
    if isinstance(value, str):
        return telemetry.redact(value)
    if isinstance(value, dict):
        return {key: _masked(item, telemetry) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item, telemetry) for item in value]
    return value


def unexpected_error(error: BaseException, telemetry: Telemetry) -> InternalError:
    """The InternalError a caller gets for an exception no handler expected.

    Its details carry the exception's type and text, as Mikros Go's do,
    unless the service turned that off (``expose_details = false``).
    """
    internal = InternalError("internal error")
    if telemetry.expose_details:
        internal.details = f"{type(error).__name__}: {error}"
    return internal
