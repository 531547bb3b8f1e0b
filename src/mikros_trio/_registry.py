"""What service kinds and features exist, and how to build each one.

The definition layer validates ``types``, ``[runtime.<kind>]`` and
``[features.<name>]`` against a :class:`Registry`; the container layer
imports a kind's or feature's ``factory`` only when a service uses it, which
keeps unused network stacks out of the process. Built-ins and third-party
entries are the same kind of object, so they behave the same.

Third-party packages add kinds and features through entry points: group
``mikros_trio.kinds`` (each entry point loads a :class:`KindSpec`) and
``mikros_trio.features`` (each loads a :class:`FeatureSpec`). The entry
point's name must be the spec's name; a name that is already taken, by a
built-in or by another entry point, is an error, never a silent override.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import Any, TypeVar

from ._runtime_settings import GrpcSettings, HttpSettings, ScriptSettings, WorkerSettings
from .errors import ConfigError, ConfigIssue
from .features.settings import (
    METRICS_PORT_ENV,
    EnvSettings,
    ErrorsSettings,
    LoggerSettings,
    MetricsSettings,
    TracingSettings,
)

__all__ = [
    "FEATURES_GROUP",
    "KINDS_GROUP",
    "FeatureSpec",
    "KindSpec",
    "Registry",
    "default_registry",
    "load_registry",
]

#: Entry-point group of third-party kinds; each entry point loads a KindSpec.
KINDS_GROUP = "mikros_trio.kinds"
#: Entry-point group of third-party features; each entry point loads a FeatureSpec.
FEATURES_GROUP = "mikros_trio.features"


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
    #: The package extra its factory's imports need (named when they are missing).
    extra: str = ""


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """A feature: what ``[features.<name>]`` configures.

    ``settings`` is the frozen dataclass the table decodes into (the
    ``enabled`` key is handled for every feature and is not part of it).
    ``always_on`` features run whether or not they are enabled in the file.
    ``depends_on`` names features that start first; features start one at
    a time, dependencies first, then in the order service.toml lists them.
    """

    name: str
    settings: type[Any]
    factory: str
    always_on: bool = False
    summary: str = ""
    #: Features that must start before this one (and stop after it).
    depends_on: tuple[str, ...] = ()
    #: Environment variable overriding the port of a listener the feature runs.
    port_env: str | None = None
    #: The package extra its factory's imports need (named when they are missing).
    extra: str = ""


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
        extra="http",
        summary="a QuartTrio app served by hypercorn",
    ),
    KindSpec(
        name="grpc",
        settings=GrpcSettings,
        factory="mikros_trio.grpc:build_grpc",
        default_port=7070,  # Mikros Go and Rust's MIKROS_GRPC_PORT default
        port_env="MIKROS_GRPC_PORT",
        extra="grpc",
        summary="purerpc servicers",
    ),
)


_BUILTIN_FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec(
        name="logger",
        settings=LoggerSettings,
        factory="mikros_trio.features.logger:build_logger",
        always_on=True,
        summary="structured logs (structlog), standard logging routed through them, access logs",
    ),
    FeatureSpec(
        name="errors",
        settings=ErrorsSettings,
        factory="mikros_trio.features.errors:build_errors",
        always_on=True,
        summary="Mikros error kinds on the wire for HTTP and gRPC",
    ),
    FeatureSpec(
        name="env",
        settings=EnvSettings,
        factory="mikros_trio.features.env:build_env",
        always_on=True,
        summary="required environment variables, typed access, secrets masked",
    ),
    FeatureSpec(
        name="metrics",
        settings=MetricsSettings,
        factory="mikros_trio.features.metrics:build_metrics",
        depends_on=("logger",),
        port_env=METRICS_PORT_ENV,
        extra="metrics",
        summary="Prometheus metrics at /metrics",
    ),
    FeatureSpec(
        name="tracing",
        settings=TracingSettings,
        factory="mikros_trio.features.tracing:build_tracing",
        depends_on=("logger",),
        extra="tracing",
        summary="OpenTelemetry spans with W3C trace context",
    ),
)


def load_registry() -> Registry:
    """The built-in kinds and features plus those installed packages declare, freshly loaded.

    Reads the ``mikros_trio.kinds`` and ``mikros_trio.features`` entry
    points every time it is called (tests use it after changing
    ``sys.path``); :func:`default_registry` is the cached version. Raises
    :class:`~mikros_trio.ConfigError` with one issue per faulty entry point
    (does not import, is not a spec, or takes a name already in use).
    """
    issues: list[ConfigIssue] = []
    # One scan of the installed distributions serves both groups (each scan
    # reads every distribution's metadata; it runs at every service start).
    installed = entry_points()
    kinds: dict[str, KindSpec] = {spec.name: spec for spec in _BUILTIN_KINDS}
    # Every name a kind answers to (name or alias) -> who claimed it.
    kind_names: dict[str, str] = {
        name: "the built-in kind " + repr(spec.name)
        for spec in _BUILTIN_KINDS
        for name in (spec.name, *spec.aliases)
    }
    for entry in installed.select(group=KINDS_GROUP):
        kind = _load_spec(entry, KINDS_GROUP, KindSpec, issues)
        if kind is None:
            continue
        claimed = [name for name in (kind.name, *kind.aliases) if name in kind_names]
        if claimed:
            issues.extend(
                _issue(
                    entry, KINDS_GROUP, f"kind name {name!r} is already taken by {kind_names[name]}"
                )
                for name in claimed
            )
            continue
        kinds[kind.name] = kind
        for name in (kind.name, *kind.aliases):
            kind_names[name] = _describe(entry, KINDS_GROUP)
    features: dict[str, FeatureSpec] = {spec.name: spec for spec in _BUILTIN_FEATURES}
    feature_owner = {spec.name: f"the built-in feature {spec.name!r}" for spec in _BUILTIN_FEATURES}
    for entry in installed.select(group=FEATURES_GROUP):
        feature = _load_spec(entry, FEATURES_GROUP, FeatureSpec, issues)
        if feature is None:
            continue
        if feature.name in feature_owner:
            issues.append(
                _issue(
                    entry,
                    FEATURES_GROUP,
                    f"feature name {feature.name!r} is already taken by "
                    f"{feature_owner[feature.name]}",
                )
            )
            continue
        features[feature.name] = feature
        feature_owner[feature.name] = _describe(entry, FEATURES_GROUP)
    for feature in features.values():
        issues.extend(
            ConfigIssue(
                f"<feature {feature.name}>",
                "depends_on",
                f"depends on {dependency!r}, which is not an installed feature "
                f"({feature_owner[feature.name]})",
            )
            for dependency in feature.depends_on
            if dependency not in features
        )
    if issues:
        raise ConfigError(issues)
    return Registry(kinds=MappingProxyType(kinds), features=MappingProxyType(features))


@functools.cache
def default_registry() -> Registry:
    """The built-in kinds and features plus installed third-party ones (cached).

    Loaded once per process; call ``default_registry.cache_clear()`` to
    reload, or :func:`load_registry` for an uncached copy.
    """
    return load_registry()


def _distribution(entry: EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    if dist is None:
        return "an unknown distribution"
    return f"distribution {dist.name} {dist.version}"


def _describe(entry: EntryPoint, group: str) -> str:
    return f"entry point {entry.name!r} ({entry.value}) of {_distribution(entry)} in {group}"


def _issue(entry: EntryPoint, group: str, message: str) -> ConfigIssue:
    return ConfigIssue(
        f"<entry point {entry.name}>",
        "",
        f"{message} ({entry.value} from {_distribution(entry)}, group {group})",
    )


_Spec = TypeVar("_Spec", KindSpec, FeatureSpec)


def _load_spec(
    entry: EntryPoint, group: str, expected: type[_Spec], issues: list[ConfigIssue]
) -> _Spec | None:
    """The spec ``entry`` loads, or ``None`` after recording why it is unusable."""
    try:
        spec = entry.load()
    except Exception as error:  # any failure in a plugin's import is its fault, reported
        issues.append(_issue(entry, group, f"cannot be loaded: {type(error).__name__}: {error}"))
        return None
    what = "kind" if expected is KindSpec else "feature"
    if not isinstance(spec, expected):
        issues.append(
            _issue(
                entry,
                group,
                f"must load a {expected.__name__} for a {what}, got {type(spec).__name__}",
            )
        )
        return None
    problems: list[str] = []
    if spec.name != entry.name:
        problems.append(f"is named {entry.name!r} but its {expected.__name__} is {spec.name!r}")
    if not (isinstance(spec.settings, type) and dataclasses.is_dataclass(spec.settings)):
        problems.append(f"the {what}'s settings must be a dataclass, got {spec.settings!r}")
    module, colon, attribute = spec.factory.partition(":")
    if not (module and colon and attribute):
        problems.append(f"the {what}'s factory must be 'module:attribute', got {spec.factory!r}")
    issues.extend(_issue(entry, group, problem) for problem in problems)
    return None if problems else spec
