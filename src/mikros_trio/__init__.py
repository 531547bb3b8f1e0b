"""mikros_trio: the Mikros service model for Python, on Trio.

This module is what a service's author uses: :func:`run`, the
:class:`ServiceContainer` a service's components are wired in, the
:class:`Lifetime` its workers and hooks watch, typed environment access
(:class:`Env`, :class:`Secret`) and the Mikros error kinds. The kinds live
in :mod:`mikros_trio.http`, :mod:`mikros_trio.grpc`,
:mod:`mikros_trio.worker` and :mod:`mikros_trio.script`; databases in
:mod:`mikros_trio.postgres` and :mod:`mikros_trio.redis`; test support in
:mod:`mikros_trio.testing`. What writing a feature or a kind needs (the
component model, the registry, telemetry, the definition) is
:mod:`mikros_trio.ext`.

Layers, data flowing one way (each module's name says where it sits):

    service.toml ─► _definition ─► _container ─► _supervisor ─► running service
                    (validated,     (dependency-   (one Trio nursery: graph-ordered
                     frozen, pure)   injector,      start, health, signals,
                                     sync wiring)   two-phase shutdown)

Kinds and features (``features/``: logger, errors, env, metrics, tracing)
plug in as components through ``_registry``; kinds report each request,
call, iteration and run to features through ``_telemetry``, the one seam
between the two.

Each name is imported on first use (PEP 562, see ``_lazy``), so ``import
mikros_trio`` itself imports no dependency: a service pays for the modules
its kinds and features use. Type checkers read the imports below as
ordinary ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_module

if TYPE_CHECKING:
    from ._component import Lifetime
    from ._container import ServiceContainer
    from ._service import Service, run
    from .errors import (
        ConditionError,
        ConfigError,
        CustomError,
        ErrorKind,
        InternalError,
        NotFoundError,
        PermissionDeniedError,
        RPCError,
        ServiceError,
        ValidationError,
    )
    from .features.env import Env, Secret

__all__ = [
    "ConditionError",
    "ConfigError",
    "CustomError",
    "Env",
    "ErrorKind",
    "InternalError",
    "Lifetime",
    "NotFoundError",
    "PermissionDeniedError",
    "RPCError",
    "Secret",
    "Service",
    "ServiceContainer",
    "ServiceError",
    "ValidationError",
    "run",
]

# Where each public name lives, for the interpreter: what the imports above
# say for type checkers (tests/test_imports.py checks the two agree).
_MODULE_OF: dict[str, str] = {
    "ConditionError": ".errors",
    "ConfigError": ".errors",
    "CustomError": ".errors",
    "Env": ".features.env",
    "ErrorKind": ".errors",
    "InternalError": ".errors",
    "Lifetime": "._component",
    "NotFoundError": ".errors",
    "PermissionDeniedError": ".errors",
    "RPCError": ".errors",
    "Secret": ".features.env",
    "Service": "._service",
    "ServiceContainer": "._container",
    "ServiceError": ".errors",
    "ValidationError": ".errors",
    "run": "._service",
}


#: The package's public modules, importable as attributes too.
_SUBMODULES = frozenset(
    {"errors", "ext", "grpc", "http", "postgres", "redis", "script", "testing", "worker"}
)


def _in_ext(name: str) -> str | None:
    from . import ext

    if name in ext.__all__:
        return f"it is for extension authors: from mikros_trio.ext import {name}"
    return None


if not TYPE_CHECKING:  # type checkers see the names above, and a typo stays an error
    __getattr__, __dir__ = lazy_module(globals(), _MODULE_OF, _in_ext, _SUBMODULES)
