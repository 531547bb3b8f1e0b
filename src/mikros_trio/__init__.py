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
"""

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
