"""The errors feature: how much an unexpected failure tells the caller.

The Mikros error kinds themselves (:mod:`mikros_trio.errors`) need no
feature: a handler raises :class:`~mikros_trio.NotFoundError` and the HTTP
and gRPC kinds answer with its status and the Mikros JSON, which Mikros Go
and Rust services decode. What this feature decides is the one policy the
kinds share: whether the ``details`` of the ``InternalError`` sent for an
exception nobody expected carry that exception's type and text (Mikros
Go's behaviour, ``[features.errors] expose_details = true``, the default)
or nothing (``false``, for services facing callers who must not learn about
their internals). Secrets are masked in what is sent either way.

The second policy is the gRPC status a Mikros error travels with. By
default each kind gets its own code (NOT_FOUND, INVALID_ARGUMENT…), which
grpcio clients and our own client understand. Mikros Go and Rust servers
send every error as UNKNOWN with the JSON as the message, and Go's client
reads the kind only from UNKNOWN (any other code becomes an
InternalError); ``grpc_status = "unknown"`` answers that way for services
called by Go clients. Our client decodes both.

Design decision: the policy is a flag on the service's
:class:`~mikros_trio.Telemetry` (``expose_details``) set at build time,
not a component and not an observer. The kinds read it when an error is
being answered, which costs nothing on successful calls; logging the
failure is the logger's duty (it sees ``call.error``), so at run time
there is nothing left for this feature to start, watch or flush, and
:func:`build_errors` returns no component.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mikros_trio.features.settings import ErrorsSettings

if TYPE_CHECKING:
    from mikros_trio._component import Component
    from mikros_trio._container import BuildContext

__all__ = ["build_errors"]


def build_errors(context: BuildContext) -> list[Component]:
    """Apply ``[features.errors]`` to the service's telemetry; no component (see above).

    Example (service.toml)::

        [features.errors]
        expose_details = false   # 500s say "internal error", never the exception text
        grpc_status = "unknown"  # every Mikros error as UNKNOWN, as Go and Rust servers do
    """
    settings: ErrorsSettings = context.settings
    context.telemetry.expose_details = settings.expose_details
    context.telemetry.grpc_status_unknown = settings.grpc_status == "unknown"
    return []
