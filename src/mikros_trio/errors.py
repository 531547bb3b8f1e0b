"""Every public exception of mikros_trio, in one place.

Configuration problems and runtime problems are different families on
purpose: a :class:`ConfigError` means nothing has started and the process
exits with code 2; a :class:`ComponentError` means a component failed while
the service ran (the supervisor records it, and the exit code is 1).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "ComponentError",
    "ConditionError",
    "ConfigError",
    "ConfigIssue",
    "CustomError",
    "ErrorKind",
    "InternalError",
    "MikrosTrioError",
    "NotFoundError",
    "PermissionDeniedError",
    "RPCError",
    "ServiceError",
    "ValidationError",
]


class MikrosTrioError(Exception):
    """Base class of every exception mikros_trio raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem found in a service's configuration.

    ``source`` is the file (or ``"<container>"`` for problems found while
    wiring), ``path`` the dotted key path inside it (``"runtime.http.port"``;
    empty for the whole document), ``message`` says what was expected.
    """

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return f"{where}: {self.message}"


class ConfigError(MikrosTrioError):
    """Raised before anything starts when the configuration cannot be used.

    Carries *every* issue found, not only the first, so a user fixes them in
    one pass. Covers service.toml syntax and values, missing required
    environment variables, and component graph errors (cycles, unknown
    names). The CLI prints the issues, one per line, and exits with code 2.
    """

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        if not self.issues:
            raise ValueError("ConfigError needs at least one issue")
        super().__init__(self.render())

    def render(self) -> str:
        """All issues, one per line, in the order they were found."""
        count = len(self.issues)
        head = "1 configuration error" if count == 1 else f"{count} configuration errors"
        return head + ":\n" + "\n".join(f"  {issue}" for issue in self.issues)


class ComponentError(MikrosTrioError):
    """A component misbehaved at run time: it crashed, timed out or broke its contract.

    ``component`` names it; the original exception, if any, is the
    ``__cause__``.
    """

    def __init__(self, component: str, message: str) -> None:
        self.component = component
        super().__init__(f"{component}: {message}")


class ErrorKind(enum.StrEnum):
    """The Mikros error kinds; the values are the wire strings Mikros Go and Rust use."""

    VALIDATION = "ValidationError"
    INTERNAL = "InternalError"
    NOT_FOUND = "NotFoundError"
    CONDITION = "ConditionError"
    PERMISSION = "PermissionError"
    RPC = "RPCError"
    CUSTOM = "CustomError"


class ServiceError(MikrosTrioError):
    """An error a handler raises to answer a caller with a Mikros error.

    The HTTP kind answers the subclass's status with the Mikros JSON as
    body; the gRPC kind sends the JSON as the status message of an UNKNOWN
    status, which every Mikros client decodes (``[features.errors]
    grpc_status = "mapped"`` sends the subclass's code instead). Raise a
    subclass, not this class::

        raise NotFoundError(f"item {item_id} does not exist")

    The wire shape carries what every Mikros client reads: ``code`` and
    ``kind`` always (Mikros Rust's client fails without them), then
    ``service_name``, ``message``, ``destination`` when not empty, and the
    underlying cause, :attr:`details`, twice: as ``details`` (what Mikros Go
    v0.19.0 reads) and as ``cause`` (what Go main reads). Rust's
    ``attributes`` (any JSON) go out when set. Decoding reads all of them.
    :meth:`decode` types a peer's error body or gRPC status message again.
    """

    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        code: int = 0,
        details: str = "",
        service_name: str = "",
        destination: str = "",
        attributes: Any = None,
    ) -> None:
        if isinstance(code, bool) or not _INT32_MIN <= code <= _INT32_MAX:
            # Go and Rust decode the code as a 32-bit integer; a wider one
            # would make them drop the whole error, so refuse it here.
            raise ValueError(f"code must be a 32-bit integer, got {code!r}")
        self.message = message
        self.code = code
        self.details = details
        self.service_name = service_name
        self.destination = destination
        self.attributes = attributes
        super().__init__(message)

    def to_wire(self) -> dict[str, Any]:
        """The Mikros JSON object for this error, keys in Mikros Go v0.19.0's order.

        >>> NotFoundError("no item 7", service_name="items").to_wire()
        {'code': 0, 'service_name': 'items', 'message': 'no item 7', 'kind': 'NotFoundError'}
        >>> InternalError("failed", details="disk full").to_wire()["cause"]
        'disk full'
        """
        wire: dict[str, Any] = {"code": self.code}
        # Go and Rust decode these as strings: anything else would lose the
        # whole error there (Go) or fail the decoding (Rust), so text only.
        if self.service_name:
            wire["service_name"] = _text(self.service_name)
        if self.message:
            wire["message"] = _text(self.message)
        if self.destination:
            wire["destination"] = _text(self.destination)
        wire["kind"] = self.kind.value
        if self.details:
            wire["details"] = wire["cause"] = _text(self.details)
        if self.attributes is not None:
            wire["attributes"] = self.attributes
        return wire

    @staticmethod
    def from_wire(wire: Mapping[str, Any]) -> ServiceError:
        """Rebuild the typed error from a Mikros JSON object sent by Python, Go or Rust.

        The cause is read from ``details`` (Go v0.19.0, us) or ``cause`` (Go
        main). Unknown or missing kinds become :class:`InternalError`, as
        Mikros Go's client does with a payload it cannot place; a ``code``
        that is not a 32-bit integer (Go's ``int32``) reads as 0.

        >>> ServiceError.from_wire({"code": 0, "kind": "NotFoundError", "message": "gone"})
        NotFoundError('gone')
        """
        try:
            kind = ErrorKind(str(wire.get("kind")))
        except ValueError:
            kind = ErrorKind.INTERNAL
        details = wire.get("details")
        if details is None:
            details = wire.get("cause")
        return _BY_KIND[kind](
            _text(wire.get("message")),
            code=_code(wire.get("code")),
            details=_text(details),
            service_name=_text(wire.get("service_name")),
            destination=_text(wire.get("destination")),
            attributes=wire.get("attributes"),
        )

    @staticmethod
    def decode(payload: str | bytes, *, destination: str = "", status: str = "") -> ServiceError:
        """The typed error in a peer's HTTP error body or gRPC status message.

        A Mikros error JSON object (with a ``kind``) becomes its kind,
        whatever status carried it, as Mikros Go main's and Rust's clients
        read it; ``destination`` fills its destination when the peer left
        it empty. Anything else (Go's plain ``internal server error``, a
        status from a server that is not Mikros) becomes an
        :class:`InternalError` whose details are the text, as both Mikros Go
        releases decode it; ``status`` (``"INTERNAL"``, ``"500"``) names
        what carried it in the message.

        >>> ServiceError.decode('{"code":0,"kind":"NotFoundError","message":"gone"}')
        NotFoundError('gone')
        >>> error = ServiceError.decode("oops", destination="users", status="INTERNAL")
        >>> error, error.details
        (InternalError('users answered INTERNAL without a Mikros error'), 'oops')
        """
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
        wire = mikros_wire(text)
        if wire is not None:
            error = ServiceError.from_wire(wire)
            error.destination = error.destination or destination
            return error
        peer = destination or "the peer"
        answer = f"answered {status}" if status else "answered"
        return InternalError(
            f"{peer} {answer} without a Mikros error", details=text, destination=destination
        )


def mikros_wire(text: str) -> dict[str, Any] | None:
    """The Mikros error object ``text`` holds (a JSON object with a ``kind``), else ``None``."""
    try:
        wire = json.loads(text)
    except ValueError:
        return None
    return wire if isinstance(wire, dict) and "kind" in wire else None


# Mikros Go's error code is an int32, Rust's an i32: a wider code would not decode there.
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _code(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return value if _INT32_MIN <= value <= _INT32_MAX else 0


def _text(value: object) -> str:
    """A wire field as text: absent or null is empty; a non-string is its JSON text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


class ValidationError(ServiceError):
    """The request is invalid (HTTP 400; mapped gRPC code INVALID_ARGUMENT)."""

    kind = ErrorKind.VALIDATION


class NotFoundError(ServiceError):
    """What the request names does not exist (HTTP 404; mapped gRPC code NOT_FOUND)."""

    kind = ErrorKind.NOT_FOUND


class ConditionError(ServiceError):
    """A precondition does not hold (HTTP 412; mapped gRPC code FAILED_PRECONDITION)."""

    kind = ErrorKind.CONDITION


class PermissionDeniedError(ServiceError):
    """The caller may not do this (HTTP 403; mapped gRPC code PERMISSION_DENIED)."""

    kind = ErrorKind.PERMISSION


class InternalError(ServiceError):
    """The service failed (HTTP 500; mapped gRPC code INTERNAL); unexpected exceptions become it."""

    kind = ErrorKind.INTERNAL


class RPCError(ServiceError):
    """A call to another service failed (HTTP 500; mapped gRPC code UNAVAILABLE, as Go main)."""

    kind = ErrorKind.RPC


class CustomError(ServiceError):
    """A service-defined failure; ``code`` tells them apart (HTTP 500; mapped gRPC code UNKNOWN).

    Mikros Go v0.19.0 and Rust know this kind; Go main has no such kind and
    keeps the string as an unknown kind (its ``Is*`` checks all say no).
    """

    kind = ErrorKind.CUSTOM


_BY_KIND: dict[ErrorKind, type[ServiceError]] = {
    cls.kind: cls
    for cls in (
        ValidationError,
        NotFoundError,
        ConditionError,
        PermissionDeniedError,
        InternalError,
        RPCError,
        CustomError,
    )
}
