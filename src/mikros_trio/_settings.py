"""Decode plain TOML data into frozen dataclasses, and describe them as JSON Schema.

One generic decoder serves every typed table of ``service.toml``: the
top-level document, ``[log]``, each kind's ``[runtime.<kind>]``, each
feature's settings and a user's ``[service]`` model. It never raises for bad
data: it returns *every* problem as a :class:`~mikros_trio.errors.ConfigIssue`
with the key path (``runtime.http.port``, ``types[1]``) and a message saying
what was expected and what was found.

Supported annotations: frozen dataclasses (nested), ``str``, ``int`` (not
``bool``), ``float`` (accepts ``int``; not ``bool``, not ``nan``/``inf``),
``bool``, ``datetime``/``date``/``time`` (as :mod:`tomllib` gives them),
``X | None``, unions of those, ``Literal[...]``, ``list[X]`` /
``tuple[X, ...]`` / ``Sequence[X]`` (decoded into a tuple),
``Mapping[str, X]`` / ``dict[str, X]`` (decoded into a read-only
:class:`~types.MappingProxyType`) and ``Any`` (frozen recursively).

Field ``metadata`` keys, read by both the decoder and :func:`json_schema`:

- ``help``: a sentence for humans; becomes the schema ``description``.
- ``ge`` / ``gt`` / ``le`` / ``lt``: numeric bounds.
- ``pattern``: a regular expression a string must match in full, written in
  the common subset of Python and ECMA-262 syntax (it goes into the schema).
- ``expect``: replaces the generated description of an acceptable value in
  messages, for patterns no reader would decipher.

Bounds, ``pattern`` and ``expect`` apply to the scalars of the field,
including the items of a sequence or mapping field.

Decoders are compiled once per type and cached, because a service decodes
its definition at every start and the annotations are strings that
:func:`typing.get_type_hints` has to evaluate.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, Union, get_args, get_origin

from .errors import ConfigIssue

__all__ = [
    "decode",
    "decode_fields",
    "freeze",
    "join_path",
    "json_schema",
    "quote",
    "show",
    "suggest",
]

T = TypeVar("T")

_NoneType: Final = type(None)

# What a decoder returns instead of a value when it reported an issue. A
# sentinel rather than ``None`` because ``None`` is a valid decoded value for
# optional fields.
_INVALID: Final = object()

# A key TOML can write bare; any other key is quoted in key paths, so that
# ``clients."my.db".port`` stays unambiguous.
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


# -- small public helpers (also used by the definition layer) ----------------


def suggest(name: str, candidates: Iterable[str], *, noun: str | None = "keys") -> str:
    """The tail of an "unknown name" message: a close match, or the valid names.

    Returns ``'; did you mean "port"?'`` when a candidate is close to
    ``name``, otherwise ``"; valid keys: host, port"`` (with ``noun`` in
    place of ``keys``), or ``""`` when there are no candidates or ``noun`` is
    ``None``.

    >>> suggest("prot", ["host", "port"])
    '; did you mean "port"?'
    >>> suggest("x", ["host", "port"])
    '; valid keys: host, port'
    """
    options = list(dict.fromkeys(candidates))
    close = difflib.get_close_matches(name, options, n=1)
    if close:
        return f"; did you mean {quote(close[0])}?"
    if noun is None or not options:
        return ""
    return f"; valid {noun}: {', '.join(options)}"


def join_path(path: str, key: object) -> str:
    """The key path of ``key`` inside the table at ``path``.

    Keys that TOML could not write bare are quoted, as TOML would.

    >>> join_path("runtime", "http")
    'runtime.http'
    >>> join_path("clients", "my.db")
    'clients."my.db"'
    """
    text = str(key)
    if not _BARE_KEY.fullmatch(text):
        text = quote(text, limit=None)
    return f"{path}.{text}" if path else text


_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def quote(text: str, *, limit: int | None = 60) -> str:
    """``text`` as a TOML basic string, shortened to ``limit`` characters.

    Messages quote what the user wrote; escaping keeps a stray newline or
    control character from breaking the one-issue-per-line output.

    >>> quote('say "hi"')
    '"say \\\\"hi\\\\""'
    """
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return '"' + "".join(_escape(char) for char in text) + '"'


def show(value: object) -> str:
    """How a message names a value the user wrote: ``"abc" (string)``, ``3 (integer)``.

    >>> show("abc"), show(3), show(True), show([1])
    ('"abc" (string)', '3 (integer)', 'true (boolean)', 'an array')
    """
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (boolean)"
    if isinstance(value, int):
        text = str(value)
        return f"{text if len(text) <= 40 else text[:37] + '...'} (integer)"
    if isinstance(value, float):
        return f"{_float_text(value)} (float)"
    if isinstance(value, str):
        return f"{quote(value)} (string)"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, datetime.datetime):
        return f"{value.isoformat()} (date-time)"
    if isinstance(value, datetime.date):
        return f"{value.isoformat()} (date)"
    if isinstance(value, datetime.time):
        return f"{value.isoformat()} (time)"
    if value is None:
        return "nothing"
    return f"a {type(value).__name__}"


def _float_text(value: float) -> str:
    # TOML spells the special values in lower case without a sign for nan.
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def _number_text(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def freeze(value: object) -> Any:
    """A read-only deep copy: tables become ``MappingProxyType``, arrays tuples.

    Used for free-form data (``Any`` fields, ``[service]`` without a model)
    so that a frozen definition stays frozen all the way down.
    """
    if isinstance(value, Mapping):
        return MappingProxyType({key: freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    return value


# -- type classification -------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Rules:
    """The metadata of one field that constrains its scalar values."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    pattern: str | None = None
    expect: str | None = None

    @classmethod
    def of(cls, metadata: Mapping[str, Any]) -> _Rules:
        return cls(
            ge=metadata.get("ge"),
            gt=metadata.get("gt"),
            le=metadata.get("le"),
            lt=metadata.get("lt"),
            pattern=metadata.get("pattern"),
            expect=metadata.get("expect"),
        )

    def within(self, value: float) -> bool:
        # Written as "not out of range" per bound; callers reject nan first.
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def bounds_text(self) -> str:
        low = (">=", self.ge) if self.ge is not None else (">", self.gt)
        high = ("<=", self.le) if self.le is not None else ("<", self.lt)
        if self.ge is not None and self.le is not None:
            return f" between {_number_text(self.ge)} and {_number_text(self.le)}"
        parts = [f"{op} {_number_text(bound)}" for op, bound in (low, high) if bound is not None]
        return (" " + " and ".join(parts)) if parts else ""


_NO_RULES: Final = _Rules()

_SCALAR_NAMES: Final[Mapping[type, str]] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    datetime.datetime: "a date-time",
    datetime.date: "a date",
    datetime.time: "a time",
}

_Shape = Literal["any", "scalar", "literal", "union", "sequence", "mapping", "dataclass"]


def _classify(tp: Any) -> tuple[_Shape, tuple[Any, ...]]:
    """Sort an annotation into one of the shapes the decoder knows.

    Raises ``TypeError`` for anything else: that is a bug in a settings
    class, not a user mistake, so it must not be reported as a config issue.
    """
    if tp is Any or tp is object:
        return "any", ()
    if tp in _SCALAR_NAMES:
        return "scalar", (tp,)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return "dataclass", (tp,)
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        return "literal", args
    if origin is Union or origin is types.UnionType:
        return "union", args
    if tp in (list, tuple) or origin in (list, Sequence):
        return "sequence", (args[0] if args else Any,)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return "sequence", (args[0],)
        raise TypeError(f"only tuple[X, ...] is supported in settings, not {tp!r}")
    if tp is dict or origin in (dict, Mapping):
        if args and args[0] is not str:
            raise TypeError(f"settings mappings need str keys, not {tp!r}")
        return "mapping", (args[1] if args else Any,)
    raise TypeError(f"unsupported type in settings: {tp!r}")


def _describe(tp: Any, rules: _Rules) -> str:
    """What an acceptable value is, for "expected ..." messages."""
    shape, args = _classify(tp)
    if shape == "scalar":
        if rules.expect is not None:
            return rules.expect
        text = _SCALAR_NAMES[args[0]]
        if args[0] in (int, float):
            text += rules.bounds_text()
        elif args[0] is str and rules.pattern is not None:
            text += f" matching {rules.pattern}"
        return text
    if shape == "literal":
        return "one of " + ", ".join(_literal_text(arg) for arg in args)
    if shape == "union":
        names = [_describe(arg, rules) for arg in args if arg is not _NoneType]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if shape == "sequence":
        return "an array"
    if shape in ("mapping", "dataclass"):
        return "a table"
    return "any value"


def _literal_text(value: object) -> str:
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# -- decoding --------------------------------------------------------------------


class _Out:
    """Where decoders report issues: the source file and the list so far."""

    __slots__ = ("issues", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.issues: list[ConfigIssue] = []

    def add(self, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.source, path, message))


# A compiled decoder: (value, key path, out) -> decoded value or _INVALID.
_Decoder = Callable[[object, str, _Out], object]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    # An integer too large for a float is as wrong as inf.
    return isinstance(value, int) and abs(value) <= 2**1023


def _is_date(value: object) -> bool:
    # datetime is a subclass of date; a date field must not take a date-time.
    return isinstance(value, datetime.date) and not isinstance(value, datetime.datetime)


_ACCEPTS: Final[Mapping[type, Callable[[object], bool]]] = {
    str: lambda value: isinstance(value, str),
    int: _is_int,
    float: _is_number,
    bool: lambda value: isinstance(value, bool),
    datetime.datetime: lambda value: isinstance(value, datetime.datetime),
    datetime.date: _is_date,
    datetime.time: lambda value: isinstance(value, datetime.time),
}


@functools.cache
def _compile(tp: Any, rules: _Rules) -> _Decoder:
    """The decoder of one annotation under one field's rules, built once."""
    shape, args = _classify(tp)
    if shape == "any":
        return lambda value, path, out: freeze(value)
    if shape == "scalar":
        return _scalar_decoder(args[0], rules)
    if shape == "literal":
        return _literal_decoder(args)
    if shape == "union":
        return _union_decoder(tp, args, rules)
    if shape == "sequence":
        return _sequence_decoder(_compile(args[0], rules))
    if shape == "mapping":
        return _mapping_decoder(_compile(args[0], rules))
    cls = args[0]
    return lambda value, path, out: _decode_dataclass(cls, value, path, out, ())


def _scalar_decoder(tp: type, rules: _Rules) -> _Decoder:
    accepts = _ACCEPTS[tp]
    expected = _describe(tp, rules)
    pattern = re.compile(rules.pattern, re.ASCII) if rules.pattern is not None else None
    numeric = tp in (int, float)

    def decode_scalar(value: object, path: str, out: _Out) -> object:
        # The casts are safe: ``accepts`` has just checked the type.
        ok = accepts(value)
        if ok and numeric:
            ok = rules.within(typing.cast("float", value))
        if ok and pattern is not None:
            ok = pattern.fullmatch(typing.cast("str", value)) is not None
        if not ok:
            out.add(path, f"expected {expected}, got {show(value)}")
            return _INVALID
        return float(typing.cast("float", value)) if tp is float else value

    return decode_scalar


def _literal_decoder(choices: tuple[Any, ...]) -> _Decoder:
    expected = "one of " + ", ".join(_literal_text(choice) for choice in choices)
    words = [choice for choice in choices if isinstance(choice, str)]

    def decode_literal(value: object, path: str, out: _Out) -> object:
        for choice in choices:
            # Compare types too: True == 1, but true is no answer to Literal[1].
            if type(value) is type(choice) and value == choice:
                return choice
        hint = suggest(value, words, noun=None) if isinstance(value, str) else ""
        out.add(path, f"expected {expected}, got {show(value)}{hint}")
        return _INVALID

    return decode_literal


def _union_decoder(tp: Any, args: tuple[Any, ...], rules: _Rules) -> _Decoder:
    optional = _NoneType in args
    alternatives = tuple(_compile(arg, rules) for arg in args if arg is not _NoneType)
    if len(alternatives) == 1:
        # ``X | None``: TOML cannot write None, so this is just X (with None
        # accepted from Python callers), and X's own message is the best one.
        (only,) = alternatives

        def decode_optional(value: object, path: str, out: _Out) -> object:
            return None if value is None and optional else only(value, path, out)

        return decode_optional

    expected = _describe(tp, rules)

    def decode_union(value: object, path: str, out: _Out) -> object:
        if value is None and optional:
            return None
        deeper: list[ConfigIssue] | None = None
        for alternative in alternatives:
            trial = _Out(out.source)
            result = alternative(value, path, trial)
            if result is not _INVALID:
                return result
            # An alternative that accepted the value's shape and failed
            # inside it (a table with a bad key) says more than "expected X
            # or Y"; keep the first such explanation.
            if deeper is None and all(issue.path != path for issue in trial.issues):
                deeper = trial.issues
        if deeper:
            out.issues.extend(deeper)
        else:
            out.add(path, f"expected {expected}, got {show(value)}")
        return _INVALID

    return decode_union


def _sequence_decoder(item: _Decoder) -> _Decoder:
    def decode_sequence(value: object, path: str, out: _Out) -> object:
        if not isinstance(value, list | tuple):
            out.add(path, f"expected an array, got {show(value)}")
            return _INVALID
        items = []
        ok = True
        for index, element in enumerate(value):
            result = item(element, f"{path}[{index}]", out)
            if result is _INVALID:
                ok = False
            else:
                items.append(result)
        return tuple(items) if ok else _INVALID

    return decode_sequence


def _mapping_decoder(item: _Decoder) -> _Decoder:
    def decode_mapping(value: object, path: str, out: _Out) -> object:
        if not isinstance(value, Mapping):
            out.add(path, f"expected a table, got {show(value)}")
            return _INVALID
        items = {}
        ok = True
        for key, element in value.items():
            if not isinstance(key, str):
                out.add(path, f"expected string keys, got {show(key)}")
                ok = False
                continue
            result = item(element, join_path(path, key), out)
            if result is _INVALID:
                ok = False
            else:
                items[key] = result
        return MappingProxyType(items) if ok else _INVALID

    return decode_mapping


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """How to decode one dataclass: its fields' decoders, resolved once."""

    decoders: Mapping[str, _Decoder]
    required: tuple[str, ...]


@functools.cache
def _plan(cls: type) -> _Plan:
    # Resolved lazily (at first decode, not at compile time) so that a
    # dataclass may refer to itself without infinite recursion.
    hints = typing.get_type_hints(cls)
    decoders: dict[str, _Decoder] = {}
    required: list[str] = []
    for spec in dataclasses.fields(cls):
        if not spec.init:
            continue
        decoders[spec.name] = _compile(hints[spec.name], _Rules.of(spec.metadata))
        if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            required.append(spec.name)
    return _Plan(MappingProxyType(decoders), tuple(required))


def _fields_into(
    cls: type, value: object, path: str, out: _Out, known: Collection[str]
) -> dict[str, Any] | None:
    """Decode the keys of the table ``value`` that are fields of ``cls``.

    Returns the fields that decoded (``None`` if ``value`` is no table);
    reports unknown keys (except ``known`` ones, which the caller handles),
    bad values and missing required keys, in the table's key order.
    """
    if not isinstance(value, Mapping):
        out.add(path, f"expected a table, got {show(value)}")
        return None
    plan = _plan(cls)
    values: dict[str, Any] = {}
    for key, element in value.items():
        decoder = plan.decoders.get(key)
        if decoder is not None:
            result = decoder(element, join_path(path, key), out)
            if result is not _INVALID:
                values[key] = result
        elif key not in known:
            hint = suggest(str(key), [*plan.decoders, *known])
            out.add(join_path(path, key), f"unknown key {quote(str(key))}{hint}")
    for name in plan.required:
        if name not in value:
            out.add(join_path(path, name), "missing required key")
    return values


def _decode_dataclass(
    cls: type, value: object, path: str, out: _Out, known: Collection[str]
) -> object:
    before = len(out.issues)
    values = _fields_into(cls, value, path, out, known)
    if values is None or len(out.issues) > before:
        return _INVALID
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        # A user model may validate in __post_init__; its complaint is a
        # config issue like any other, not a traceback.
        out.add(path, str(exc) or type(exc).__name__)
        return _INVALID


def decode(
    cls: type[T], data: object, *, source: str, path: str, known: Collection[str] = ()
) -> tuple[T | None, list[ConfigIssue]]:
    """Decode ``data`` (as :mod:`tomllib` returns it) into ``cls``.

    Returns the value and an empty list, or ``None`` and *every* issue found;
    never raises for bad data. ``source`` names the file in the issues,
    ``path`` is the key path of ``data`` inside it (``""`` for the whole
    document). For a dataclass, ``known`` lists extra keys the caller handles
    itself: they are not reported as unknown and are offered as suggestions.

    Raises ``TypeError`` only if ``cls`` uses an unsupported annotation.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Server:
    ...     port: int = 8080
    >>> decode(Server, {"port": 80}, source="x.toml", path="server")
    (Server(port=80), [])
    >>> decode(Server, {"prot": 80}, source="x.toml", path="server")[1][0].message
    'unknown key "prot"; did you mean "port"?'
    """
    out = _Out(source)
    if known and _classify(cls)[0] == "dataclass":
        result = _decode_dataclass(cls, data, path, out, known)
    else:
        annotation: Any = cls  # any supported annotation, not only classes
        result = _compile(annotation, _NO_RULES)(data, path, out)
    if result is _INVALID:
        return None, out.issues
    return typing.cast("T", result), out.issues


def decode_fields(
    cls: type, data: object, *, source: str, path: str
) -> tuple[dict[str, Any], list[ConfigIssue]]:
    """Decode the fields of dataclass ``cls`` from ``data`` without building it.

    For callers that validate further across fields: every field that
    decoded is in the returned dict (absent optional keys are not; their
    defaults apply), even when other fields have issues, so later checks
    still run on the good parts and report their issues too.
    """
    out = _Out(source)
    values = _fields_into(cls, data, path, out, ())
    return values or {}, out.issues


# -- JSON Schema -------------------------------------------------------------------


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the table that ``cls`` decodes.

    Properties carry types, defaults, bounds, ``enum`` for ``Literal``,
    ``pattern`` and a ``description`` from the ``help`` metadata; unknown
    keys are refused (``additionalProperties: false``). A fresh dict each
    call, so callers may extend it.
    """
    return _schema(cls, _NO_RULES)


def _schema(tp: Any, rules: _Rules) -> dict[str, Any]:
    shape, args = _classify(tp)
    if shape == "any":
        return {}
    if shape == "scalar":
        return _scalar_schema(args[0], rules)
    if shape == "literal":
        schema: dict[str, Any] = {"enum": list(args)}
        kinds = {_scalar_schema(type(arg), _NO_RULES)["type"] for arg in args}
        if len(kinds) == 1:
            schema["type"] = kinds.pop()
        return schema
    if shape == "union":
        options = [_schema(arg, rules) for arg in args if arg is not _NoneType]
        # TOML has no null, so ``X | None`` is just X in a document.
        return options[0] if len(options) == 1 else {"anyOf": options}
    if shape == "sequence":
        return {"type": "array", "items": _schema(args[0], rules)}
    if shape == "mapping":
        return {"type": "object", "additionalProperties": _schema(args[0], rules)}
    return _dataclass_schema(args[0])


def _scalar_schema(tp: type, rules: _Rules) -> dict[str, Any]:
    if tp is bool:
        return {"type": "boolean"}
    if tp is str:
        schema: dict[str, Any] = {"type": "string"}
        if rules.pattern is not None:
            schema["pattern"] = f"^(?:{rules.pattern})$"
        return schema
    if tp in (int, float):
        schema = {"type": "integer" if tp is int else "number"}
        for key, bound in (
            ("minimum", rules.ge),
            ("exclusiveMinimum", rules.gt),
            ("maximum", rules.le),
            ("exclusiveMaximum", rules.lt),
        ):
            if bound is not None:
                schema[key] = bound
        return schema
    # TOML dates and times have no JSON counterpart; tools that convert a
    # TOML document to JSON write them as RFC 3339 strings.
    formats = {datetime.datetime: "date-time", datetime.date: "date", datetime.time: "time"}
    return {"type": "string", "format": formats[tp]}


def _dataclass_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for spec in dataclasses.fields(cls):
        if not spec.init:
            continue
        schema = _schema(hints[spec.name], _Rules.of(spec.metadata))
        if "help" in spec.metadata:
            schema["description"] = spec.metadata["help"]
        if spec.default is not dataclasses.MISSING:
            default: object = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            required.append(spec.name)
            default = None
        # Nested tables document their own defaults; None cannot be written.
        if default is not None and not dataclasses.is_dataclass(default):
            schema["default"] = _jsonable(default)
        properties[spec.name] = schema
    result: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    doc = cls.__doc__ or ""
    # dataclass() invents a signature-like docstring when there is none.
    if doc and not doc.startswith(cls.__name__ + "("):
        result["description"] = doc.strip().splitlines()[0]
    if required:
        result["required"] = required
    return result


def _jsonable(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return value
