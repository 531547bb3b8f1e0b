"""Mikros errors as the server kinds send them: service name filled, secrets masked.

Shared by the HTTP and gRPC kinds so both answer the same error the same
way. What an unexpected exception reveals is the errors feature's choice
(``[features.errors] expose_details``, read from the service's telemetry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._telemetry import Telemetry
from .errors import InternalError, ServiceError

__all__ = ["masked_wire", "unexpected_error", "wire_error"]


def wire_error(error: ServiceError, service_name: str, telemetry: Telemetry) -> dict[str, Any]:
    """The Mikros JSON object for ``error``, from ``service_name``, with secrets masked."""
    wire = error.to_wire()
    wire.setdefault("service_name", service_name)
    return masked_wire(wire, telemetry)


def masked_wire(wire: dict[str, Any], telemetry: Telemetry) -> dict[str, Any]:
    """``wire`` (any error body about to be encoded) with the service's secrets masked."""
    masker = telemetry.masker
    if masker is None:
        return wire
    masked: dict[str, Any] = _masked(wire, masker.mask)
    return masked


def _masked(value: Any, mask: Callable[[str], str]) -> Any:
    # Rust's ``attributes`` nest: mask every string (keys too), at any depth,
    # before the kind encodes the body (a mask knows a secret's JSON form,
    # not the JSON of its repr).
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {_masked(key, mask): _masked(item, mask) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item, mask) for item in value]
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
