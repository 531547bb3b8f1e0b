"""The errors feature: how a service's errors look to its callers.

The Mikros error kinds themselves (:mod:`mikros_trio.errors`) need no
feature: a handler raises :class:`~mikros_trio.NotFoundError` and the HTTP
and gRPC kinds answer with the Mikros JSON, which Mikros Go and Rust
services decode. What this feature decides is the policy the kinds share:

- ``expose_details``: whether the ``details`` of the ``InternalError`` sent
  for an exception nobody expected carry that exception's type and text
  (Mikros Go's behaviour, the default) or nothing (``false``, for services
  facing callers who must not learn about their internals). Secrets are
  masked in what is sent either way.
- ``grpc_status``: the gRPC status a Mikros error travels with. The default,
  ``"unknown"``, sends every kind as UNKNOWN, as Mikros Go v0.19.0 and Rust
  servers do: every released Mikros client reads the kind then (Go
  v0.19.0's reads it only from UNKNOWN and turns any other code into an
  InternalError; Go main's and Rust's read it whatever the code).
  ``"mapped"`` sends Go main's codes (NOT_FOUND, INVALID_ARGUMENT…,
  RPCError as UNAVAILABLE), for plain grpcio clients that branch on codes;
  only Go v0.19.0 clients lose the kinds then. Our client reads both.
- ``hide_fields`` and ``MIKROS_HIDE_RESPONSE_FIELDS`` (Mikros Rust's
  variable: names separated by commas, any case): fields never sent
  (``message``, ``service_name``, ``destination``, ``attributes``,
  ``details``/``cause``). Rust hides them from gRPC errors only, though
  its documentation says HTTP; here both kinds hide them. ``code`` and
  ``kind`` always go out: Rust's client cannot decode an error without
  them, so naming them is a configuration error, as is any unknown name (a
  typo would leak what it meant to hide).

Design decision: the policy is an :class:`~mikros_trio._error_wire.ErrorPolicy`
published on the service's :class:`~mikros_trio.ext.Telemetry` at build time,
not a component and not an observer. The kinds look it up only when an
error is being answered, which costs nothing on successful calls; logging
the failure is the logger's duty (it sees ``call.error``), so at run time
there is nothing left for this feature to start, watch or flush, and
:func:`build_errors` returns no component.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from mikros_trio._error_wire import HIDEABLE, ErrorPolicy
from mikros_trio.errors import ConfigError, ConfigIssue
from mikros_trio.features.settings import HIDE_FIELDS_ENV, ErrorsSettings

if TYPE_CHECKING:
    from mikros_trio._component import Component
    from mikros_trio._container import BuildContext

__all__ = ["build_errors"]


def build_errors(context: BuildContext) -> list[Component]:
    """Publish ``[features.errors]`` as the service's error policy; no component (see above).

    Example (service.toml)::

        [features.errors]
        expose_details = false     # 500s say "internal error", never the exception text
        grpc_status = "mapped"     # NOT_FOUND, INVALID_ARGUMENT… (Go v0.19.0 clients then
                                   # read every kind as InternalError)
        hide_fields = ["destination"]

    Raises :class:`~mikros_trio.ConfigError` when ``MIKROS_HIDE_RESPONSE_FIELDS``
    names a field that cannot be hidden.
    """
    settings: ErrorsSettings = context.settings
    definition = context.definition
    names = (*settings.hide_fields, *_from_environment(definition.mikros_env(HIDE_FIELDS_ENV)))
    bad = [name for name in names if name not in HIDEABLE]
    if bad:
        issue = ConfigIssue(definition.source, "features.errors.hide_fields", _why(bad))
        raise ConfigError([issue])
    context.telemetry.publish(
        ErrorPolicy(
            expose_details=settings.expose_details,
            grpc_status=settings.grpc_status,
            hidden=frozenset(key for name in names for key in HIDEABLE[name]),
        )
    )
    return []


def _from_environment(text: str | None) -> list[str]:
    # Rust splits on commas and compares in lower case; blanks around a name
    # and empty entries ("message,") are forgiven here too.
    if text is None:
        return []
    return [part.strip().lower() for part in text.split(",") if part.strip()]


def _why(bad: list[str]) -> str:
    first = bad[0]
    if first in ("code", "kind"):
        reason = f"{first!r} cannot be hidden: Mikros clients cannot decode an error without it"
    else:
        reason = f"no error field is called {first!r}"
        near = difflib.get_close_matches(first, list(HIDEABLE), n=1)
        if near:
            reason += f" (did you mean {near[0]!r}?)"
    return (
        f"{reason}; environment variable {HIDE_FIELDS_ENV} or hide_fields may name "
        f"{', '.join(HIDEABLE)}"
    )
