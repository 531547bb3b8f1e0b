"""What writing a feature or a kind needs: the extension tier of mikros_trio.

A kind turns user code into lifecycle components; a feature is a
component plus the hooks kinds call. Both are registered through the
``mikros_trio.kinds`` and ``mikros_trio.features`` entry points (see
:class:`KindSpec` and :class:`FeatureSpec`) and built from a
:class:`BuildContext`. Here are:

- the component model: :class:`Component`, :class:`Role`,
  :class:`ShutdownTrigger` (and :class:`~mikros_trio.Lifetime`, which
  service authors use too, in :mod:`mikros_trio`);
- the registry: :class:`KindSpec`, :class:`FeatureSpec`,
  :class:`Registry`, :func:`default_registry`, :func:`load_registry`;
- telemetry, the one seam between kinds and features: :class:`Telemetry`,
  :class:`Observer`, :class:`Call`, :func:`current_call`,
  :func:`current_telemetry`;
- the definition (service.toml, validated): :class:`Definition` and its
  parts, :func:`load_definition`, :func:`parse_definition`,
  :func:`definition_schema`;
- health and the lifecycle as it runs: :class:`Health`,
  :class:`ComponentState`, :class:`Phase`, :class:`LifecycleEvent`,
  :class:`Supervisor`;
- the errors a framework extension raises: :class:`ConfigIssue` (in a
  :class:`~mikros_trio.ConfigError`), :class:`ComponentError`,
  :class:`MikrosTrioError`.

Names load on first use, as in :mod:`mikros_trio`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_module

if TYPE_CHECKING:
    from ._component import Component, Role, ShutdownTrigger
    from ._container import BuildContext
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
    from ._supervisor import LifecycleEvent, Supervisor
    from ._telemetry import Call, Observer, Telemetry, current_call, current_telemetry
    from .errors import ComponentError, ConfigIssue, MikrosTrioError

__all__ = [
    "BuildContext",
    "Call",
    "ClientSettings",
    "Component",
    "ComponentError",
    "ComponentSettings",
    "ComponentState",
    "ConfigIssue",
    "Definition",
    "FeatureConfig",
    "FeatureSpec",
    "Health",
    "KindSpec",
    "LifecycleEvent",
    "LifecycleSettings",
    "LogSettings",
    "MikrosTrioError",
    "Observer",
    "Phase",
    "Registry",
    "Role",
    "ServiceType",
    "ShutdownTrigger",
    "Supervisor",
    "Telemetry",
    "current_call",
    "current_telemetry",
    "default_registry",
    "definition_schema",
    "load_definition",
    "load_registry",
    "parse_definition",
]

# Where each name lives, for the interpreter (tests/test_imports.py checks
# it against the imports above).
_MODULE_OF: dict[str, str] = {
    "BuildContext": "._container",
    "Call": "._telemetry",
    "ClientSettings": "._definition",
    "Component": "._component",
    "ComponentError": ".errors",
    "ComponentSettings": "._definition",
    "ComponentState": "._health",
    "ConfigIssue": ".errors",
    "Definition": "._definition",
    "FeatureConfig": "._definition",
    "FeatureSpec": "._registry",
    "Health": "._health",
    "KindSpec": "._registry",
    "LifecycleEvent": "._supervisor",
    "LifecycleSettings": "._definition",
    "LogSettings": "._definition",
    "MikrosTrioError": ".errors",
    "Observer": "._telemetry",
    "Phase": "._health",
    "Registry": "._registry",
    "Role": "._component",
    "ServiceType": "._definition",
    "ShutdownTrigger": "._component",
    "Supervisor": "._supervisor",
    "Telemetry": "._telemetry",
    "current_call": "._telemetry",
    "current_telemetry": "._telemetry",
    "default_registry": "._registry",
    "definition_schema": "._definition",
    "load_definition": "._definition",
    "load_registry": "._registry",
    "parse_definition": "._definition",
}


def _in_package(name: str) -> str | None:
    import mikros_trio

    if name in mikros_trio.__all__:
        return f"it is for service authors: from mikros_trio import {name}"
    return None


if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_module(globals(), _MODULE_OF, _in_package)
