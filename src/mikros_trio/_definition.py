"""``service.toml`` → a validated, frozen :class:`Definition`.

The first layer, and a pure one: it reads one file, checks everything that
can be checked without starting anything, and either returns a frozen model
or raises :class:`~mikros_trio.errors.ConfigError` carrying *every* issue,
each with its key path. Later layers (container, supervisor) trust the
result and never re-validate it.

A Mikros Go ``service.toml`` loads unchanged::

    name = "http"
    types = ["http:8080"]
    version = "v0.1.0"
    language = "go"
    product = "EXAMPLE"

    [log]
    error_stack_trace = "disabled"

Typed tables are decoded by :mod:`._settings`; this module adds the rules
that span tables: ``types`` against the registry, ``[runtime.<kind>]`` against
``types``, port precedence, feature settings, lifecycle timing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from ._registry import KindSpec, Registry, default_registry
from ._runtime_settings import MikrosKey
from ._settings import decode, decode_fields, join_path, json_schema, quote, show, suggest
from .errors import ConfigError, ConfigIssue

__all__ = [
    "ClientSettings",
    "ComponentSettings",
    "Definition",
    "FeatureConfig",
    "LifecycleSettings",
    "LogSettings",
    "ServiceType",
    "TestsSettings",
    "definition_schema",
    "env_forms",
    "load_definition",
    "mikros_env_forms",
    "parse_definition",
    "parse_port",
]


def _empty() -> Mapping[Any, Any]:
    return MappingProxyType({})


# Port numbers everywhere: in "kind:port", [runtime.<kind>] and the
# MIKROS_<KIND>_PORT variables. 0 asks the OS for a free port (tests).
_PORT_MAX: Final = 65535
_PORT_EXPECTED: Final = f"an integer between 0 and {_PORT_MAX}"

# A generation-0 threshold above this postpones collections so long that
# garbage piles up for minutes on a busy server; CPython's own limit is a C
# int, and a larger number crashed the start.
_GC_THRESHOLD_MAX: Final = 1_000_000
# Worker processes: each holds a share of every listening socket in the parent.
_WORKERS_MAX: Final = 256

# Keys of [clients.*] name other services (Mikros names may hold "-");
# keys of [components.*] name container providers, so Python identifiers.
_CLIENT_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_COMPONENT_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Semantic Versioning 2.0 (core, pre-release, build metadata), with the "v"
# prefix Mikros uses; or Mikros Go's own short forms "v1" and "v1.2" (its
# validator: "v" then one to three numbers of one or two digits). In the
# subset of regex syntax Python and JSON Schema (ECMA-262) share, because it
# also goes into the schema.
_NUMBER = "(?:0|[1-9][0-9]*)"
_IDENT = "(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_VERSION: Final = (
    f"v?{_NUMBER}\\.{_NUMBER}\\.{_NUMBER}"
    f"(?:-{_IDENT}(?:\\.{_IDENT})*)?"
    "(?:\\+[0-9A-Za-z-]+(?:\\.[0-9A-Za-z-]+)*)?"
    "|v[0-9]{1,2}(?:\\.[0-9]{1,2})?"
)

# A service name, or a Go module path ending in one ("github.com/acme/users",
# what mikros-cli offers), whose last element (before a "/v2" major version
# suffix) is then the service name.
_NAME_PART = "[A-Za-z0-9_.-]+"
_NAME: Final = f"{_NAME_PART}(?:/{_NAME_PART})*"
_MAJOR_SUFFIX: Final = re.compile(r"v[0-9]+")

# Mikros Go's rule for envs entries (go-playground's "ascii,uppercase"): any
# ASCII text with no lower-case letter, so dashes and leading digits pass;
# "=" and NUL can be in no environment, and an empty name is no name.
_ENV_NAME: Final = "[\\x01-\\x3c\\x3e-\\x60\\x7b-\\x7f]+"

# Mikros' environment: the deploy environment, the CI switch, and where
# coupled services listen when [clients.<name>] gives no host (Go and Rust
# both default the port to 7070; the namespace has no default in Go).
DEPLOY_ENV: Final = "MIKROS_SERVICE_DEPLOY"
CICD_ENV: Final = "MIKROS_CICD_TEST"
COUPLED_NAMESPACE_ENV: Final = "MIKROS_COUPLED_NAMESPACE"
COUPLED_PORT_ENV: Final = "MIKROS_COUPLED_PORT"
_COUPLED_PORT_DEFAULT: Final = 7070
# strconv.ParseBool's words, which Mikros Go reads MIKROS_CICD_TEST with.
_GO_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})

# Kinds of other Mikros versions that have no counterpart here, and why.
_MIKROS_ONLY_KINDS: Final = {
    "http-spec": "is Mikros Go's HTTP runtime whose routes are generated from the protobuf "
    "HTTP annotations (google.api.http) of a gRPC service; mikros_trio generates no routes: "
    'serve the gRPC service with "grpc", or write the routes in a QuartTrio app with "http"',
}


# -- the model -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceType:
    """One entry of ``types``: a kind, and the port written as ``"kind:port"``.

    ``kind`` is the canonical name (``"native"`` is stored as ``"worker"``);
    ``port`` is ``None`` when the entry has no ``:port`` part. The port the
    service really uses is :meth:`Definition.port`.
    """

    kind: str
    port: int | None


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]``: level and shape of the service's log lines.

    Takes the keys of every Mikros version: Go main's ``error_stack_trace``,
    Go v0.19.0's boolean ``error_stacktrace`` (true is ``"default"``, false
    ``"disabled"``; a file giving both must not contradict itself) and
    Rust's ``local_timestamp`` and ``display_errors``.
    """

    level: Literal["debug", "info", "warn", "warning", "error", "internal"] = field(
        default="info", metadata={"help": "Lowest level written."}
    )
    error_stack_trace: Literal["default", "disabled", "structured"] = field(
        default="default",
        metadata={"help": "How error stack traces are logged (Mikros Go main key)."},
    )
    error_stacktrace: bool | None = field(
        default=None,
        metadata={
            "help": "Mikros Go v0.19.0's switch for error stack traces: true is "
            'error_stack_trace = "default", false "disabled".'
        },
    )
    format: Literal["auto", "json", "console", "mikros"] = field(
        default="auto",
        metadata={
            "help": "Line format; auto is console on a terminal, JSON otherwise; mikros is "
            "JSON with Mikros Go's keys (time, level, msg, service.name…)."
        },
    )
    local_timestamp: bool = field(
        default=False,
        metadata={
            "help": "Timestamps in local time with their UTC offset instead of UTC "
            "(Mikros Rust key)."
        },
    )
    display_errors: bool = field(
        default=True,
        metadata={
            "help": "A failed call's access line carries its error's kind and text "
            "(Mikros Rust key)."
        },
    )
    attributes: Mapping[str, str | int | float | bool] = field(
        default_factory=_empty,
        metadata={"help": "Static attributes added to every log line."},
    )

    def __post_init__(self) -> None:
        legacy = self.error_stacktrace
        # "default" is also what an absent error_stack_trace reads as: no contradiction.
        contradicting = "disabled" if legacy else "structured"
        if legacy is not None and self.error_stack_trace == contradicting:
            raise ValueError(
                f"error_stacktrace = {str(legacy).lower()} contradicts "
                f'error_stack_trace = "{self.error_stack_trace}"; give one of them'
            )

    @property
    def stack_trace_mode(self) -> Literal["default", "disabled", "structured"]:
        """The stack trace mode ``error_stack_trace`` and ``error_stacktrace`` give together."""
        if self.error_stacktrace is False:
            return "disabled"
        return self.error_stack_trace


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """``[clients.<name>]``: where another service listens.

    Resolved when the file loads: a table without ``host`` dials
    ``<name>.<MIKROS_COUPLED_NAMESPACE>``, as Mikros does, and one without
    ``port`` dials ``MIKROS_COUPLED_PORT`` (default 7070).
    """

    host: str = field(metadata={"help": "Host name or address of the service."})
    port: int = field(metadata={"help": "Its TCP port.", "ge": 1, "le": _PORT_MAX})


@dataclass(frozen=True, slots=True)
class _ClientTable:
    """``[clients.<name>]`` as written: both keys optional (see ClientSettings)."""

    host: str | None = field(
        default=None,
        metadata={
            "help": "Host name or address of the service; default "
            "<name>.<MIKROS_COUPLED_NAMESPACE> (Mikros' coupled clients)."
        },
    )
    port: int | None = field(
        default=None,
        metadata={
            "help": "Its TCP port; default MIKROS_COUPLED_PORT, else 7070.",
            "ge": 1,
            "le": _PORT_MAX,
        },
    )


@dataclass(frozen=True, slots=True)
class LifecycleSettings:
    """``[lifecycle]``: start and shutdown deadlines, in seconds; the collector while serving.

    ``readiness_delay + drain_timeout`` must stay below ``shutdown_timeout``
    (work-processing components still need time to stop and flush after the
    drain), and ``shutdown_timeout`` below Kubernetes' default 30 s grace
    period, after which the pod is killed.
    """

    start_timeout: float = field(
        default=15.0,
        metadata={
            "help": "Deadline for every component to report ready (an hour at most).",
            "gt": 0,
            "le": 3600,
        },
    )
    drain_timeout: float = field(
        default=10.0,
        metadata={
            "help": "Deadline for work-generating components to drain.",
            "gt": 0,
            "lt": 30,
        },
    )
    shutdown_timeout: float = field(
        default=20.0,
        metadata={
            "help": "Deadline for the whole shutdown; below Kubernetes' default 30 s grace.",
            "gt": 0,
            "lt": 30,
            "expect": "a number of seconds > 0 and < 30 (Kubernetes' default grace period)",
        },
    )
    readiness_delay: float = field(
        default=0.0,
        metadata={
            "help": "Pause between readiness off and draining, for load balancers to notice.",
            "ge": 0,
            "lt": 30,
        },
    )
    workers: int = field(
        default=1,
        metadata={
            "help": "Processes serving the service, each running all of it on shared "
            "listening sockets: 1 is one process, 0 one per CPU the process may use.",
            "ge": 0,
            "le": _WORKERS_MAX,
        },
    )
    gc_freeze: bool = field(
        default=True,
        metadata={
            "help": "Once ready, exempt the objects built at start from garbage collections.",
        },
    )
    gc_threshold: int = field(
        default=2000,
        metadata={
            "help": "Raise the generation-0 collection threshold to this while serving "
            "(Python 3.13's default; 0 leaves the interpreter's).",
            "ge": 0,
            "le": _GC_THRESHOLD_MAX,
        },
    )


@dataclass(frozen=True, slots=True)
class ComponentSettings:
    """``[components.<name>]``: extra start/stop ordering for a container component."""

    depends_on: tuple[str, ...] = field(
        default=(), metadata={"help": "Components that must start before this one."}
    )
    enhanced_by: tuple[str, ...] = field(
        default=(), metadata={"help": "Components that enhance this one and start after it."}
    )


@dataclass(frozen=True, slots=True)
class TestsSettings:
    """``[tests]``: Mikros Go test-harness switches, accepted for compatibility."""

    execute_lifecycle: bool = field(
        default=False, metadata={"help": "Run lifecycle hooks in tests (Mikros Go)."}
    )
    discard_log_messages: bool | None = field(
        default=None, metadata={"help": "Drop log output in tests (Mikros Go)."}
    )


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """One feature's table: whether it is enabled, and its decoded settings.

    ``settings`` is an instance of the feature's ``FeatureSpec.settings``.
    """

    enabled: bool
    settings: object


@dataclass(frozen=True, slots=True)
class Definition:
    """A validated ``service.toml``: frozen all the way down.

    Built by :func:`load_definition` or :func:`parse_definition`, never by
    hand. Mappings are read-only views and arrays are tuples, so no layer
    can change the configuration another layer reads.

    ``runtime`` holds one settings instance for every kind in ``types``
    (defaults when the file has no ``[runtime.<kind>]`` table); ``features``
    holds the features in file order, then the registry's always-on features
    the file does not mention; ``service`` is the free-form ``[service]``
    table, or an instance of the ``service_model`` given when loading.

    ``name`` is the service's name. A ``name`` written as a Go module path
    (``github.com/acme/users``, or ``.../users/v2``) names the service by its
    last element (``users``), the name other services dial it by; the path
    as written is ``full_name``, and Mikros Go's per-service variables
    (``github.com/acme/users__MIKROS_HTTP_PORT``) are read under it too.

    >>> text = 'name = "svc"\\ntypes = ["http:9000"]\\nversion = "v1.0.0"'
    >>> d = parse_definition(text, environ={})
    >>> d.kinds, d.port("http")
    (('http',), 9000)
    """

    source: str
    name: str
    types: tuple[ServiceType, ...]
    version: str
    language: str
    product: str
    envs: tuple[str, ...]
    log: LogSettings
    features: Mapping[str, FeatureConfig]
    clients: Mapping[str, ClientSettings]
    runtime: Mapping[str, object]
    service: Any
    lifecycle: LifecycleSettings
    components: Mapping[str, ComponentSettings]
    tests: TestsSettings
    #: ``name`` as the file writes it: a Go module path stays whole here.
    full_name: str = ""
    #: ``MIKROS_SERVICE_DEPLOY`` (its per-service override first), "" when unset.
    deploy_env: str = ""
    #: ``MIKROS_CICD_TEST``, read as Mikros Go reads it (strconv.ParseBool).
    cicd_test: bool = False
    environ: Mapping[str, str] = field(default_factory=_empty, repr=False, compare=False)
    # Effective port of each kind, resolved at load time because it needs the
    # registry (port_env, default_port) that the definition does not keep.
    _ports: Mapping[str, int | None] = field(default_factory=_empty, repr=False, compare=False)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The canonical kind names of ``types``, in file order."""
        return tuple(entry.kind for entry in self.types)

    def port(self, kind: str) -> int | None:
        """The port ``kind`` listens on, or ``None`` for a kind without one.

        Precedence: the kind's environment variable (``MIKROS_HTTP_PORT``,
        its per-service override first: see :func:`mikros_env_forms`), then
        ``"kind:port"`` in ``types``, then ``[runtime.<kind>] port``, then
        the kind's default (gRPC 7070 and HTTP 8080, as Mikros). The
        environment wins over the file as in Mikros Rust (Mikros Go lets
        ``types`` win): the deployment decides where a service listens.
        Raises ``KeyError`` for a kind that is not in ``types``.
        """
        if kind not in self._ports:
            raise KeyError(f"kind {kind!r} is not in types {list(self.kinds)}")
        return self._ports[kind]

    def enabled_features(self, registry: Registry) -> tuple[str, ...]:
        """Features to run, in start order (stop is the reverse).

        Always-on features come first, in registry order (the logger is up
        before anything else and down after everything), then the enabled
        ones in file order; each feature's declared dependencies
        (``FeatureSpec.depends_on``) move before it.
        """
        wanted = [name for name, spec in registry.features.items() if spec.always_on]
        wanted.extend(
            name for name, config in self.features.items() if config.enabled and name not in wanted
        )
        order: list[str] = []

        def place(name: str, seen: tuple[str, ...]) -> None:
            if name in order or name in seen or name not in wanted:
                return  # placed, a cycle (the registry reports those), or not running
            spec = registry.features.get(name)
            for dependency in spec.depends_on if spec is not None else ():
                place(dependency, (*seen, name))
            order.append(name)

        for name in wanted:
            place(name, ())
        return tuple(order)

    def missing_envs(self) -> tuple[str, ...]:
        """The names in ``envs`` that the environment does not give a value.

        A name is read from the first of its forms that is set (see
        :func:`env_forms`); it is missing when none is, or when that one is
        empty: Mikros Go refuses an empty required variable too.
        """
        return tuple(name for name in self.envs if not self.env_value(name))

    def env_value(self, name: str) -> str | None:
        """The value of ``name`` in the first of its :func:`env_forms` that is set."""
        return _first(self.environ, env_forms(self.full_name or self.name, name))

    def mikros_env(self, name: str) -> str | None:
        """The Mikros variable ``name`` (``MIKROS_TRACKER_HEADER_NAME``…), per-service first.

        Read from the first of its :func:`mikros_env_forms` that is set, as
        Mikros Go and Rust read their own variables; ``None`` when none is.
        """
        return _first(self.environ, mikros_env_forms(self.full_name or self.name, name))


def _first(environ: Mapping[str, str], forms: tuple[str, ...]) -> str | None:
    for form in forms:
        value = environ.get(form)
        if value is not None:
            return value
    return None


def service_name(name: str) -> str:
    """The service name ``name`` gives: a Go module path's last element, before any ``/vN``.

    >>> service_name("github.com/acme/users/v2"), service_name("users")
    ('users', 'users')
    """
    parts = name.split("/")
    if len(parts) > 1 and _MAJOR_SUFFIX.fullmatch(parts[-1]):
        parts.pop()
    return parts[-1]


def env_forms(service: str, name: str) -> tuple[str, ...]:
    """The variables that may hold ``name`` for ``service``, the one read first first.

    The per-service override ``<SERVICE>__<NAME>`` comes before ``NAME``, so
    one environment can hold a value shared by several services and another
    for one of them. ``<SERVICE>`` is the service name (see
    :func:`service_name`) upper-cased with every other character than a
    letter or digit turned into ``_`` (a name a shell can export); Mikros
    Go's own spelling, ``service`` in kebab case (``items-api__DB_DSN``, what
    its ``env.Load`` reads), is accepted next.

    >>> env_forms("items-api", "DB_DSN")
    ('ITEMS_API__DB_DSN', 'items-api__DB_DSN', 'DB_DSN')
    """
    shell = re.sub(r"[^A-Z0-9]", "_", service_name(service).upper()) + "__" + name
    go = _kebab(service) + "__" + name
    return (shell, name) if go == shell else (shell, go, name)


def mikros_env_forms(service: str, name: str) -> tuple[str, ...]:
    """:func:`env_forms` of a Mikros variable, with Mikros Rust's override before the name.

    Mikros Rust reads ``MIKROS_HTTP_PORT_<service in snake case>`` before
    ``MIKROS_HTTP_PORT``; Mikros Go ``<kebab-service>__MIKROS_HTTP_PORT``.
    Both work here, ours (``ITEMS_API__MIKROS_HTTP_PORT``) first.

    >>> mikros_env_forms("items-api", "MIKROS_HTTP_PORT")[1:]
    ('items-api__MIKROS_HTTP_PORT', 'MIKROS_HTTP_PORT_items_api', 'MIKROS_HTTP_PORT')
    """
    *overrides, bare = env_forms(service, name)
    return (*overrides, f"{name}_{_snake(service)}", bare)


# Every Mikros variable read spells the service name again: spell each once.
@functools.lru_cache(maxsize=64)
def _kebab(name: str) -> str:
    """``name`` in kebab case exactly as Mikros Go spells service names (go-strcase's KebabCase).

    Words split at ``_``, ``-`` and white space (a run of them is one
    ``-``), before an upper-case letter that follows a lower-case one, and
    before the last letter of an upper-case run followed by a lower-case one
    (``HTTPServer`` → ``http-server``). Only ASCII letters change case. As
    in go-strcase, a leading separator still gives a ``-`` and a trailing
    one is kept as written.
    """
    text = name.strip()
    out: list[str] = []
    for index, char in enumerate(text):
        before = text[index - 1] if index else ""
        after = text[index + 1] if index + 1 < len(text) else ""
        if _go_delimiter(char) and after:
            if not _go_delimiter(before):
                out.append("-")
        elif _ascii_upper(char):
            if _ascii_lower(before) or (_ascii_upper(before) and _ascii_lower(after)):
                out.append("-")
            out.append(char.lower())
        else:
            out.append(char)
    return "".join(out)


@functools.lru_cache(maxsize=64)
def _snake(name: str) -> str:
    """``name`` in snake case exactly as Mikros Rust's ``ServiceName::to_snake_case`` spells it.

    ``-`` becomes ``_``; an upper-case letter (after the first character and
    not after ``_`` or ``-``) gets a ``_`` before it; ASCII letters go lower.
    """
    out: list[str] = []
    for index, char in enumerate(name):
        if index and char.isupper() and name[index - 1] not in "_-":
            out.append("_")
        out.append("_" if char == "-" else (char.lower() if char.isascii() else char))
    return "".join(out)


def _go_delimiter(char: str) -> bool:
    return char != "" and char in "-_ \t\n\r"


def _ascii_upper(char: str) -> bool:
    return "A" <= char <= "Z" and len(char) == 1


def _ascii_lower(char: str) -> bool:
    return "a" <= char <= "z" and len(char) == 1


@dataclass(frozen=True, slots=True)
class _Document:
    """The top-level keys of service.toml, as written, before cross-table checks."""

    name: str = field(
        metadata={
            "help": "Service name: letters, digits, '_', '-' and '.'; or a Go module path "
            "(github.com/acme/users), whose last element is then the name.",
            "pattern": _NAME,
            "expect": 'a non-empty name of letters, digits, "_", "-" and ".", or a module '
            'path of such names joined by "/"',
        }
    )
    types: tuple[str, ...] = field(
        metadata={"help": 'Service kinds, each "kind" or "kind:port"; script stands alone.'}
    )
    version: str = field(
        metadata={
            "help": 'Service version, "v1.2.3" (Mikros) or SemVer 2.0.',
            "pattern": _VERSION,
            "expect": 'a version like "v1.2.3" or "1.2.3"',
        }
    )
    language: Literal["python", "go", "rust"] = field(
        default="python", metadata={"help": "Implementation language (Mikros)."}
    )
    product: str = field(default="", metadata={"help": "Product the service belongs to."})
    envs: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Environment variables the service requires (set and not empty).",
            "pattern": _ENV_NAME,
            "expect": 'an environment variable name in ASCII without lower-case letters, "=" '
            "or NUL (Mikros Go's rule)",
        },
    )
    log: LogSettings = field(default_factory=LogSettings, metadata={"help": "Logging."})
    features: Mapping[str, Mapping[str, Any]] = field(
        default_factory=_empty,
        metadata={"help": "Features by name: enabled = true plus the feature's settings."},
    )
    clients: Mapping[str, _ClientTable] = field(
        default_factory=_empty, metadata={"help": "Other services this one calls, by name."}
    )
    runtime: Mapping[str, Mapping[str, Any]] = field(
        default_factory=_empty, metadata={"help": "Settings of each kind in types."}
    )
    service: Mapping[str, Any] = field(
        default_factory=_empty, metadata={"help": "The service's own settings."}
    )
    lifecycle: LifecycleSettings = field(
        default_factory=LifecycleSettings, metadata={"help": "Start and shutdown deadlines."}
    )
    components: Mapping[str, ComponentSettings] = field(
        default_factory=_empty, metadata={"help": "Extra ordering of container components."}
    )
    tests: TestsSettings = field(
        default_factory=TestsSettings, metadata={"help": "Mikros Go test settings."}
    )
    services: Mapping[str, Mapping[str, Any]] = field(
        default_factory=_empty,
        metadata={
            "help": "[runtime.<kind>] as Mikros Go v0.19.0 and Mikros Rust name it; "
            "a kind has one table or the other."
        },
    )


# -- loading ---------------------------------------------------------------------


def load_definition(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    registry: Registry | None = None,
    service_model: type | None = None,
) -> Definition:
    """Read and validate the ``service.toml`` at ``path``.

    Raises :class:`~mikros_trio.errors.ConfigError` with every issue found,
    including a file that cannot be read or is not UTF-8; never anything
    else for bad input. See :func:`parse_definition` for the arguments.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            raw = file.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([ConfigIssue(source, "", f"cannot read the file: {reason}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        message = f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at line {line}, column {column}"
        raise ConfigError([ConfigIssue(source, "", message)]) from None
    # Some editors start UTF-8 files with a byte-order mark; TOML has no use for it.
    text = text.removeprefix("\ufeff")
    return parse_definition(
        text, source=source, environ=environ, registry=registry, service_model=service_model
    )


def parse_definition(
    text: str,
    *,
    source: str = "service.toml",
    environ: Mapping[str, str] | None = None,
    registry: Registry | None = None,
    service_model: type | None = None,
) -> Definition:
    """Validate the ``service.toml`` document ``text``.

    ``source`` names the file in issues. ``environ`` (default: a copy of
    ``os.environ``) supplies port overrides and is what
    :meth:`Definition.missing_envs` checks. ``registry`` (default: the
    built-in kinds and features) says which kinds and features exist.
    ``service_model``, a dataclass, types the ``[service]`` table.

    Raises :class:`~mikros_trio.errors.ConfigError` with every issue found;
    never anything else for bad input.
    """
    env = MappingProxyType(dict(os.environ if environ is None else environ))
    try:
        try:
            data = tomllib.loads(text)
        except ValueError as exc:
            # TOMLDecodeError (a ValueError) says "(at line L, column C)";
            # other ValueErrors come from values tomllib cannot convert
            # (an integer of more than 4300 digits).
            raise ConfigError([ConfigIssue(source, "", f"invalid TOML: {exc}")]) from None
        return _Loader(source, env, registry or default_registry(), service_model).load(data)
    except RecursionError:
        # Arrays nested thousands deep exhaust the parser's (and the
        # decoder's) stack; that is a bad file, not a crash.
        raise ConfigError([ConfigIssue(source, "", "tables or arrays nested too deeply")]) from None


class _Loader:
    """The checks of one document, collecting issues instead of stopping at the first."""

    def __init__(
        self,
        source: str,
        environ: Mapping[str, str],
        registry: Registry,
        service_model: type | None,
    ) -> None:
        self.source = source
        self.environ = environ
        self.registry = registry
        self.service_model = service_model
        self.issues: list[ConfigIssue] = []
        self.full_name = ""

    def add(self, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.source, path, message))

    def decode(self, cls: type, data: object, path: str, known: tuple[str, ...] = ()) -> Any:
        value, issues = decode(cls, data, source=self.source, path=path, known=known)
        self.issues.extend(issues)
        return value

    def load(self, data: dict[str, Any]) -> Definition:
        values, self.issues = decode_fields(_Document, data, source=self.source, path="")
        self.full_name = values.get("name", "")
        types = self.check_types(values["types"]) if "types" in values else None
        specs = (
            None if types is None else {entry.kind: self.kind_spec(entry.kind) for entry in types}
        )
        self.check_envs(values.get("envs", ()))
        sections: dict[str, Mapping[str, Mapping[str, Any]]] = {
            key: values[key] for key in ("runtime", "services") if key in values
        }
        runtime = self.check_runtime(sections, types, specs)
        env_ports = self.check_port_env(specs or {})
        clients = self.check_clients(values.get("clients", {}))
        cicd_test = self.check_cicd()
        deploy = self.mikros_var(DEPLOY_ENV)
        features = self.check_features(values.get("features", {}))
        self.check_names(data.get("clients"), "clients", _CLIENT_NAME, "a client name")
        self.check_names(
            data.get("components"), "components", _COMPONENT_NAME, "a Python identifier"
        )
        if "lifecycle" in values:
            self.check_lifecycle(values["lifecycle"])
        service: Any = values.get("service", _empty())
        # A model is decoded from the raw table (not the frozen copy) and also
        # when the table is absent, so that its required keys are reported.
        if self.service_model is not None and ("service" in values or "service" not in data):
            service = self.decode(self.service_model, data.get("service", {}), "service")

        if self.issues:
            raise ConfigError(_in_file_order(self.issues, data))
        # No issues means every check above produced its result.
        assert types is not None
        assert specs is not None
        assert runtime is not None
        # Built only now, when every field decoded; it fills in the defaults.
        document = _Document(**values)
        ports = {
            entry.kind: _effective_port(
                specs[entry.kind], env_ports.get(entry.kind), entry.port, runtime[entry.kind]
            )
            for entry in types
        }
        return Definition(
            source=self.source,
            name=service_name(document.name),
            types=types,
            version=document.version,
            language=document.language,
            product=document.product,
            envs=document.envs,
            log=document.log,
            features=MappingProxyType(features),
            clients=MappingProxyType(clients),
            runtime=MappingProxyType(runtime),
            service=service,
            lifecycle=document.lifecycle,
            components=document.components,
            tests=document.tests,
            full_name=document.name,
            deploy_env="" if deploy is None else deploy[1],
            cicd_test=cicd_test,
            environ=self.environ,
            _ports=MappingProxyType(ports),
        )

    def kind_spec(self, kind: str) -> KindSpec:
        spec = self.registry.kind(kind)
        assert spec is not None  # check_types only returns known kinds
        return spec

    def check_types(self, entries: tuple[str, ...]) -> tuple[ServiceType, ...] | None:
        """Parse ``"kind[:port]"`` entries; ``None`` if any is unusable."""
        if not entries:
            self.add("types", "expected at least one service kind, got an empty array")
            return None
        before = len(self.issues)
        parsed: list[ServiceType] = []
        seen: dict[str, int] = {}
        for index, entry in enumerate(entries):
            path = f"types[{index}]"
            name, colon, port_text = entry.partition(":")
            spec = self.registry.kind(name)
            if spec is None:
                self.add(path, self.unknown_kind(name))
                continue
            port = None
            if colon:
                if spec.default_port is None:
                    self.add(path, f"kind {quote(spec.name)} takes no port, got {quote(entry)}")
                    continue
                port = parse_port(port_text)
                if port is None:
                    self.add(path, f'expected {_PORT_EXPECTED} after ":", got {show(port_text)}')
                    continue
            if spec.name in seen:
                alias = "" if name == spec.name else f" ({quote(name)} is an alias)"
                where = f"types[{seen[spec.name]}]"
                self.add(path, f"kind {quote(spec.name)}{alias} is already listed at {where}")
                continue
            seen[spec.name] = index
            parsed.append(ServiceType(spec.name, port))
        for entry_spec in (self.kind_spec(entry.kind) for entry in parsed):
            if entry_spec.alone and len(entries) > 1:
                index = seen[entry_spec.name]
                others = ", ".join(quote(e) for i, e in enumerate(entries) if i != index)
                self.add(
                    f"types[{index}]",
                    f"kind {quote(entry_spec.name)} must be the only entry in types, "
                    f"got it with {others}",
                )
        return tuple(parsed) if len(self.issues) == before else None

    def check_envs(self, names: tuple[str, ...]) -> None:
        first: dict[str, int] = {}
        for index, name in enumerate(names):
            if name in first:
                self.add(
                    f"envs[{index}]", f"{quote(name)} is already listed at envs[{first[name]}]"
                )
            else:
                first[name] = index

    def check_runtime(
        self,
        tables: Mapping[str, Mapping[str, Mapping[str, Any]]],
        types: tuple[ServiceType, ...] | None,
        specs: Mapping[str, KindSpec] | None,
    ) -> dict[str, object] | None:
        """Decode ``[runtime.<kind>]`` and ``[services.<kind>]``; defaults for kinds without one.

        ``tables`` maps each section (``runtime``, ``services``) to its tables.
        """
        runtime: dict[str, object] = {}
        seen: dict[str, str] = {}
        for section, kinds in tables.items():
            for key, table in kinds.items():
                path = join_path(section, key)
                spec = self.registry.kind(key)
                if spec is None:
                    self.add(path, self.unknown_kind(key))
                    continue
                if specs is not None and spec.name not in specs:
                    self.add(path, f"kind {quote(spec.name)} is not in types")
                    continue
                if spec.name in seen:
                    same = (
                        ""
                        if seen[spec.name].startswith(section)
                        else " ([services.<kind>] is [runtime.<kind>] under its Mikros Go v0.19.0 "
                        "and Mikros Rust name: keep one)"
                    )
                    self.add(
                        path,
                        f"kind {quote(spec.name)} already has a table: {seen[spec.name]}{same}",
                    )
                    continue
                seen[spec.name] = path
                translated = self.mikros_keys(spec.settings, table, path)
                # Their keys are gone from the table now; they still count as
                # suggestions for a misspelt one.
                theirs = tuple(key.name for key in getattr(spec.settings, "mikros_keys", ()))
                settings = self.decode(spec.settings, translated, path, known=theirs)
                if settings is not None:
                    runtime[spec.name] = settings
        if types is None or specs is None:
            return None
        for entry in types:
            if entry.kind not in seen:
                settings = self.decode(
                    specs[entry.kind].settings, {}, join_path("runtime", entry.kind)
                )
                runtime[entry.kind] = settings
            settings = runtime.get(entry.kind)
            configured = getattr(settings, "port", None)
            if entry.port is not None and configured is not None and configured != entry.port:
                where = seen.get(entry.kind, join_path("runtime", entry.kind))
                self.add(
                    join_path(where, "port"),
                    f'conflicts with "{entry.kind}:{entry.port}" in types, got {show(configured)}; '
                    "set the port in one place",
                )
        return runtime if len(runtime) == len(types) else None

    def unknown_kind(self, name: str) -> str:
        reason = _MIKROS_ONLY_KINDS.get(name)
        if reason is not None:
            return f"kind {quote(name)} {reason}"
        return f"unknown kind {quote(name)}{suggest(name, self.registry.names(), noun='kinds')}"

    def mikros_keys(self, cls: type, table: Mapping[str, Any], path: str) -> Mapping[str, Any]:
        """``table`` with the keys of other Mikros versions (``cls.mikros_keys``) made ours.

        A value that does not fit is an issue at its key.
        """
        keys: tuple[MikrosKey, ...] = getattr(cls, "mikros_keys", ())
        if not keys or not isinstance(table, Mapping):
            return table
        fields = {spec.name: spec for spec in dataclasses.fields(cls)}
        out = dict(table)
        for key in keys:
            if key.name not in table:
                continue
            value = table[key.name]
            where = join_path(path, key.name)
            own = fields.get(key.name)
            if own is not None:
                if value == 0 and type(value) is int and key.unit in ("ns", "bytes"):
                    del out[key.name]  # Go's 0 is its default: ours stays
                    continue
                # Our key too: the other version's only above our own bound.
                bound = own.metadata.get("le")
                if not (type(value) is int and bound is not None and value > bound):
                    continue
            del out[key.name]
            try:
                converted = key.convert(value)
            except ValueError as error:
                self.add(where, f"expected {error}, got {show(value)}")
                continue
            targets = key.targets
            first = targets[0]
            if first != key.name and first in table:
                self.add(where, f"is {first} in Mikros Go's units; set one of them")
                continue
            for name in targets:
                # Go's 0 is "the default": ours stays. A key the file sets wins.
                if converted is not None and (name == key.name or name not in table):
                    out[name] = converted
        return out

    def mikros_var(self, name: str) -> tuple[str, str] | None:
        """``(variable, value)`` of the Mikros variable ``name``, per-service form first."""
        for form in mikros_env_forms(self.full_name, name):
            value = self.environ.get(form)
            if value is not None:
                return form, value
        return None

    def check_port_env(self, specs: Mapping[str, KindSpec]) -> dict[str, int]:
        """Ports from the kinds' environment variables, which win over the file."""
        ports: dict[str, int] = {}
        for kind, spec in specs.items():
            if spec.port_env is None or spec.default_port is None:
                continue
            found = self.mikros_var(spec.port_env)
            if found is None:
                continue
            variable, text = found
            port = parse_port(text)
            if port is None:
                self.add(
                    "types",
                    f"environment variable {variable} overrides the {kind} port: "
                    f"expected {_PORT_EXPECTED}, got {show(text)}",
                )
            else:
                ports[kind] = port
        return ports

    def check_clients(self, tables: Mapping[str, _ClientTable]) -> dict[str, ClientSettings]:
        """Where each client dials: a missing host or port comes from Mikros' coupled variables."""
        clients: dict[str, ClientSettings] = {}
        for name, table in tables.items():
            path = join_path("clients", name)
            host, port = table.host, table.port
            if port is None:
                port = self.coupled_port(path)
            if host is None:
                found = self.mikros_var(COUPLED_NAMESPACE_ENV)
                if found is None or not found[1]:
                    state = "is not set" if found is None else f"({found[0]}) is empty"
                    self.add(
                        path,
                        f"no host: Mikros dials {name}.<{COUPLED_NAMESPACE_ENV}>, and "
                        f"{COUPLED_NAMESPACE_ENV} {state}; set it, or give host",
                    )
                    continue
                host = f"{name}.{found[1]}"
            if port is not None:
                clients[name] = ClientSettings(host, port)
        return clients

    def coupled_port(self, path: str) -> int | None:
        found = self.mikros_var(COUPLED_PORT_ENV)
        if found is None:
            return _COUPLED_PORT_DEFAULT
        variable, text = found
        port = parse_port(text)
        if port is None or port == 0:
            self.add(
                join_path(path, "port"),
                f"no port, and environment variable {variable} (the port of clients without "
                f"one) is not a port: expected an integer between 1 and {_PORT_MAX}, "
                f"got {show(text)}",
            )
            return None
        return port

    def check_cicd(self) -> bool:
        found = self.mikros_var(CICD_ENV)
        if found is None:
            return False
        variable, text = found
        if text in _GO_TRUE or text in _GO_FALSE:
            return text in _GO_TRUE
        self.add(
            "",
            f"environment variable {variable}: expected a boolean as Mikros Go reads it "
            f"(true/false, 1/0, t/f, TRUE/FALSE, True/False), got {show(text)}",
        )
        return False

    def check_features(self, tables: Mapping[str, Mapping[str, Any]]) -> dict[str, FeatureConfig]:
        features: dict[str, FeatureConfig] = {}
        known = self.registry.features
        for name, table in tables.items():
            path = join_path("features", name)
            spec = known.get(name)
            if spec is None:
                self.add(
                    path, f"unknown feature {quote(name)}{suggest(name, known, noun='features')}"
                )
                continue
            enabled = self.decode(bool, table.get("enabled", False), join_path(path, "enabled"))
            settings_table = {key: value for key, value in table.items() if key != "enabled"}
            settings = self.decode(spec.settings, settings_table, path, known=("enabled",))
            if enabled is not None and settings is not None:
                features[name] = FeatureConfig(enabled, settings)
        for name, spec in known.items():
            if spec.always_on and name not in tables:
                settings = self.decode(spec.settings, {}, join_path("features", name))
                features[name] = FeatureConfig(False, settings)
        running = {
            name for name, config in features.items() if config.enabled or known[name].always_on
        }
        for name in sorted(running, key=list(features).index):
            for dependency in known[name].depends_on:
                if dependency not in running:
                    self.add(
                        join_path(join_path("features", dependency), "enabled"),
                        f"feature {quote(name)} needs feature {quote(dependency)}; "
                        f"enable it with [features.{dependency}] enabled = true",
                    )
        return features

    def check_names(self, table: object, path: str, pattern: re.Pattern[str], what: str) -> None:
        if not isinstance(table, Mapping):
            return  # the decoder already said it is no table
        for key in table:
            if not pattern.fullmatch(key):
                self.add(join_path(path, key), f"expected {what}, got {quote(key)}")

    def check_lifecycle(self, lifecycle: LifecycleSettings) -> None:
        # Drain runs inside the shutdown deadline, after the readiness delay;
        # the rest of the shutdown (stopping work-processing components,
        # flushing) needs what is left.
        delay, drain = lifecycle.readiness_delay, lifecycle.drain_timeout
        if delay + drain >= lifecycle.shutdown_timeout:
            self.add(
                "lifecycle.shutdown_timeout",
                "expected more than readiness_delay + drain_timeout "
                f"({delay:g} + {drain:g} = {delay + drain:g} s), "
                f"got {lifecycle.shutdown_timeout:g}",
            )


def parse_port(text: str) -> int | None:
    """``text`` as a TCP port (0-65535), or ``None`` if it is not one."""
    # Digits only: int() would also take " 80", "+80", "8_0" and non-ASCII
    # digits. And few of them: int() refuses more than 4300 digits with a
    # ValueError (CPython's guard against quadratic conversion).
    digits = text.lstrip("0") or "0"
    if not (text.isascii() and text.isdigit()) or len(digits) > len(str(_PORT_MAX)):
        return None
    port = int(digits)
    return port if port <= _PORT_MAX else None


def _effective_port(
    spec: KindSpec, from_env: int | None, from_types: int | None, settings: object
) -> int | None:
    if spec.default_port is None:
        return None
    for port in (from_env, from_types, getattr(settings, "port", None)):
        if port is not None:
            return int(port)
    return spec.default_port


def _in_file_order(issues: list[ConfigIssue], data: Mapping[str, Any]) -> list[ConfigIssue]:
    """Issues ordered by the position of their top-level key in the file.

    Checks run table by table, not line by line; sorting (stably) by the
    first key of the path lets a user fix the file from top to bottom.
    """
    order = {join_path("", key): index for index, key in enumerate(data)}

    def position(issue: ConfigIssue) -> int:
        head = re.match(r'"(?:[^"\\]|\\.)*"|[^.\[]*', issue.path)
        # Keys missing from the file (a missing required key) come first.
        return order.get(head.group() if head else "", -1)

    return sorted(issues, key=position)


# -- schema ------------------------------------------------------------------------


def definition_schema(
    registry: Registry | None = None, *, service_model: type | None = None
) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a whole ``service.toml``.

    Kinds, their ``[runtime.<kind>]`` tables and the features come from
    ``registry`` (default: the built-in one), and ``[service]`` is typed by
    ``service_model`` when given, so the schema matches what
    :func:`load_definition` accepts with the same arguments, except for
    rules that span keys (duplicates, ports, lifecycle sums).
    """
    registry = registry or default_registry()
    schema = json_schema(_Document)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "service.toml",
        **schema,
    }
    properties = schema["properties"]

    names = []
    for spec in registry.kinds.values():
        alternatives = "|".join(re.escape(name) for name in (spec.name, *spec.aliases))
        port = "(?::[0-9]+)?" if spec.default_port is not None else ""
        names.append(f"(?:{alternatives}){port}")
    properties["types"]["items"]["pattern"] = f"^(?:{'|'.join(names)})$"
    properties["types"]["minItems"] = 1

    kinds: dict[str, Any] = {}
    for spec in registry.kinds.values():
        for name in (spec.name, *spec.aliases):
            kinds[name] = _runtime_schema(spec.settings)
    for section in ("runtime", "services"):
        properties[section].update(properties=kinds, additionalProperties=False)

    features: dict[str, Any] = {}
    for name, feature in registry.features.items():
        table = json_schema(feature.settings)
        table["properties"] = {
            "enabled": {"type": "boolean", "default": False, "description": "Turn it on."},
            **table["properties"],
        }
        features[name] = table
    properties["features"].update(properties=features, additionalProperties=False)

    if service_model is not None:
        properties["service"] = {
            **json_schema(service_model),
            "description": properties["service"]["description"],
        }

    properties["clients"]["propertyNames"] = {"pattern": f"^{_CLIENT_NAME.pattern}$"}
    properties["components"]["propertyNames"] = {"pattern": f"^{_COMPONENT_NAME.pattern}$"}
    return schema


def _runtime_schema(cls: type) -> dict[str, Any]:
    """The schema of a kind's table: its fields, and the keys of other Mikros versions."""
    schema = json_schema(cls)
    properties = schema["properties"]
    key: MikrosKey
    for key in getattr(cls, "mikros_keys", ()):
        theirs = key.schema()
        ours = properties.get(key.name)
        if ours is None:
            properties[key.name] = theirs
        elif "maximum" in ours:
            # Our key too (read_timeout): theirs above our bound, or their 0
            # (their default, which leaves ours).
            theirs["exclusiveMinimum"] = ours["maximum"]
            theirs.pop("minimum", None)
            default = {
                "type": "integer",
                "minimum": 0,
                "maximum": 0,
                "description": f"{key.origin}: 0 is its default, and leaves ours.",
            }
            properties[key.name] = {"anyOf": [ours, theirs, default]}
    return schema
