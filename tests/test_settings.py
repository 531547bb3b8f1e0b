"""The generic decoder of frozen settings dataclasses, and their JSON Schema."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from dataclasses import FrozenInstanceError, dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mikros_trio import _settings
from mikros_trio._settings import (
    decode,
    decode_fields,
    freeze,
    join_path,
    json_schema,
    quote,
    show,
    suggest,
)
from mikros_trio.errors import ConfigIssue


@dataclass(frozen=True, slots=True)
class Inner:
    """A nested table."""

    port: int = field(default=8080, metadata={"help": "Port.", "ge": 0, "le": 65535})
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Sample:
    """Every supported annotation, once."""

    name: str
    ratio: float = field(default=0.5, metadata={"gt": 0, "lt": 1})
    count: int | None = None
    flag: bool = False
    level: Literal["debug", "info"] = "info"
    inner: Inner = field(default_factory=Inner)
    items: list[int] = field(default_factory=list)
    labels: Mapping[str, str | int] = field(default_factory=lambda: MappingProxyType({}))
    extra: Any = None
    when: datetime.date | None = None
    code: str = field(default="AB", metadata={"pattern": "[A-Z]+", "help": "Upper-case code."})


def decode_sample(data: object) -> tuple[Sample | None, list[ConfigIssue]]:
    return decode(Sample, data, source="s.toml", path="root")


def only_issue(data: object) -> ConfigIssue:
    value, issues = decode_sample(data)
    assert value is None
    assert len(issues) == 1, issues
    return issues[0]


def test_decodes_a_full_table() -> None:
    """Every supported annotation decodes into its frozen form."""
    value, issues = decode_sample(
        {
            "name": "svc",
            "ratio": 1 / 4,
            "count": 3,
            "flag": True,
            "level": "debug",
            "inner": {"port": 9000, "tags": ["a", "b"]},
            "items": [1, 2],
            "labels": {"team": "x", "shard": 2},
            "extra": {"deep": [{"x": [1]}]},
            "when": datetime.date(2026, 11, 1),
        }
    )
    assert issues == []
    assert value == Sample(
        name="svc",
        ratio=0.25,
        count=3,
        flag=True,
        level="debug",
        inner=Inner(9000, ("a", "b")),
        items=(1, 2),  # type: ignore[arg-type]
        labels=MappingProxyType({"team": "x", "shard": 2}),
        extra=MappingProxyType({"deep": (MappingProxyType({"x": (1,)}),)}),
        when=datetime.date(2026, 11, 1),
    )


def test_defaults_apply_to_absent_keys() -> None:
    """Absent optional keys take the dataclass defaults."""
    value, issues = decode_sample({"name": "svc"})
    assert issues == []
    assert value == Sample(name="svc")


def test_float_accepts_int_and_returns_float() -> None:
    """An integer is a valid float and comes back as a float."""
    value, _ = decode(float, 3, source="s", path="x")
    assert value == 3.0
    assert type(value) is float


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"name": True}, "root.name", "expected a string, got true (boolean)"),
        ({"name": "a", "count": True}, "root.count", "expected an integer, got true (boolean)"),
        ({"name": "a", "count": 1.5}, "root.count", "got 1.5 (float)"),
        ({"name": "a", "ratio": False}, "root.ratio", "got false (boolean)"),
        ({"name": "a", "ratio": math.nan}, "root.ratio", "got nan (float)"),
        ({"name": "a", "ratio": math.inf}, "root.ratio", "got inf (float)"),
        ({"name": "a", "ratio": 10**400}, "root.ratio", "(integer)"),
        ({"name": "a", "flag": 1}, "root.flag", "expected a boolean, got 1 (integer)"),
        ({"name": "a", "when": datetime.datetime(2026, 1, 1)}, "root.when", "expected a date"),
        ({"name": "a", "inner": 3}, "root.inner", "expected a table, got 3 (integer)"),
        ({"name": "a", "items": {"a": 1}}, "root.items", "expected an array, got a table"),
        ({"name": "a", "labels": []}, "root.labels", "expected a table, got an array"),
    ],
)
def test_wrong_types_are_reported_with_what_was_got(data: object, path: str, message: str) -> None:
    """A value of the wrong type yields one issue saying what was expected and got."""
    issue = only_issue(data)
    assert issue.path == path
    assert message in issue.message


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        (
            {"name": "a", "inner": {"port": "abc"}},
            "root.inner.port",
            'expected an integer between 0 and 65535, got "abc" (string)',
        ),
        (
            {"name": "a", "inner": {"port": 70000}},
            "root.inner.port",
            "expected an integer between 0 and 65535, got 70000 (integer)",
        ),
        ({"name": "a", "ratio": 0}, "root.ratio", "expected a number > 0 and < 1, got 0 (integer)"),
        (
            {"name": "a", "ratio": 1.0},
            "root.ratio",
            "expected a number > 0 and < 1, got 1.0 (float)",
        ),
    ],
)
def test_bounds_are_checked(data: object, path: str, message: str) -> None:
    """ge/gt/le/lt metadata bound numbers, and the message states the bounds."""
    issue = only_issue(data)
    assert (issue.path, issue.message) == (path, message)


def test_literal_lists_choices_and_suggests() -> None:
    """A Literal lists its choices and suggests the closest one."""
    issue = only_issue({"name": "a", "level": "debg"})
    assert issue.message == (
        'expected one of "debug", "info", got "debg" (string); did you mean "debug"?'
    )


def test_literal_does_not_confuse_bool_and_int() -> None:
    """true is not accepted for Literal[1], though True == 1 in Python."""
    value, issues = decode(Literal[1, 2], True, source="s", path="x")  # type: ignore[arg-type]
    assert value is None
    assert issues[0].message == "expected one of 1, 2, got true (boolean)"


def test_pattern_is_a_full_match() -> None:
    """The pattern metadata must match the whole string."""
    issue = only_issue({"name": "a", "code": "ABc"})
    assert issue.message == 'expected a string matching [A-Z]+, got "ABc" (string)'


def test_unknown_key_suggests_the_closest() -> None:
    """An unknown key is reported with the closest valid key."""
    issue = only_issue({"name": "a", "inner": {"prot": 1}})
    assert issue.path == "root.inner.prot"
    assert issue.message == 'unknown key "prot"; did you mean "port"?'


def test_unknown_key_lists_valid_keys_without_close_match() -> None:
    """Without a close match, the valid keys are listed."""
    issue = only_issue({"name": "a", "inner": {"zzz": 1}})
    assert issue.message == 'unknown key "zzz"; valid keys: port, tags'


def test_missing_required_key() -> None:
    """A field without a default must be present."""
    issue = only_issue({})
    assert (issue.path, issue.message) == ("root.name", "missing required key")


def test_array_items_have_index_paths() -> None:
    """Issues inside arrays carry the item index in the path."""
    _, issues = decode_sample({"name": "a", "items": [1, "two", 3, "four"]})
    assert [issue.path for issue in issues] == ["root.items[1]", "root.items[3]"]


def test_every_issue_is_reported_at_once() -> None:
    """Decoding does not stop at the first problem."""
    _, issues = decode_sample(
        {"ratio": 2, "inner": {"port": -1, "prot": 1}, "level": "x", "labels": {"a": 1.5}}
    )
    assert [issue.path for issue in issues] == [
        "root.ratio",
        "root.inner.port",
        "root.inner.prot",
        "root.level",
        "root.labels.a",
        "root.name",
    ]


def test_union_reports_all_alternatives() -> None:
    """A value that fits no member of a union names every member."""
    issue = only_issue({"name": "a", "labels": {"a": 1.5}})
    assert issue.message == "expected a string or an integer, got 1.5 (float)"


def test_union_with_a_table_reports_the_inner_issue() -> None:
    """When a union member accepts the value's shape, its inner issue is the one reported."""
    value, issues = decode(Inner | str, {"port": "x"}, source="s", path="p")  # type: ignore[arg-type]
    assert value is None
    assert [issue.path for issue in issues] == ["p.port"]


def test_optional_accepts_none_from_python() -> None:
    """None is valid for X | None (a Python caller can pass it; TOML cannot)."""
    value, issues = decode(int | None, None, source="s", path="x")  # type: ignore[arg-type]
    assert (value, issues) == (None, [])


def test_mapping_keys_are_quoted_in_paths() -> None:
    """A key TOML cannot write bare is quoted in the key path."""
    _, issues = decode_sample({"name": "a", "labels": {"my.key": 1.5}})
    assert issues[0].path == 'root.labels."my.key"'


def test_decoded_values_are_frozen() -> None:
    """Decoded dataclasses, mappings and Any values cannot be changed."""
    value, _ = decode_sample({"name": "a", "labels": {"k": "v"}, "extra": {"l": [1]}})
    assert value is not None
    with pytest.raises(FrozenInstanceError):
        value.name = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        value.labels["k"] = "w"  # type: ignore[index]
    assert value.extra["l"] == (1,)


def test_post_init_value_error_becomes_an_issue() -> None:
    """A ValueError raised by a model's __post_init__ is reported, not raised."""

    @dataclass(frozen=True)
    class Range:
        low: int
        high: int

        def __post_init__(self) -> None:
            if self.low > self.high:
                raise ValueError("low must not exceed high")

    value, issues = decode(Range, {"low": 2, "high": 1}, source="s", path="range")
    assert value is None
    assert [(i.path, i.message) for i in issues] == [("range", "low must not exceed high")]


def test_unsupported_annotation_is_a_type_error() -> None:
    """A settings class with an unsupported annotation is a programming error."""

    @dataclass(frozen=True)
    class Bad:
        when: complex = 0j

    with pytest.raises(TypeError, match="unsupported type"):
        decode(Bad, {}, source="s", path="")


def test_known_keys_are_skipped_and_suggested() -> None:
    """Keys the caller handles are neither reported nor forgotten in suggestions."""
    value, issues = decode(
        Inner, {"port": 1, "enabled": True}, source="s", path="f", known=("enabled",)
    )
    assert (value, issues) == (Inner(port=1), [])
    _, issues = decode(Inner, {"enabeld": True}, source="s", path="f", known=("enabled",))
    assert issues[0].message == 'unknown key "enabeld"; did you mean "enabled"?'


def test_decode_fields_keeps_the_good_fields() -> None:
    """decode_fields returns the fields that decoded even when others did not."""
    values, issues = decode_fields(
        Sample, {"name": "a", "ratio": 5, "flag": True}, source="s", path=""
    )
    assert values == {"name": "a", "flag": True}
    assert [issue.path for issue in issues] == ["ratio"]


def test_decode_fields_of_a_non_table() -> None:
    """decode_fields of something that is no table reports it and returns nothing."""
    values, issues = decode_fields(Sample, [1], source="s", path="")
    assert values == {}
    assert issues[0].message == "expected a table, got an array"


def test_issues_name_the_source() -> None:
    """Every issue carries the source it was decoded from."""
    _, issues = decode_sample({})
    assert str(issues[0]) == "s.toml: root.name: missing required key"


def test_type_hints_are_resolved_once_per_class() -> None:
    """A class's field plan is cached, so repeated decoding skips get_type_hints."""
    assert _settings._plan(Sample) is _settings._plan(Sample)


def test_suggest() -> None:
    """suggest gives a close match, the valid names, or nothing."""
    assert suggest("prot", ["host", "port"]) == '; did you mean "port"?'
    assert suggest("x", ["host", "port"], noun="kinds") == "; valid kinds: host, port"
    assert suggest("x", ["host"], noun=None) == ""
    assert suggest("x", []) == ""


def test_join_path_quotes_only_when_needed() -> None:
    """join_path writes bare keys bare and quotes the rest."""
    assert join_path("", "a") == "a"
    assert join_path("a", "b-c_1") == "a.b-c_1"
    assert join_path("a", "x y") == 'a."x y"'


def test_quote_escapes_and_shortens() -> None:
    """quote escapes what would break a one-line message, and shortens long text."""
    assert quote('a"b\\c\nd\x01') == '"a\\"b\\\\c\\nd\\u0001"'
    assert quote("x" * 100) == '"' + "x" * 57 + '..."'


def test_show_names_toml_types() -> None:
    """show describes values with TOML's type names."""
    assert show(-math.inf) == "-inf (float)"
    assert show(datetime.time(7, 30)) == "07:30:00 (time)"
    assert show(datetime.datetime(2026, 1, 2, 3, 4)) == "2026-01-02T03:04:00 (date-time)"
    assert show(None) == "nothing"
    assert show(object()) == "a object"
    assert show(10**50).endswith("... (integer)")


def test_freeze_is_deep() -> None:
    """freeze turns nested dicts and lists into read-only mappings and tuples."""
    frozen = freeze({"a": [{"b": [1]}]})
    assert frozen == MappingProxyType({"a": (MappingProxyType({"b": (1,)}),)})


# -- JSON Schema ----------------------------------------------------------------


@pytest.fixture(name="sample_schema")
def fixture_sample_schema() -> dict[str, Any]:
    return json_schema(Sample)


def test_schema_is_json(sample_schema: dict[str, Any]) -> None:
    """The schema serialises to JSON as it is."""
    assert json.loads(json.dumps(sample_schema)) == sample_schema


def test_schema_describes_fields(sample_schema: dict[str, Any]) -> None:
    """Properties carry types, bounds, enums, patterns, defaults and help."""
    properties = sample_schema["properties"]
    assert sample_schema["additionalProperties"] is False
    assert sample_schema["required"] == ["name"]
    assert sample_schema["description"] == "Every supported annotation, once."
    assert properties["ratio"] == {
        "type": "number",
        "exclusiveMinimum": 0,
        "exclusiveMaximum": 1,
        "default": 0.5,
    }
    assert properties["count"] == {"type": "integer"}
    assert properties["level"] == {"enum": ["debug", "info"], "type": "string", "default": "info"}
    assert properties["inner"]["properties"]["port"] == {
        "type": "integer",
        "minimum": 0,
        "maximum": 65535,
        "description": "Port.",
        "default": 8080,
    }
    assert properties["inner"]["properties"]["tags"]["default"] == []
    assert properties["labels"]["additionalProperties"] == {
        "anyOf": [{"type": "string"}, {"type": "integer"}]
    }
    assert properties["extra"] == {}
    assert properties["when"] == {"type": "string", "format": "date"}
    assert properties["code"]["pattern"] == "^(?:[A-Z]+)$"
    assert properties["code"]["description"] == "Upper-case code."


def test_schema_agrees_with_decoder(sample_schema: dict[str, Any]) -> None:
    """What the decoder accepts the schema accepts, and unknown keys are refused by both."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(sample_schema)
    good = {"name": "a", "inner": {"port": 1, "tags": ["x"]}, "labels": {"a": 1}, "code": "Q"}
    assert decode_sample(good)[1] == []
    validator.validate(good)
    bad = {"name": "a", "inner": {"prot": 1}}
    assert decode_sample(bad)[1]
    assert not validator.is_valid(bad)


# -- properties -------------------------------------------------------------------

toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.dates()
    | st.sampled_from(["debug", "info", "a", "AB"])
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["name", "port", "tags", "x", "deep"]) | st.text(max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    data=st.dictionaries(
        st.sampled_from(
            ["name", "ratio", "count", "flag", "level", "inner", "items", "labels", "when", "code"]
        )
        | st.text(max_size=5),
        toml_values,
    )
    | toml_values
)
def test_decode_never_raises(data: object) -> None:
    """Any TOML-shaped data gives either a value and no issues, or None and issues."""
    value, issues = decode_sample(data)
    assert (value is None) == bool(issues)
    assert all(isinstance(issue, ConfigIssue) for issue in issues)
