"""What service kinds and features exist, and how to build each one.

The definition layer validates ``types``, ``[runtime.<kind>]`` and
``[features.<name>]`` against a :class:`Registry`; the container layer
imports a kind's or feature's ``factory`` only when a service uses it, which
keeps unused network stacks out of the process. Built-ins and third-party
entries are the same kind of object, so they behave the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._runtime_settings import GrpcSettings, HttpSettings, ScriptSettings, WorkerSettings

__all__ = ["FeatureSpec", "KindSpec", "Registry", "default_registry"]


@dataclass(frozen=True, slots=True)
class KindSpec:
    """A service kind: what ``types = ["<name>"]`` means.

    ``settings`` is the frozen dataclass that ``[runtime.<name>]`` decodes
    into. ``default_port`` is ``None`` for kinds that take no port (then
    ``"<name>:<port>"`` is an error). ``alone`` kinds (script) cannot be
    combined with others. ``factory`` is ``"module:attribute"`` of the
    builder, imported lazily.
    """

    name: str
    settings: type[Any]
    factory: str
    default_port: int | None = None
    port_env: str | None = None
    aliases: tuple[str, ...] = ()
    alone: bool = False
    summary: str = ""


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """A feature: what ``[features.<name>]`` configures.

    ``settings`` is the frozen dataclass the table decodes into (the
    ``enabled`` key is handled for every feature and is not part of it).
    ``always_on`` features run whether or not they are enabled in the file.
    """

    name: str
    settings: type[Any]
    factory: str
    always_on: bool = False
    summary: str = ""


@dataclass(frozen=True, slots=True)
class Registry:
    """The kinds and features a service may use, by name."""

    kinds: Mapping[str, KindSpec] = field(default_factory=dict)
    features: Mapping[str, FeatureSpec] = field(default_factory=dict)

    def kind(self, name: str) -> KindSpec | None:
        """The kind called ``name`` or one of its aliases, or ``None``."""
        spec = self.kinds.get(name)
        if spec is not None:
            return spec
        for candidate in self.kinds.values():
            if name in candidate.aliases:
                return candidate
        return None

    def names(self) -> tuple[str, ...]:
        """Every kind name and alias, for error suggestions."""
        out: list[str] = []
        for spec in self.kinds.values():
            out.append(spec.name)
            out.extend(spec.aliases)
        return tuple(out)


_BUILTIN_KINDS = (
    KindSpec(
        name="worker",
        settings=WorkerSettings,
        factory="mikros_trio.worker:build_worker",
        aliases=("native",),  # Mikros' older name
        summary="a long-running loop, cancelled at the drain deadline",
    ),
    KindSpec(
        name="script",
        settings=ScriptSettings,
        factory="mikros_trio.script:build_script",
        alone=True,
        summary="one-shot; its result is the exit code",
    ),
    KindSpec(
        name="http",
        settings=HttpSettings,
        factory="mikros_trio.http:build_http",
        default_port=8080,
        port_env="MIKROS_HTTP_PORT",
        summary="a QuartTrio app served by hypercorn",
    ),
    KindSpec(
        name="grpc",
        settings=GrpcSettings,
        factory="mikros_trio.grpc:build_grpc",
        default_port=50051,
        port_env="MIKROS_GRPC_PORT",
        summary="purerpc servicers",
    ),
)


def default_registry() -> Registry:
    """The built-in kinds and features."""
    return Registry(
        kinds=MappingProxyType({spec.name: spec for spec in _BUILTIN_KINDS}),
        features=MappingProxyType({}),
    )
