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
modules its kinds and features use, and code that needs a name or two (the
errors, the definition) pays for those alone. Type checkers read the
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
    from ._supervisor import LifecycleEvent, Supervisor
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

# Where each public name lives, for the interpreter: what the imports above
# say for type checkers (tests/test_imports.py checks the two agree).
_MODULE_OF: dict[str, str] = {
    "BuildContext": "._container",
    "Call": "._telemetry",
    "ClientSettings": "._definition",
    "Component": "._component",
    "ComponentError": ".errors",
    "ComponentSettings": "._definition",
    "ComponentState": "._health",
    "ConditionError": ".errors",
    "ConfigError": ".errors",
    "ConfigIssue": ".errors",
    "CustomError": ".errors",
    "Definition": "._definition",
    "Env": ".features.env",
    "ErrorKind": ".errors",
    "FeatureConfig": "._definition",
    "FeatureSpec": "._registry",
    "Health": "._health",
    "InternalError": ".errors",
    "KindSpec": "._registry",
    "LifecycleEvent": "._supervisor",
    "LifecycleSettings": "._definition",
    "Lifetime": "._component",
    "LogSettings": "._definition",
    "MikrosTrioError": ".errors",
    "NotFoundError": ".errors",
    "Observer": "._telemetry",
    "PermissionDeniedError": ".errors",
    "Phase": "._health",
    "RPCError": ".errors",
    "Registry": "._registry",
    "Role": "._component",
    "Secret": ".features.env",
    "Service": "._service",
    "ServiceContainer": "._container",
    "ServiceError": ".errors",
    "ServiceType": "._definition",
    "ShutdownTrigger": "._component",
    "Supervisor": "._supervisor",
    "Telemetry": "._telemetry",
    "ValidationError": ".errors",
    "current_call": "._telemetry",
    "current_telemetry": "._telemetry",
    "default_registry": "._registry",
    "definition_schema": "._definition",
    "load_definition": "._definition",
    "load_registry": "._registry",
    "parse_definition": "._definition",
    "run": "._service",
}

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
