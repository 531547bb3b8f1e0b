"""mikros_trio: the Mikros service model for Python, on Trio.

Layers, data flowing one way (each module's name says where it sits):

    service.toml ─► _definition ─► _container ─► _supervisor ─► running service
                    (validated,     (dependency-   (one Trio nursery: graph-ordered
                     frozen, pure)   injector,      start, health, signals,
                                     sync wiring)   two-phase shutdown)

Kinds (``worker``, ``script``, and the HTTP and gRPC kinds) and features
(``features/``: logger, errors, env, metrics, tracing) plug in as components
through ``_registry``; kinds report each request, call, iteration and run
to features through ``_telemetry``, the one seam between the two. This module only re-exports
the public API; everything is importable from here.

Each name is imported on first use (PEP 562 ``__getattr__``), so
``import mikros_trio`` itself imports no dependency: a service pays for the
modules its kinds and features use, and tools that only read a name or two
(``mikros-trio schema``, a test) pay for those. Type checkers read the
imports below as ordinary ones.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._component import Component, Lifetime, Role, ShutdownTrigger
    from ._container import BuildContext, ServiceContainer
    from ._definition import (
        ClientSettings,
        ComponentSettings,
        Definition,
        FeatureConfig,
        LifecycleSettings,
        LogSettings,
        ServiceType,
        definition_schema,
        load_definition,
        parse_definition,
    )
    from ._health import ComponentState, Health, Phase
    from ._registry import FeatureSpec, KindSpec, Registry, default_registry, load_registry
    from ._service import Service, run
    from ._supervisor import LifecycleEvent, Supervisor, Timeouts
    from ._telemetry import Call, Observer, Telemetry, current_call, current_telemetry
    from .errors import (
        ComponentError,
        ConditionError,
        ConfigError,
        ConfigIssue,
        CustomError,
        ErrorKind,
        InternalError,
        MikrosTrioError,
        NotFoundError,
        PermissionDeniedError,
        RPCError,
        ServiceError,
        ValidationError,
    )
    from .features.env import Env, Secret

__all__ = [
    "BuildContext",
    "Call",
    "ClientSettings",
    "Component",
    "ComponentError",
    "ComponentSettings",
    "ComponentState",
    "ConditionError",
    "ConfigError",
    "ConfigIssue",
    "CustomError",
    "Definition",
    "Env",
    "ErrorKind",
    "FeatureConfig",
    "FeatureSpec",
    "Health",
    "InternalError",
    "KindSpec",
    "LifecycleEvent",
    "LifecycleSettings",
    "Lifetime",
    "LogSettings",
    "MikrosTrioError",
    "NotFoundError",
    "Observer",
    "PermissionDeniedError",
    "Phase",
    "RPCError",
    "Registry",
    "Role",
    "Secret",
    "Service",
    "ServiceContainer",
    "ServiceError",
    "ServiceType",
    "ShutdownTrigger",
    "Supervisor",
    "Telemetry",
    "Timeouts",
    "ValidationError",
    "current_call",
    "current_telemetry",
    "default_registry",
    "definition_schema",
    "load_definition",
    "load_registry",
    "parse_definition",
    "run",
]

# The module each public name comes from: what the imports above say, for
# the interpreter (tests/test_exports.py checks the two agree).
_FROM: dict[str, tuple[str, ...]] = {
    "._component": ("Component", "Lifetime", "Role", "ShutdownTrigger"),
    "._container": ("BuildContext", "ServiceContainer"),
    "._definition": (
        "ClientSettings",
        "ComponentSettings",
        "Definition",
        "FeatureConfig",
        "LifecycleSettings",
        "LogSettings",
        "ServiceType",
        "definition_schema",
        "load_definition",
        "parse_definition",
    ),
    "._health": ("ComponentState", "Health", "Phase"),
    "._registry": ("FeatureSpec", "KindSpec", "Registry", "default_registry", "load_registry"),
    "._service": ("Service", "run"),
    "._supervisor": ("LifecycleEvent", "Supervisor", "Timeouts"),
    "._telemetry": ("Call", "Observer", "Telemetry", "current_call", "current_telemetry"),
    ".errors": (
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
    ),
    ".features.env": ("Env", "Secret"),
}
_MODULE_OF = {name: module for module, names in _FROM.items() for name in names}

if not TYPE_CHECKING:  # type checkers see the names above, and a typo stays an error

    def __getattr__(name: str) -> object:
        module = _MODULE_OF.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
