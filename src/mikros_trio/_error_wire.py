"""Mikros errors as the server kinds send them: service name filled, fields hidden, secrets masked.

Shared by the HTTP and gRPC kinds so both answer the same error the same
way. The policy (what an unexpected exception reveals, which fields are
hidden, which gRPC status carries an error) is the errors feature's
choice: it publishes an :class:`ErrorPolicy` on the service's telemetry,
and a service without one answers with the defaults.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ._telemetry import Telemetry
from .errors import InternalError, ServiceError

__all__ = ["HIDEABLE", "ErrorPolicy", "masked_wire", "policy", "unexpected_error", "wire_error"]

#: The names ``hide_fields`` and ``MIKROS_HIDE_RESPONSE_FIELDS`` accept, and the
#: wire keys each removes. ``code`` and ``kind`` are never hidden: Mikros Rust's
#: client cannot decode an error without them. ``cause`` is Go main's name
#: of ``details``: either hides both.
HIDEABLE: dict[str, tuple[str, ...]] = {
    "message": ("message",),
    "service_name": ("service_name",),
    "destination": ("destination",),
    "attributes": ("attributes",),
    "details": ("details", "cause"),
    "cause": ("details", "cause"),
}


@dataclass(frozen=True, slots=True)
class ErrorPolicy:
    """How the service's kinds answer errors (``[features.errors]``)."""

    #: Whether an unexpected exception's type and text go into ``details``.
    expose_details: bool = True
    #: ``"unknown"``: every Mikros error travels as gRPC UNKNOWN; ``"mapped"``:
    #: each kind as its own code (see :data:`mikros_trio.grpc.GRPC_STATUS`).
    grpc_status: Literal["unknown", "mapped"] = "unknown"
    #: Wire keys never sent (from :data:`HIDEABLE`).
    hidden: frozenset[str] = frozenset()


_DEFAULT = ErrorPolicy()


def policy(telemetry: Telemetry) -> ErrorPolicy:
    """The policy the errors feature published, or the defaults."""
    try:
        return telemetry.get(ErrorPolicy)
    except LookupError:
        return _DEFAULT


def wire_error(error: ServiceError, service_name: str, telemetry: Telemetry) -> dict[str, Any]:
    """The Mikros JSON object for ``error``, from ``service_name``, as the service sends it."""
    wire = error.to_wire()
    wire.setdefault("service_name", service_name)
    return masked_wire(wire, telemetry)


def masked_wire(wire: dict[str, Any], telemetry: Telemetry) -> dict[str, Any]:
    """``wire`` (any error body about to be encoded) as sent: hidden fields out, secrets masked.

    Every string is made encodable by every Mikros client on the way:
    lone surrogates (a file name decoded with ``surrogateescape``) become
    U+FFFD, which serde_json (Rust) would refuse, and attributes that are
    not JSON (NaN, a ``datetime``, a set) become text or lists, which
    ``json.dumps`` would send as invalid JSON or refuse to encode.
    """
    hidden = policy(telemetry).hidden
    if hidden:
        wire = {key: value for key, value in wire.items() if key not in hidden}
    masker = telemetry.masker
    clean: dict[str, Any] = _clean(wire, _plain if masker is None else masker.mask)
    return clean


def _plain(text: str) -> str:
    return text


def _clean(value: Any, mask: Callable[[str], str]) -> Any:
    # Rust's ``attributes`` nest: mask every string (keys too), at any depth,
    # before the kind encodes the body (a mask knows a secret's JSON form,
    # not the JSON of its repr).
    if isinstance(value, str):
        return mask(_unicode(value))
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {_clean(_key(key), mask): _clean(item, mask) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(item, mask) for item in value]
    return mask(_unicode(str(value)))


def _key(key: object) -> str:
    return key if isinstance(key, str) else str(key)


#: A lone surrogate: no UTF-8 form, and serde_json refuses its JSON escape.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD, as Go's decoder would read them."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def unexpected_error(error: BaseException, telemetry: Telemetry) -> InternalError:
    """The InternalError a caller gets for an exception no handler expected.

    Its details carry the exception's type and text, as Mikros Go's do,
    unless the service turned that off (``expose_details = false``).
    """
    internal = InternalError("internal error")
    if policy(telemetry).expose_details:
        internal.details = f"{type(error).__name__}: {error}"
    return internal
