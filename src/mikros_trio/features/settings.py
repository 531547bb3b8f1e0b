"""Typed ``[features.<name>]`` tables of the built-in features (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "HIDE_FIELDS_ENV",
    "METRICS_PORT_ENV",
    "EnvSettings",
    "ErrorsSettings",
    "LoggerSettings",
    "MetricsSettings",
    "TracingSettings",
]


@dataclass(frozen=True, slots=True)
class LoggerSettings:
    """``[features.logger]``: where log lines go (level, format and attributes are in ``[log]``)."""

    output: str = field(
        default="stdout",
        metadata={"help": 'Where lines go: "stdout", "stderr", or a file path (appended to).'},
    )
    access_log: bool = field(
        default=True,
        metadata={"help": "One line per HTTP request, gRPC call, worker iteration and script run."},
    )
    flush_interval: float = field(
        default=0.01,
        metadata={
            "help": "Seconds a debug or info line may wait in the output buffer while the "
            "service runs (one write per interval on a busy service); 0 flushes every line. "
            "Warnings, errors and shutdown lines are always flushed at once.",
            "ge": 0,
            "le": 60,
        },
    )


#: Environment variable listing error fields never sent (Mikros Rust's name),
#: comma-separated; added to ``[features.errors] hide_fields``.
HIDE_FIELDS_ENV = "MIKROS_HIDE_RESPONSE_FIELDS"

#: What ``hide_fields`` accepts (``cause`` is Go main's name of ``details``).
HideableField = Literal["message", "service_name", "destination", "attributes", "details", "cause"]


@dataclass(frozen=True, slots=True)
class ErrorsSettings:
    """``[features.errors]``: how errors are shown to callers."""

    expose_details: bool = field(
        default=True,
        metadata={
            "help": "Put an unexpected exception's text in the error's details field, as "
            "Mikros Go does; false sends only 'internal error'."
        },
    )
    grpc_status: Literal["unknown", "mapped"] = field(
        default="unknown",
        metadata={
            "help": "gRPC status of a Mikros error: unknown (UNKNOWN for every kind, as Mikros "
            "Go v0.19.0 and Rust servers send; every Mikros client reads the kind) or mapped "
            "(NOT_FOUND, INVALID_ARGUMENT… as Go main sends; Go v0.19.0 clients then read "
            "every kind as InternalError)."
        },
    )
    hide_fields: tuple[HideableField, ...] = field(
        default=(),
        metadata={
            "help": "Error fields never sent to callers (code and kind always are); "
            f"{HIDE_FIELDS_ENV}, comma-separated as Mikros Rust reads it, adds to them."
        },
    )


@dataclass(frozen=True, slots=True)
class EnvSettings:
    """``[features.env]``: which environment variables hold secrets."""

    secrets: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Names from envs whose values are never logged or shown in errors "
            "(read them with env.secret).",
            "pattern": r"^[A-Z_][A-Z0-9_]*$",
            "expect": "an environment variable name in upper case (A-Z, 0-9, _)",
        },
    )


#: Environment variable that overrides ``[features.metrics] port``, as
#: ``MIKROS_HTTP_PORT`` does the HTTP port (the test harness sets it to 0).
METRICS_PORT_ENV = "MIKROS_METRICS_PORT"

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``[features.metrics]``: Prometheus metrics."""

    path: str = field(
        default="/metrics",
        metadata={"help": "Path the metrics are served at.", "pattern": r"^/[^\s]*$"},
    )
    host: str = field(
        default="0.0.0.0",
        metadata={"help": "Address of the metrics listener of a service without an HTTP kind."},
    )
    port: int = field(
        default=9090,
        metadata={
            "help": "Port of the metrics listener of a service without an HTTP kind "
            "(with one, metrics are on its port or admin_port); 0 picks a free one.",
            "ge": 0,
            "le": 65535,
        },
    )
    buckets: tuple[float, ...] = field(
        default=_BUCKETS,
        metadata={"help": "Upper bounds, in seconds, of the duration histograms' buckets."},
    )

    def __post_init__(self) -> None:
        # prometheus-client would raise at build time; say it at config time instead.
        bounds = self.buckets
        if not bounds:
            raise ValueError("buckets must list at least one upper bound")
        if any(not 0 < bound < float("inf") for bound in bounds):
            raise ValueError(f"buckets must be positive, finite numbers of seconds, got {bounds}")
        if tuple(sorted(set(bounds))) != tuple(bounds):
            raise ValueError(f"buckets must be in increasing order, got {bounds}")


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """``[features.tracing]``: OpenTelemetry spans."""

    exporter: Literal["otlp", "console", "memory", "none"] = field(
        default="otlp",
        metadata={
            "help": "Where spans go: otlp (needs the otlp extra), console (stderr), "
            "memory (kept for tests) or none (spans are made and dropped)."
        },
    )
    endpoint: str = field(
        default="",
        metadata={
            "help": "OTLP/HTTP traces endpoint; empty uses OTEL_EXPORTER_OTLP_* or the SDK default."
        },
    )
    sample_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Share of new traces recorded (incoming sampled traces are kept).",
            "ge": 0,
            "le": 1,
        },
    )
    flush_timeout: float = field(
        default=5.0,
        metadata={
            "help": "Longest the exit waits for buffered spans to be sent, in seconds "
            "(also each OTLP request's timeout).",
            "gt": 0,
            "le": 3600,
        },
    )
