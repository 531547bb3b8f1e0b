"""Typed settings of the built-in kinds' ``[runtime.<kind>]`` tables.

Plain frozen dataclasses with no imports beyond the standard library, so the
definition layer can validate every kind's table without importing the kind
(and its network stack). Field ``metadata`` carries the help text and bounds
that both the validator and ``mikros-trio schema`` read:
``help`` (str), ``ge`` / ``gt`` / ``le`` / ``lt`` (numbers), ``pattern`` (a
regular expression for strings) and ``expect`` (wording for the "expected
..." part of an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal

__all__ = ["GrpcSettings", "HttpSettings", "MikrosKey", "ScriptSettings", "WorkerSettings"]

_PORT = {"help": "TCP port to listen on; 0 picks a free one.", "ge": 0, "le": 65535}

# Upper bounds: every number a file can hold is bounded, so an absurd one
# (1e300 seconds, 2**63 bytes) is a config error, not a crash at start.
_WEEK = 7 * 24 * 3600
# Connection lifetimes (gRPC's max_connection_age, keepalive) may span days.
_MAX_SECONDS = 30 * 24 * 3600.0
# gRPC's own largest message and flow-control window.
_MAX_BYTES = 2**31 - 1


# Mikros Go decodes its HTTP runtime's durations into time.Duration through
# JSON, so a TOML integer is nanoseconds. Bounded like our own timeouts.
_NS_PER_SECOND: Final = 1_000_000_000
_MAX_NS: Final = 3600 * _NS_PER_SECOND
# Go's net/http takes any int; a header block past 2 GiB is no header block.
_MAX_HEADER_BYTES: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class MikrosKey:
    """A key another Mikros version defines in a runtime table, and where it lands here.

    ``unit`` says how that version writes the value: ``"ns"`` an integer of
    nanoseconds (Go's ``time.Duration``; 0 is Go's own default and sets
    nothing), ``"bytes"`` an integer (0 likewise), ``"bool"``, ``"str"``.
    The value sets each of our fields in ``targets`` (all fields of the
    settings class) that the file does not set itself (nanoseconds become
    seconds). A key that is also one of our own
    fields (``read_timeout``) is the other version's only when its value is
    above our field's upper bound.
    """

    name: str
    unit: Literal["ns", "bytes", "bool", "str"]
    targets: tuple[str, ...]
    origin: str

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the value as the other Mikros version writes it."""
        if self.unit == "bool":
            schema: dict[str, Any] = {"type": "boolean"}
        elif self.unit == "str":
            schema = {"type": "string"}
        else:
            most = _MAX_NS if self.unit == "ns" else _MAX_HEADER_BYTES
            schema = {"type": "integer", "minimum": 0, "maximum": most}
        what = " in nanoseconds" if self.unit == "ns" else ""
        schema["description"] = f"{self.origin}{what}."
        return schema

    def convert(self, value: object) -> object:
        """The value for our fields; ``None`` for Go's "use the default"; raises ValueError."""
        if self.unit == "bool" and isinstance(value, bool):
            return value
        if self.unit == "str" and isinstance(value, str):
            return value
        most = _MAX_NS if self.unit == "ns" else _MAX_HEADER_BYTES
        if self.unit in ("ns", "bytes") and type(value) is int and 0 <= value <= most:
            if value == 0:
                return None
            return value / _NS_PER_SECOND if self.unit == "ns" else value
        expected = {
            "ns": f"an integer of nanoseconds between 0 and {most} (Mikros Go's time.Duration; "
            "a string makes Mikros Go ignore the whole table)",
            "bytes": f"an integer between 0 and {most}",
            "bool": "a boolean",
            "str": "a string",
        }[self.unit]
        raise ValueError(expected)


_GO_HTTP = "Mikros Go's HTTP runtime key"


def _seconds(default: float | None, help: str, *, most: float = 3600) -> Any:
    """A timeout field: seconds above zero, at most ``most`` (a typo must not disable it)."""
    return field(default=default, metadata={"help": help, "gt": 0, "le": most})


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """``[runtime.worker]``: a long-running loop, or a periodic job (``interval``)."""

    provider: str = field(
        default="worker",
        metadata={"help": "Container provider that gives the worker (an async callable)."},
    )
    interval: float | None = field(
        default=None,
        metadata={
            "help": "Run the worker's run_once (or the worker itself) every this many seconds "
            "instead of calling run once; each iteration is logged, timed and traced.",
            "gt": 0,
            "le": _WEEK,
        },
    )
    max_backoff: float = _seconds(
        300.0,
        "With interval: after k failed iterations in a row the next one waits "
        "interval * 2**(k-1) seconds, at most this many (never less than interval).",
        most=_WEEK,
    )
    unhealthy_after: int = field(
        default=3,
        metadata={
            "help": "With interval: this many failed iterations in a row mark the worker not ok "
            "on /healthz and turn readiness off until one succeeds; 0 never does.",
            "ge": 0,
            "le": 1_000_000,
        },
    )
    report_idle: bool = field(
        default=False,
        metadata={
            "help": "With interval: log idle iterations (run_once returned False) at info and "
            "trace them, as any other; by default they log at debug and make no span.",
        },
    )


@dataclass(frozen=True, slots=True)
class ScriptSettings:
    """``[runtime.script]``: a one-shot entry point whose result is the exit code."""

    provider: str = field(
        default="script",
        metadata={"help": "Container provider that gives the script (an async callable)."},
    )


def _described(default: bool | tuple[str, ...], help: str) -> Any:
    """A field with no bounds: a flag, or a list of names (origins, methods, headers)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """``[runtime.http]``: the HTTP server.

    Also takes Mikros Go's keys (:attr:`mikros_keys`): its nanosecond
    timeouts become our seconds (``write_timeout`` is ``send_timeout``,
    ``idle_timeout`` ``keep_alive_timeout``, ``read_timeout`` bounds both
    the head and the body), and ``disable_auth``, ``cors_strict``,
    ``base_path`` and ``max_header_bytes`` reach the fields of those names.
    """

    mikros_keys: ClassVar[tuple[MikrosKey, ...]] = (
        MikrosKey("read_timeout", "ns", ("read_timeout", "body_timeout"), _GO_HTTP),
        MikrosKey("write_timeout", "ns", ("send_timeout",), _GO_HTTP),
        MikrosKey("idle_timeout", "ns", ("keep_alive_timeout",), _GO_HTTP),
        MikrosKey("max_header_bytes", "bytes", ("max_header_bytes",), _GO_HTTP),
        MikrosKey("base_path", "str", ("base_path",), _GO_HTTP),
        MikrosKey("disable_auth", "bool", ("disable_auth",), _GO_HTTP),
        MikrosKey("cors_strict", "bool", ("cors_strict",), _GO_HTTP),
    )

    host: str = field(default="0.0.0.0", metadata={"help": "Address to bind."})
    port: int | None = field(default=None, metadata=_PORT)
    app: str = field(
        default="app",
        metadata={"help": "Container provider that gives the ASGI app (a QuartTrio app)."},
    )
    admin_port: int | None = field(
        default=None,
        metadata={
            "help": "Serve probes (and metrics) on this port instead of the main one; "
            "0 picks a free one.",
            "ge": 0,
            "le": 65535,
        },
    )
    max_body_size: int = field(
        default=1024 * 1024,
        metadata={
            "help": "Largest request body accepted, in bytes; larger gets 413.",
            "gt": 0,
            "le": 2**40,
        },
    )
    read_timeout: float = _seconds(
        30.0,
        "Seconds a client owing bytes (a request's head or body) may send nothing; "
        "then the connection closes.",
    )
    keep_alive_timeout: float = _seconds(
        5.0,
        "Seconds an idle keep-alive connection stays open; a request's line and headers "
        "must arrive within it.",
    )
    body_timeout: float = _seconds(
        30.0,
        "Seconds a handler waits for a whole request body; slower gets 408 and the "
        "connection closes.",
    )
    send_timeout: float = _seconds(
        30.0,
        "Seconds a response may wait for the client to read (TCP, or an HTTP/2 flow-control "
        "window); past it the connection (HTTP/2: the stream) is dropped.",
    )
    h2_max_concurrent_streams: int = field(
        default=100,
        metadata={
            "help": "HTTP/2 streams one connection may have open; a client opening more "
            "loses the connection (GOAWAY).",
            "ge": 1,
            "le": 10000,
        },
    )
    certfile: str | None = field(
        default=None, metadata={"help": "TLS certificate (PEM); TLS is on when set with keyfile."}
    )
    keyfile: str | None = field(default=None, metadata={"help": "TLS private key (PEM)."})
    # Go Mikros' HTTP runtime keys, under the names Go gives them.
    base_path: str = field(
        default="",
        metadata={
            "help": "Serve the app under this path prefix (Go's base_path: a leading / added, "
            'trailing / dropped, "/" is the root); other paths get 404. Probes and /metrics '
            "stay at the root.",
            "pattern": r"\s*[^?#\s]*\s*",
            "expect": "a URL path without ?, # or spaces",
        },
    )
    max_header_bytes: int = field(
        default=64 * 1024,
        metadata={
            "help": "Largest request head (request line and headers; on HTTP/2 the header "
            "list) accepted, in bytes; larger gets 431.",
            "ge": 1,
            "le": 16 * 1024 * 1024,
        },
    )
    cors_allowed_origins: tuple[str, ...] = _described(
        (),
        'Origins allowed cross-origin requests ("https://app.example", or "*" for any); '
        "CORS is on when not empty.",
    )
    cors_allowed_methods: tuple[str, ...] = _described(
        ("GET", "HEAD", "POST"), "Methods a preflight allows (Access-Control-Allow-Methods)."
    )
    cors_allowed_headers: tuple[str, ...] = _described(
        (),
        "Request headers a preflight allows; empty allows the ones it asks for "
        "(as Go Mikros does).",
    )
    cors_exposed_headers: tuple[str, ...] = _described(
        (), "Response headers scripts may read (Access-Control-Expose-Headers)."
    )
    cors_allow_credentials: bool = _described(
        False, 'Let browsers send cookies and credentials (not with origin "*").'
    )
    cors_max_age: int = field(
        default=0,
        metadata={
            "help": "Seconds a browser may cache a preflight's answer; 0 sends none.",
            "ge": 0,
            "le": 86400,
        },
    )
    cors_strict: bool = _described(
        True,
        'An invalid CORS setting (no methods; origin "*" with credentials) fails the start; '
        "false logs a warning and serves without CORS (Go's cors_strict).",
    )
    auth: str | None = field(
        default=None,
        metadata={
            "help": "Container provider giving the auth hook, called before the app for every "
            "request (see mikros_trio.http.AuthRequest); none: no auth."
        },
    )
    disable_auth: bool = _described(
        False, "Serve without the auth hook even when one is set (Go's disable_auth)."
    )

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together: set both for TLS, or neither")
        # Go's normalisation: "api/v1/" is "/api/v1"; "" and "/" mount at the root.
        base = self.base_path.strip().rstrip("/")
        if base and not base.startswith("/"):
            base = "/" + base
        object.__setattr__(self, "base_path", base)
        if self.cors_strict and (problem := self.cors_problem()):
            raise ValueError(f"invalid CORS settings: {problem} (or set cors_strict = false)")

    def cors_problem(self) -> str:
        """What makes the CORS settings unusable (Go's rules), or "" when they are fine."""
        if not self.cors_allowed_origins:
            return ""
        if "*" in self.cors_allowed_origins and self.cors_allow_credentials:
            return 'cors_allowed_origins has "*" but cors_allow_credentials is true'
        if not self.cors_allowed_methods:
            return "cors_allowed_methods is empty"
        return ""


@dataclass(frozen=True, slots=True)
class GrpcSettings:
    """``[runtime.grpc]``: the gRPC server."""

    host: str = field(default="0.0.0.0", metadata={"help": "Address to bind."})
    port: int | None = field(default=None, metadata=_PORT)
    servicers: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Container providers giving the purerpc servicers; "
            "empty serves every purerpc.Servicer provider."
        },
    )
    max_message_size: int = field(
        default=4 * 1024 * 1024,
        metadata={"help": "Largest message accepted, in bytes.", "gt": 0, "le": _MAX_BYTES},
    )
    # HTTP/2 bounds: what one connection may cost.
    max_concurrent_streams: int = field(
        default=100,
        metadata={
            "help": "RPCs one connection may have in flight (advertised to clients); "
            "streams beyond it are refused (REFUSED_STREAM, safe to retry).",
            "ge": 1,
            "le": 65536,
        },
    )
    max_connection_buffer: int = field(
        default=16 * 1024 * 1024,
        metadata={
            "help": "Bytes of request data one connection may have sent and its handlers "
            "not yet read (its HTTP/2 flow-control window); each stream may hold "
            "one max_message_size message.",
            "ge": 65535,
            "le": _MAX_BYTES,
        },
    )
    max_resets_per_second: int = field(
        default=200,
        metadata={
            "help": "Streams a client may reset (RST_STREAM) per second on one connection; "
            "more is the HTTP/2 rapid-reset attack: GOAWAY ENHANCE_YOUR_CALM, then close.",
            "ge": 1,
            "le": 1_000_000,
        },
    )
    send_stall_timeout: float = _seconds(
        30.0,
        "Seconds a response may wait for a client that stopped reading "
        "(flow-control window closed) before its stream is reset.",
        most=_MAX_SECONDS,
    )
    # Connection management, after grpc-go's keepalive.ServerParameters and EnforcementPolicy.
    max_connection_idle: float | None = _seconds(
        300.0,
        "Seconds a connection may go with no RPC in flight before the server "
        "closes it (GOAWAY first; clients reconnect on their next call).",
        most=_MAX_SECONDS,
    )
    max_connection_age: float | None = _seconds(
        None,
        "Seconds (with 10% jitter) after which a connection is drained "
        "(GOAWAY; new RPCs go to a new connection): spreads clients over replicas.",
        most=_MAX_SECONDS,
    )
    max_connection_age_grace: float = _seconds(
        30.0,
        "Seconds RPCs in flight get after max_connection_age before the "
        "connection is closed under them.",
        most=_MAX_SECONDS,
    )
    keepalive_time: float | None = _seconds(
        120.0,
        "Seconds without receiving anything after which the server pings the "
        "client to see that it is still there.",
        most=_MAX_SECONDS,
    )
    keepalive_timeout: float = _seconds(
        20.0,
        "Seconds the server waits for the ping's answer before closing the connection.",
        most=_MAX_SECONDS,
    )
    keepalive_min_time: float = field(
        default=300.0,
        metadata={
            "help": "Shortest interval between a client's pings; a client pinging more "
            "often (more than max_ping_strikes times) gets GOAWAY ENHANCE_YOUR_CALM "
            '"too_many_pings" and is disconnected.',
            "ge": 0,
            "le": _MAX_SECONDS,
        },
    )
    keepalive_permit_without_calls: bool = field(
        default=False,
        metadata={
            "help": "Accept client pings on a connection with no RPC in flight (else each "
            "such ping is a strike)."
        },
    )
    max_ping_strikes: int = field(
        default=2,
        metadata={"help": "Pings too soon tolerated before the GOAWAY.", "ge": 0, "le": 1000},
    )
