"""service.toml → Definition: Mikros compatibility, every rule, and no crash on any input."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mikros_trio._runtime_settings import GrpcSettings, HttpSettings, WorkerSettings
from mikros_trio.errors import ConfigError, ConfigIssue
from mikros_trio.ext import (
    ClientSettings,
    ComponentSettings,
    Definition,
    FeatureConfig,
    FeatureSpec,
    LifecycleSettings,
    LogSettings,
    Registry,
    ServiceType,
    default_registry,
    definition_schema,
    load_definition,
    parse_definition,
)

ASSETS = Path(__file__).parent / "assets"
GOOD = sorted((ASSETS / "good").glob("*.toml"))
BAD = sorted((ASSETS / "bad").glob("*.toml"))
BAD_GRAPH = sorted((ASSETS / "bad_graph").glob("*.toml"))

MIKROS_GO = """\
name="http"
types=["http:8080"]
version="v0.1.0"
language="go"
product="EXAMPLE"
[log]
error_stack_trace="disabled"
[tests]
execute_lifecycle=false
"""

MINIMAL = 'name = "svc"\ntypes = ["http"]\nversion = "v1.0.0"\n'


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """Settings of the test-only "audit" feature."""

    sink: str = "stderr"
    batch: int = field(default=10, metadata={"ge": 1})


@dataclass(frozen=True, slots=True)
class HeartbeatSettings:
    """Settings of the test-only always-on "heartbeat" feature."""

    every: float = 5.0


@dataclass(frozen=True, slots=True)
class ServiceModel:
    """A user's typed [service] table."""

    dsn: str
    page_size: int = field(default=20, metadata={"ge": 1, "le": 500})


@pytest.fixture(name="registry")
def fixture_registry() -> Registry:
    """The built-in kinds plus two test features, one of them always on."""
    return Registry(
        kinds=default_registry().kinds,
        features={
            "audit": FeatureSpec("audit", AuditSettings, "tests:audit"),
            "heartbeat": FeatureSpec("heartbeat", HeartbeatSettings, "tests:hb", always_on=True),
        },
    )


def expectation(path: Path) -> tuple[str, str | None]:
    """The key path (and message fragment) a bad asset declares in its first lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# expect: "), f"{path.name} must start with '# expect: <path>'"
    expected = lines[0].removeprefix("# expect: ").strip()
    message = None
    if len(lines) > 1 and lines[1].startswith("# message: "):
        message = lines[1].removeprefix("# message: ").strip()
    return ("" if expected == "<syntax>" else expected), message


def issues_of(text: str, **kwargs: Any) -> tuple[ConfigIssue, ...]:
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        parse_definition(text, **kwargs)
    return info.value.issues


def paths_of(text: str, **kwargs: Any) -> list[str]:
    return [issue.path for issue in issues_of(text, **kwargs)]


# -- good files ----------------------------------------------------------------


def test_mikros_go_file_loads() -> None:
    """A Mikros Go service.toml loads unchanged, with its Go-specific keys kept."""
    definition = parse_definition(MIKROS_GO, environ={})
    assert definition.name == "http"
    assert definition.types == (ServiceType("http", 8080),)
    assert definition.version == "v0.1.0"
    assert definition.language == "go"
    assert definition.product == "EXAMPLE"
    assert definition.log.error_stack_trace == "disabled"
    assert definition.tests.execute_lifecycle is False
    assert definition.port("http") == 8080


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_assets_load(path: Path, registry: Registry) -> None:
    """Every sample in assets/good loads without issues."""
    definition = load_definition(path, environ={}, registry=registry)
    assert definition.source == str(path)
    assert set(definition.runtime) == set(definition.kinds)


def test_full_asset_values(registry: Registry) -> None:
    """The full sample decodes every table into its typed, frozen form."""
    definition = load_definition(ASSETS / "good" / "full.toml", environ={}, registry=registry)
    assert definition.kinds == ("http", "grpc", "worker")
    assert definition.version == "1.4.0-rc.1+build.5"
    assert definition.envs == ("DATABASE_URL", "ORDERS_TOKEN")
    assert definition.log == LogSettings(
        level="debug",
        error_stack_trace="structured",
        format="json",
        attributes={"team": "orders", "shard": 3, "ratio": 0.5, "canary": False},
    )
    assert definition.features["audit"] == FeatureConfig(True, AuditSettings("stdout", 50))
    assert definition.features["heartbeat"] == FeatureConfig(False, HeartbeatSettings())
    assert definition.clients == {
        "users": ClientSettings("users.internal", 50051),
        "billing-v2": ClientSettings("billing.internal", 443),
    }
    assert definition.runtime == {
        "http": HttpSettings(host="127.0.0.1"),
        "grpc": GrpcSettings(port=50052),
        "worker": WorkerSettings(provider="order_worker"),
    }
    assert (definition.port("http"), definition.port("grpc"), definition.port("worker")) == (
        8081,
        50052,
        None,
    )
    assert definition.service["limits"]["rate"] == 2.5
    assert definition.service["regions"] == ("eu", "us")
    assert definition.lifecycle == LifecycleSettings(5.0, 8.5, 15.0, 2.0)
    assert definition.components == {
        "repo": ComponentSettings(depends_on=("database",)),
        "database": ComponentSettings(enhanced_by=("metrics_hook",)),
        "metrics_hook": ComponentSettings(),
    }
    assert definition.tests.discard_log_messages is True


def test_alias_kind_is_stored_by_canonical_name() -> None:
    """The alias "native", in types and as [runtime.native], means the worker kind."""
    definition = load_definition(ASSETS / "good" / "worker.toml", environ={})
    assert definition.types == (ServiceType("worker", None),)
    assert definition.runtime == {"worker": WorkerSettings(provider="send_loop")}


def test_script_asset() -> None:
    """A script service stands alone and has no port."""
    definition = load_definition(ASSETS / "good" / "script.toml", environ={})
    assert definition.kinds == ("script",)
    assert definition.port("script") is None


def test_defaults_for_optional_tables() -> None:
    """A minimal file gets defaults for language, product, log, lifecycle and runtime."""
    definition = parse_definition(MINIMAL, environ={})
    assert definition.language == "python"
    assert definition.product == ""
    assert definition.log == LogSettings()
    assert definition.lifecycle == LifecycleSettings()
    assert definition.runtime == {"http": HttpSettings()}
    assert list(definition.features) == ["logger", "errors", "env"], "always-on, defaults"
    assert not any(config.enabled for config in definition.features.values())
    assert definition.service == {}


def test_bad_graph_assets_load() -> None:
    """Component cycles and unknown dependencies are not this layer's business: they load."""
    assert len(BAD_GRAPH) == 2
    for path in BAD_GRAPH:
        definition = load_definition(path, environ={})
        assert "a" in definition.components
        assert expectation(path)[0] == "components.a.depends_on"


# -- bad files -------------------------------------------------------------------


def test_there_are_enough_bad_assets() -> None:
    """assets/bad holds at least 28 samples, one problem each."""
    assert len(BAD) >= 28


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_asset_is_rejected_at_its_key_path(path: Path) -> None:
    """Each bad sample raises ConfigError with an issue at the declared key path."""
    expected_path, message = expectation(path)
    with pytest.raises(ConfigError) as info:
        load_definition(path, environ={})
    issues = info.value.issues
    matching = [issue for issue in issues if issue.path == expected_path]
    assert matching, f"no issue at {expected_path!r}: {issues}"
    if message is not None:
        assert any(message in issue.message for issue in matching), matching
    assert all(path.name in str(issue) for issue in issues)


def test_not_utf8_file(tmp_path: Path) -> None:
    """A file that is not UTF-8 is one issue naming the line and column of the bad byte."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "svc"\nproduct = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_definition(path, environ={})
    (issue,) = info.value.issues
    assert issue.path == ""
    assert "latin1.toml" in str(issue)
    assert issue.message == "not valid UTF-8: byte 0xe9 at line 2, column 15"


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark some editors write does not break loading."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_definition(path, environ={}).name == "svc"


@pytest.mark.parametrize("name", ["missing.toml", "."])
def test_unreadable_file(tmp_path: Path, name: str) -> None:
    """A missing file or a directory is a ConfigError, not an OSError."""
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_definition(tmp_path / name, environ={})


def test_three_problems_reported_at_once() -> None:
    """Distinct problems in one file are all reported together, in file order."""
    text = 'name = "svc"\ntypes = ["http:99999"]\nversion = "1.0"\n[log]\nlevel = "loud"\n'
    assert paths_of(text) == ["types[0]", "version", "log.level"]


def test_issue_order_follows_the_file() -> None:
    """Issues are sorted by their top-level key's position; missing keys come first."""
    text = '[lifecycle]\ndrain_timeout = -1\n[log]\nlevel = "x"\n'
    assert paths_of(text) == ["name", "types", "version", "lifecycle.drain_timeout", "log.level"]


def test_toml_syntax_error_names_line_and_column() -> None:
    """A syntax error is one issue with an empty path and the position in the message."""
    (issue,) = issues_of("name = \n", source="x.toml")
    assert issue.path == ""
    assert "line 1, column 8" in issue.message
    assert str(issue).startswith("x.toml: invalid TOML")


def test_deep_nesting_is_an_issue_not_a_crash() -> None:
    """Arrays nested deeper than the parser's stack are reported as a config issue."""
    (issue,) = issues_of("x = " + "[" * 100_000 + "]" * 100_000)
    assert issue.path == ""


def test_huge_integer_is_an_issue_not_a_crash() -> None:
    """An integer too long for Python to convert is reported, not raised."""
    (issue,) = issues_of(MINIMAL + "product = " + "9" * 5000 + "\n")
    assert issue.message.startswith("invalid TOML")


@pytest.mark.parametrize(
    "text",
    ["log = 3", "runtime = []", "features = 1", "clients = true", "components = 'x'", "tests = 0"],
)
def test_wrong_type_for_a_table(text: str) -> None:
    """A scalar where a table belongs is an issue at that key."""
    key = text.split(" ")[0]
    assert paths_of(MINIMAL + text + "\n") == [key]


def test_runtime_port_must_agree_with_types() -> None:
    """Equal ports in "kind:port" and [runtime.kind] are fine; different ones are not."""
    base = 'name = "svc"\ntypes = ["http:8080"]\nversion = "v1.0.0"\n[runtime.http]\n'
    assert parse_definition(base + "port = 8080\n", environ={}).port("http") == 8080
    (issue,) = issues_of(base + "port = 9090\n")
    assert issue.path == "runtime.http.port"
    assert '"http:8080"' in issue.message


def test_runtime_table_twice_through_an_alias() -> None:
    """[runtime.worker] and [runtime.native] together are one kind configured twice."""
    text = (
        'name = "svc"\ntypes = ["worker"]\nversion = "v1.0.0"\n'
        '[runtime.worker]\nprovider = "a"\n[runtime.native]\nprovider = "b"\n'
    )
    assert paths_of(text) == ["runtime.native"]


def test_script_alone_with_itself() -> None:
    """script listed twice is a duplicate, reported at the second entry."""
    text = 'name = "s"\ntypes = ["script", "script"]\nversion = "v1.0.0"\n'
    assert "types[1]" in paths_of(text)


@pytest.mark.parametrize(
    "version", ["v0.1.0", "1.2.3", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-0.3.7", "1.0.0+20130313"]
)
def test_semver_versions_are_accepted(version: str) -> None:
    """Mikros "v1.2.3" and SemVer 2.0 versions with pre-release and build metadata load."""
    text = f'name = "svc"\ntypes = ["http"]\nversion = "{version}"\n'
    assert parse_definition(text, environ={}).version == version


@pytest.mark.parametrize("version", ["1.2", "v1.2.3.4", "1.0.0-01", "1.0.0+", "latest", "V1.0.0"])
def test_non_semver_versions_are_rejected(version: str) -> None:
    """Versions that are not "v1.2.3" or SemVer 2.0 are rejected at "version"."""
    text = f'name = "svc"\ntypes = ["http"]\nversion = "{version}"\n'
    assert paths_of(text) == ["version"]


# -- ports -------------------------------------------------------------------------


def port_of(types: str, runtime: str = "", environ: dict[str, str] | None = None) -> int | None:
    text = f'name = "svc"\ntypes = [{types}]\nversion = "v1.0.0"\n{runtime}'
    return parse_definition(text, environ=environ or {}).port("http")


def test_port_default() -> None:
    """Without any setting, a kind listens on its default port."""
    assert port_of('"http"') == 8080


def test_port_runtime_over_default() -> None:
    """[runtime.kind] port wins over the default."""
    assert port_of('"http"', "[runtime.http]\nport = 7000\n") == 7000


def test_port_types_over_runtime_default() -> None:
    """A port in "kind:port" wins over the default (and must equal a runtime port)."""
    assert port_of('"http:7001"') == 7001


def test_port_env_over_everything() -> None:
    """The kind's environment variable wins over "kind:port" and [runtime.kind]."""
    assert port_of('"http:7001"', environ={"MIKROS_HTTP_PORT": "7002"}) == 7002
    assert port_of('"http"', "[runtime.http]\nport = 7000\n", {"MIKROS_HTTP_PORT": "0"}) == 0


def test_port_env_only_for_its_kind() -> None:
    """MIKROS_GRPC_PORT does not touch the http kind."""
    assert port_of('"http"', environ={"MIKROS_GRPC_PORT": "9"}) == 8080


@pytest.mark.parametrize("value", ["abc", "", "70000", "-1", " 80", "٨٠", "9" * 5000])
def test_invalid_port_env_is_an_issue(value: str) -> None:
    """An unusable MIKROS_HTTP_PORT is an issue at "types" naming the variable."""
    (issue,) = issues_of(MINIMAL, environ={"MIKROS_HTTP_PORT": value})
    assert issue.path == "types"
    assert "MIKROS_HTTP_PORT" in issue.message


@pytest.mark.parametrize("value", ["0080", "0" * 5000 + "80"])
def test_port_env_with_leading_zeros(value: str) -> None:
    """Leading zeros are digits like any other, however many: port 80."""
    assert port_of('"http"', environ={"MIKROS_HTTP_PORT": value}) == 80


def test_port_env_ignored_for_kinds_not_in_types() -> None:
    """A port variable of a kind the service does not use is not checked."""
    assert parse_definition(MINIMAL, environ={"MIKROS_GRPC_PORT": "x"}).kinds == ("http",)


def test_port_of_kind_not_in_types() -> None:
    """Asking the port of a kind the service does not have is a KeyError."""
    with pytest.raises(KeyError, match="grpc"):
        parse_definition(MINIMAL, environ={}).port("grpc")


def test_port_zero_is_allowed() -> None:
    """Port 0 (pick a free port) is valid in types."""
    assert port_of('"http:0"') == 0


# -- environment, features, service model -------------------------------------------


def test_missing_envs() -> None:
    """missing_envs lists the declared variables the environment lacks or leaves empty (as Go)."""
    text = MINIMAL + 'envs = ["A", "B", "C", "D"]\n'
    environ = {"B": "", "D": "1"}
    assert parse_definition(text, environ=environ).missing_envs() == ("A", "B", "C")


def test_an_empty_override_is_not_skipped() -> None:
    """The first form that is set is the value: an empty override is an empty value."""
    text = MINIMAL + 'envs = ["A"]\n'
    definition = parse_definition(text, environ={"SVC__A": "", "A": "shared"})
    assert definition.missing_envs() == ("A",)


def test_environ_defaults_to_a_copy_of_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without environ, the process environment at load time is used."""
    monkeypatch.setenv("MIKROS_HTTP_PORT", "6006")
    monkeypatch.setenv("NEEDED", "1")
    definition = parse_definition(MINIMAL + 'envs = ["NEEDED"]\n')
    monkeypatch.delenv("NEEDED")
    assert definition.port("http") == 6006
    assert definition.missing_envs() == ()


def test_feature_dependencies_start_first_then_file_order() -> None:
    """Unlisted always-on features lead; a feature's declared dependencies move before it."""
    registry = Registry(
        kinds=default_registry().kinds,
        features={
            "base": FeatureSpec("base", AuditSettings, "tests:base", always_on=True),
            "store": FeatureSpec("store", AuditSettings, "tests:store"),
            "cache": FeatureSpec("cache", AuditSettings, "tests:cache", depends_on=("store",)),
            "audit": FeatureSpec("audit", AuditSettings, "tests:audit"),
        },
    )
    text = MINIMAL + "".join(
        f"[features.{name}]\nenabled = true\n" for name in ("audit", "cache", "store")
    )
    definition = parse_definition(text, environ={}, registry=registry)
    assert definition.enabled_features(registry) == ("base", "audit", "store", "cache")


def test_a_disabled_dependency_is_an_error() -> None:
    """Enabling a feature whose dependency is off names the dependency's enabled key."""
    registry = Registry(
        kinds=default_registry().kinds,
        features={
            "store": FeatureSpec("store", AuditSettings, "tests:store"),
            "cache": FeatureSpec("cache", AuditSettings, "tests:cache", depends_on=("store",)),
        },
    )
    text = MINIMAL + "[features.cache]\nenabled = true\n"
    (issue,) = issues_of(text, registry=registry)
    assert issue.path == "features.store.enabled"
    assert 'feature "cache" needs feature "store"' in issue.message


def test_enabled_features(registry: Registry) -> None:
    """Enabled features come in file order, then always-on ones."""
    text = MINIMAL + "[features.heartbeat]\nevery = 1\n[features.audit]\nenabled = true\n"
    definition = parse_definition(text, environ={}, registry=registry)
    assert list(definition.features) == ["heartbeat", "audit"]
    assert definition.features["heartbeat"] == FeatureConfig(False, HeartbeatSettings(1.0))
    assert definition.enabled_features(registry) == ("heartbeat", "audit")
    off = parse_definition(MINIMAL + "[features.audit]\n", environ={}, registry=registry)
    assert off.enabled_features(registry) == ("heartbeat",)


def test_unknown_feature_suggests(registry: Registry) -> None:
    """An unknown feature name is reported with the closest registered one."""
    (issue,) = issues_of(MINIMAL + "[features.adit]\n", registry=registry)
    assert issue.path == "features.adit"
    assert issue.message == 'unknown feature "adit"; did you mean "audit"?'


@pytest.mark.parametrize(
    ("table", "path", "message"),
    [
        ("enabeld = true", "features.audit.enabeld", 'did you mean "enabled"?'),
        ('enabled = "yes"', "features.audit.enabled", "expected a boolean"),
        ("batch = 0", "features.audit.batch", "expected an integer >= 1, got 0"),
    ],
)
def test_feature_table_is_checked(registry: Registry, table: str, path: str, message: str) -> None:
    """A feature table holds `enabled` plus the feature's own typed settings."""
    (issue,) = issues_of(MINIMAL + f"[features.audit]\n{table}\n", registry=registry)
    assert issue.path == path
    assert message in issue.message


def test_service_model_decodes_the_service_table() -> None:
    """With a service_model, [service] becomes an instance of it."""
    text = MINIMAL + '[service]\ndsn = "postgres://db"\n'
    definition = parse_definition(text, environ={}, service_model=ServiceModel)
    assert definition.service == ServiceModel(dsn="postgres://db")


def test_service_model_issues_have_service_paths() -> None:
    """A [service] table that does not fit the model is reported under "service."."""
    text = MINIMAL + "[service]\npage_size = 0\ndns = 1\n"
    assert paths_of(text, service_model=ServiceModel) == [
        "service.page_size",
        "service.dns",
        "service.dsn",
    ]


def test_service_model_requires_its_keys_when_the_table_is_absent() -> None:
    """A model with required keys makes an absent [service] table an issue."""
    assert paths_of(MINIMAL, service_model=ServiceModel) == ["service.dsn"]


def test_service_without_model_is_a_frozen_mapping() -> None:
    """Without a model, [service] is kept as a read-only mapping."""
    definition = parse_definition(MINIMAL + "[service]\na = [1, {b = 2}]\n", environ={})
    assert definition.service["a"][1]["b"] == 2
    with pytest.raises(TypeError):
        definition.service["a"] = 1


# -- frozen ----------------------------------------------------------------------


def test_definition_is_frozen(registry: Registry) -> None:
    """Neither the definition nor any of its mappings can be changed."""
    definition = load_definition(ASSETS / "good" / "full.toml", environ={}, registry=registry)
    with pytest.raises(FrozenInstanceError):
        definition.name = "other"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        definition.log.level = "error"  # type: ignore[misc]
    for mapping in (
        definition.features,
        definition.clients,
        definition.runtime,
        definition.components,
        definition.environ,
        definition.log.attributes,
    ):
        with pytest.raises(TypeError):
            mapping["x"] = 1  # type: ignore[index]
    assert isinstance(definition.types, tuple)
    assert isinstance(definition.components["repo"].depends_on, tuple)


def test_environ_is_not_part_of_equality() -> None:
    """Two loads of one file are equal whatever the environment held."""
    assert parse_definition(MINIMAL, environ={"A": "1"}) == parse_definition(MINIMAL, environ={})
    assert "environ" not in repr(parse_definition(MINIMAL, environ={"SECRET": "x"}))


# -- schema ------------------------------------------------------------------------


def test_schema_is_json_and_closed(registry: Registry) -> None:
    """The schema serialises to JSON and refuses unknown keys at the top level."""
    schema = definition_schema(registry)
    assert json.loads(json.dumps(schema)) == schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["name", "types", "version"]
    assert set(schema["properties"]["runtime"]["properties"]) == {
        "worker",
        "native",
        "script",
        "http",
        "grpc",
    }
    assert "enabled" in schema["properties"]["features"]["properties"]["audit"]["properties"]


def test_schema_types_the_service_table_with_a_model() -> None:
    """With a service_model, [service] in the schema is the model's closed table."""
    service = definition_schema(service_model=ServiceModel)["properties"]["service"]
    assert service["required"] == ["dsn"]
    assert service["additionalProperties"] is False
    assert service["properties"]["page_size"]["maximum"] == 500


@pytest.fixture(name="validator")
def fixture_validator(registry: Registry) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = definition_schema(registry)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_assets_validate_against_schema(path: Path, validator: Any) -> None:
    """Every good sample is valid under the generated JSON Schema."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    validator.validate(json.loads(json.dumps(data)))


@pytest.mark.parametrize(
    "name",
    [
        "unknown_top_level_key",
        "unknown_kind",
        "bad_version",
        "bad_language",
        "lowercase_env",
        "log_bad_level",
        "runtime_unknown_key",
        "client_bad_port",
        "client_bad_name",
        "component_bad_name",
        "lifecycle_shutdown_30",
        "empty_types",
    ],
)
def test_schema_rejects_what_the_loader_rejects(name: str, validator: Any) -> None:
    """Single-key mistakes are caught by the schema too, not only by the loader."""
    data = tomllib.loads((ASSETS / "bad" / f"{name}.toml").read_text(encoding="utf-8"))
    assert not validator.is_valid(data)


# -- properties: nothing but a Definition or a ConfigError --------------------------

TOP_KEYS = [
    "name", "types", "version", "language", "product", "envs", "log", "features", "clients",
    "runtime", "service", "lifecycle", "components", "tests", "services",
]  # fmt: skip
INNER_KEYS = [
    "http", "grpc", "worker", "native", "script", "port", "host", "level", "format",
    "attributes", "enabled", "depends_on", "enhanced_by", "provider", "drain_timeout",
    "shutdown_timeout", "readiness_delay", "execute_lifecycle", "a", "b",
]  # fmt: skip

scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["http", "http:8080", "worker", "native", "script", "v1.0.0", "info"])
    | st.dates()
    | st.datetimes()
    | st.times()
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(INNER_KEYS) | st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=25,
)
documents = st.dictionaries(st.sampled_from(TOP_KEYS) | st.text(max_size=8), values, max_size=10)

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\"}


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    chars = (
        _TOML_ESCAPES.get(char)
        or (f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F else char)
        for char in text
    )
    return '"' + "".join(chars) + '"'


def toml_value(value: object) -> str:
    """A tiny TOML emitter: nested tables are written inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{toml_string(key)} = {toml_value(item)}" for key, item in value.items())
        return "{" + ", ".join(pairs) + "}"
    return value.isoformat()  # type: ignore[attr-defined]


def toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n" for key, value in data.items())


def loads_or_config_error(text: str) -> None:
    result: Definition | ConfigError
    try:
        result = parse_definition(text, environ={"MIKROS_HTTP_PORT": "8081"})
    except ConfigError as exc:
        result = exc
    if isinstance(result, ConfigError):
        assert result.issues
        assert all(isinstance(issue, ConfigIssue) for issue in result.issues)
    else:
        assert isinstance(result, Definition)


@settings(max_examples=300, deadline=None, database=None)
@given(data=documents)
def test_random_documents_never_crash(data: dict[str, Any]) -> None:
    """Any well-formed TOML document yields a Definition or a ConfigError, nothing else."""
    text = toml_document(data)
    tomllib.loads(text)  # the emitter itself must write valid TOML
    loads_or_config_error(text)


@settings(max_examples=300, deadline=None, database=None)
@given(text=st.text() | st.text(alphabet="[]{}=\",.:\n #\\'abcdehlnpstvy0123456789_-", max_size=80))
def test_random_text_never_crashes(text: str) -> None:
    """Arbitrary text yields a Definition or a ConfigError, nothing else."""
    loads_or_config_error(text)


BASE_DOCUMENT: dict[str, Any] = {
    "name": "svc",
    "types": ["http:8080", "worker"],
    "version": "v1.0.0",
    "envs": ["TOKEN"],
    "log": {"level": "info", "attributes": {"team": "x"}},
    "runtime": {"http": {"host": "0.0.0.0", "port": 8080}, "worker": {"provider": "loop"}},
    "clients": {"users": {"host": "users", "port": 50051}},
    "lifecycle": {"drain_timeout": 5.0, "shutdown_timeout": 10.0},
    "components": {"a": {"depends_on": ["b"]}},
    "tests": {"execute_lifecycle": False},
    "service": {"x": 1},
}


def key_paths(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in table.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths.extend(key_paths(value, (*prefix, key)))
    return paths


def test_base_document_is_valid() -> None:
    """The document the mutation test starts from loads cleanly."""
    assert parse_definition(toml_document(BASE_DOCUMENT), environ={}).kinds == ("http", "worker")


@settings(max_examples=300, deadline=None, database=None)
@given(path=st.sampled_from(key_paths(BASE_DOCUMENT)), value=values)
def test_one_replaced_key_never_crashes(path: tuple[str, ...], value: object) -> None:
    """A valid document with any one value replaced yields a Definition or a ConfigError."""
    document = json.loads(json.dumps(BASE_DOCUMENT))
    table = document
    for key in path[:-1]:
        table = table[key]
    table[path[-1]] = value
    loads_or_config_error(toml_document(document))


# -- every number is bounded ------------------------------------------------------------


def numeric_keys(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every (key path, schema) of an integer or number in ``schema``, items included."""
    found: list[tuple[str, dict[str, Any]]] = []
    if schema.get("type") in ("integer", "number"):
        found.append((path, schema))
    for key, inner in schema.get("properties", {}).items():
        found += numeric_keys(inner, f"{path}.{key}" if path else key)
    for inner in schema.get("anyOf", []):
        found += numeric_keys(inner, path)
    for where in ("items", "additionalProperties"):
        inner = schema.get(where)
        if isinstance(inner, dict):
            found += numeric_keys(inner, f"{path}[]")
    return found


#: Numbers that are data, not limits the runtime acts on: a log line's static
#: attributes, and histogram bounds (checked positive and finite).
UNBOUNDED_DATA = {"log.attributes[]", "features.metrics.buckets[]"}

NUMERIC_KEYS = [
    (path, schema)
    for path, schema in numeric_keys(definition_schema())
    if path not in UNBOUNDED_DATA and not path.startswith("runtime.native")
]


def test_every_number_in_service_toml_has_an_upper_bound() -> None:
    """No numeric key of service.toml (lifecycle, runtime, features) is unbounded above."""
    unbounded = [
        path
        for path, schema in NUMERIC_KEYS
        if "maximum" not in schema and "exclusiveMaximum" not in schema
    ]
    assert NUMERIC_KEYS
    assert unbounded == []


def toml_number(value: int | float) -> str:
    """``value`` as TOML writes it (inf and nan included)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return repr(value)


def document_with(path: str, value: int | float) -> str:
    """A worker+http service whose key ``path`` (a.b.c) is set to ``value``."""
    *tables, key = path.split(".")
    kinds = '"http", "grpc", "worker"' if tables[:1] in (["runtime"], ["services"]) else '"http"'
    header = f"[{'.'.join(tables)}]\n" if tables else ""
    enable = "enabled = true\n" if tables[:1] == ["features"] else ""
    return (
        f'name = "svc"\ntypes = [{kinds}]\nversion = "v1.0.0"\n'
        f"{header}{enable}{key} = {toml_number(value)}\n"
    )


def definition_or_error(text: str, environ: dict[str, str]) -> Definition | ConfigError:
    """The definition ``text`` gives, or the ConfigError it raises (never anything else)."""
    try:
        return parse_definition(text, environ=environ)
    except ConfigError as error:
        return error


def within(value: float, schema: dict[str, Any]) -> bool:
    """Whether ``value`` meets the bounds ``schema`` states."""
    checks = [
        ("minimum", lambda bound: value >= bound),
        ("exclusiveMinimum", lambda bound: value > bound),
        ("maximum", lambda bound: value <= bound),
        ("exclusiveMaximum", lambda bound: value < bound),
    ]
    return all(check(schema[name]) for name, check in checks if name in schema)


def alternatives(path: str) -> list[dict[str, Any]]:
    """The schemas of ``path``: more than one where the key is anyOf (Go's read_timeout)."""
    return [schema for other, schema in NUMERIC_KEYS if other == path]


@settings(max_examples=400, deadline=None, database=None)
@given(
    key=st.sampled_from([(path, schema) for path, schema in NUMERIC_KEYS if "[]" not in path]),
    value=st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=True, allow_infinity=True),
)
def test_any_number_is_accepted_within_bounds_or_a_config_error(
    key: tuple[str, dict[str, Any]], value: int | float
) -> None:
    """Any number at any numeric key: a ConfigError naming the key, or a value within bounds."""
    path, schema = key
    if schema["type"] == "integer" and isinstance(value, float):
        value = int(value) if math.isfinite(value) else value
    result = definition_or_error(document_with(path, value), {})
    if isinstance(result, ConfigError):
        # The key itself, or the sum rule of [lifecycle] that a timeout broke.
        paths = [issue.path for issue in result.issues]
        assert any(p.startswith(path) or p == "lifecycle.shutdown_timeout" for p in paths), paths
        return
    definition = result
    assert isinstance(value, int) or math.isfinite(value)
    assert any(within(value, option) for option in alternatives(path)), (path, value)
    assert definition.name == "svc"


@settings(max_examples=200, deadline=None, database=None)
@given(
    name=st.sampled_from(["MIKROS_HTTP_PORT", "MIKROS_GRPC_PORT"]),
    text=st.text(max_size=20) | st.text(alphabet="0123456789", min_size=1, max_size=6000),
)
def test_any_port_variable_is_a_port_or_a_config_error(name: str, text: str) -> None:
    """Any text in a port variable, thousands of digits included: a port or a ConfigError."""
    document = 'name = "svc"\ntypes = ["http", "grpc"]\nversion = "v1.0.0"\n'
    result = definition_or_error(document, {name: text})
    if isinstance(result, ConfigError):
        assert any(name in issue.message for issue in result.issues)
        return
    port = result.port("http" if "HTTP" in name else "grpc")
    assert port is not None
    assert 0 <= port <= 65535


# -- Mikros parity: what any Mikros version accepts ---------------------------------------


def doc(types: str = '"http"', extra: str = "", *, name: str = "svc", version: str = "v1") -> str:
    return f'name = "{name}"\ntypes = [{types}]\nversion = "{version}"\n{extra}'


@pytest.mark.parametrize("version", ["v1", "v1.2", "v10.20", "v0.0"])
def test_go_short_versions_are_accepted(version: str) -> None:
    """Mikros Go's "v1" and "v1.2" (one or two digits each) load."""
    assert parse_definition(doc(version=version), environ={}).version == version


@pytest.mark.parametrize("version", ["v100", "v1.234", "1", "v1.", "v"])
def test_short_versions_outside_go_rule_are_rejected(version: str) -> None:
    """Short versions Go's validator refuses are refused here too."""
    assert paths_of(doc(version=version)) == ["version"]


@pytest.mark.parametrize("name", ["MY-VAR", "1ST_VAR", "A B", "X.Y", "_"])
def test_env_names_go_allows_are_accepted(name: str) -> None:
    """envs takes what Go's "ascii,uppercase" takes: dashes, leading digits, any ASCII symbol."""
    definition = parse_definition(doc(extra=f'envs = ["{name}"]\n'), environ={name: "v"})
    assert definition.envs == (name,)
    assert definition.missing_envs() == ()


@pytest.mark.parametrize("name", ["my_var", "", "A=B", "CAFÉ", "\\u0000"])
def test_env_names_go_or_any_environment_refuses_are_rejected(name: str) -> None:
    """Lower case, empty, non-ASCII (Go's rule), "=" and NUL (no environment holds them)."""
    (issue,) = issues_of(doc(extra=f'envs = ["{name}"]\n'))
    assert issue.path == "envs[0]"


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("github.com/acme/users", "users"),
        ("github.com/acme/users/v2", "users"),
        ("acme/orders-api", "orders-api"),
        ("v2", "v2"),
        ("users", "users"),
    ],
)
def test_module_path_names_the_service_by_its_last_element(name: str, short: str) -> None:
    """A Go module path as name: the service is its last element (before a /vN suffix)."""
    definition = parse_definition(doc(name=name), environ={})
    assert (definition.name, definition.full_name) == (short, name)


@pytest.mark.parametrize("name", ["/users", "users/", "a//b", "github.com/acme users"])
def test_broken_module_paths_are_rejected(name: str) -> None:
    """Empty path elements and spaces are no module path."""
    assert paths_of(doc(name=name)) == ["name"]


def test_module_path_env_prefix() -> None:
    """The shell override uses the service name; Go's spells the module path whole."""
    text = doc(extra='envs = ["DSN"]\n', name="github.com/acme/users")
    assert parse_definition(text, environ={"USERS__DSN": "a"}).env_value("DSN") == "a"
    go = parse_definition(text, environ={"github.com/acme/users__DSN": "b", "DSN": "c"})
    assert go.env_value("DSN") == "b"


def test_services_table_is_the_runtime_table() -> None:
    """[services.<kind>] (Go v0.19.0, Rust) decodes exactly as [runtime.<kind>]."""
    runtime = parse_definition(doc('"grpc"', "[runtime.grpc]\nmax_ping_strikes = 5\n"), environ={})
    services = parse_definition(
        doc('"grpc"', "[services.grpc]\nmax_ping_strikes = 5\n"), environ={}
    )
    assert services.runtime == runtime.runtime
    assert services.runtime["grpc"] == GrpcSettings(max_ping_strikes=5)


@pytest.mark.parametrize(
    ("tables", "path"),
    [
        ("[runtime.http]\n[services.http]\n", "services.http"),
        ("[services.native]\n[runtime.worker]\n", "services.native"),
    ],
)
def test_a_kind_with_both_tables_is_an_error(tables: str, path: str) -> None:
    """One kind, one table: [runtime.x] and [services.x] (aliases included) is a config error."""
    (issue,) = issues_of(doc('"http", "worker"', tables))
    assert issue.path == path
    assert "keep one" in issue.message


def test_services_table_of_a_kind_not_in_types() -> None:
    """[services.<kind>] follows the same rules: the kind must be in types."""
    assert paths_of(doc('"http"', "[services.grpc]\n")) == ["services.grpc"]


# -- Go's HTTP runtime keys ------------------------------------------------------------------


def http_settings(table: str) -> HttpSettings:
    settings = parse_definition(doc(extra=f"[runtime.http]\n{table}"), environ={}).runtime["http"]
    assert isinstance(settings, HttpSettings)
    return settings


def test_go_durations_are_nanoseconds() -> None:
    """write_timeout and idle_timeout are Go nanoseconds: they set send and keep-alive seconds."""
    settings = http_settings("write_timeout = 15000000000\nidle_timeout = 60000000000\n")
    assert (settings.send_timeout, settings.keep_alive_timeout) == (15.0, 60.0)


def test_go_read_timeout_bounds_head_and_body() -> None:
    """read_timeout above our 3600 s bound is Go's: nanoseconds for the read and body timeouts."""
    settings = http_settings("read_timeout = 15000000000\n")
    assert (settings.read_timeout, settings.body_timeout) == (15.0, 15.0)
    assert http_settings("read_timeout = 12\n").read_timeout == 12.0, "ours: seconds"
    assert http_settings("read_timeout = 12\n").body_timeout == HttpSettings().body_timeout
    own = http_settings("read_timeout = 15000000000\nbody_timeout = 40\n")
    assert (own.read_timeout, own.body_timeout) == (15.0, 40.0), "the file's own key wins"


def test_go_zero_duration_keeps_the_default() -> None:
    """Go's 0 is "use the default" (its mergeNonZero skips it): ours stays."""
    assert http_settings("write_timeout = 0\n") == HttpSettings()
    assert http_settings("max_header_bytes = 0\n") == HttpSettings()
    assert http_settings("read_timeout = 0\n") == HttpSettings(), "ours too: Go's 0 wins there"


@pytest.mark.parametrize(
    ("table", "path", "message"),
    [
        ('write_timeout = "15s"', "write_timeout", "integer of nanoseconds"),
        ("idle_timeout = -1", "idle_timeout", "integer of nanoseconds"),
        ("idle_timeout = 1.5e9", "idle_timeout", "integer of nanoseconds"),
        ("idle_timeout = 3600000000001", "idle_timeout", "between 0 and 3600000000000"),
        ("write_timeout = 1\nsend_timeout = 3", "write_timeout", "set one of them"),
        ('cors_strict = "yes"', "cors_strict", "a boolean"),
        ("max_header_bytes = 4294967296", "max_header_bytes", "an integer between 0"),
    ],
)
def test_go_http_keys_are_checked(table: str, path: str, message: str) -> None:
    """A Go key with a value Go would not decode (or a conflict with ours) names the key."""
    (issue,) = issues_of(doc(extra=f"[runtime.http]\n{table}\n"))
    assert issue.path == f"runtime.http.{path}"
    assert message in issue.message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("disable_auth", True),
        ("cors_strict", False),
        ("base_path", "/api"),
        ("max_header_bytes", 65536),
    ],
)
def test_go_http_keys_reach_our_field(key: str, value: object) -> None:
    """Each Go key lands in the HTTP kind's field of its name."""
    text = doc(extra=f"[services.http]\n{key} = {toml_value(value)}\n")
    definition = parse_definition(text, environ={})
    assert getattr(definition.runtime["http"], key) == value


def test_every_go_key_targets_a_field() -> None:
    """A Go key's targets are all fields of the settings class: none is silently dropped."""
    names = {spec.name for spec in dataclasses.fields(HttpSettings)}
    for key in HttpSettings.mikros_keys:
        assert set(key.targets) <= names, key


def test_go_keys_do_not_hide_unknown_keys() -> None:
    """A key no Mikros version defines is still an error, with a suggestion."""
    (issue,) = issues_of(doc(extra="[runtime.http]\nidle_timout = 1\n"))
    assert issue.message == 'unknown key "idle_timout"; did you mean "idle_timeout"?'


# -- clients, http-spec ----------------------------------------------------------------------


def clients_of(table: str, environ: dict[str, str]) -> Any:
    return parse_definition(doc(extra=table), environ=environ).clients


def test_client_without_host_dials_the_coupled_namespace() -> None:
    """[clients.x] without host dials x.<MIKROS_COUPLED_NAMESPACE>:<MIKROS_COUPLED_PORT>."""
    environ = {"MIKROS_COUPLED_NAMESPACE": "prod.svc", "MIKROS_COUPLED_PORT": "9090"}
    clients = clients_of("[clients.billing]\n[clients.users]\nport = 7000\n", environ)
    assert clients == {
        "billing": ClientSettings("billing.prod.svc", 9090),
        "users": ClientSettings("users.prod.svc", 7000),
    }
    default = clients_of("[clients.billing]\n", {"MIKROS_COUPLED_NAMESPACE": "ns"})
    assert default["billing"] == ClientSettings("billing.ns", 7070), "Mikros' default port"


def test_client_with_host_and_no_port_gets_the_coupled_port() -> None:
    """A host without port: MIKROS_COUPLED_PORT, else 7070; no namespace needed."""
    assert clients_of('[clients.a]\nhost = "h"\n', {})["a"] == ClientSettings("h", 7070)


def test_coupled_namespace_has_per_service_overrides() -> None:
    """MIKROS_COUPLED_NAMESPACE is read per service first, as every Mikros variable."""
    environ = {"MIKROS_COUPLED_NAMESPACE": "shared", "SVC__MIKROS_COUPLED_NAMESPACE": "mine"}
    assert clients_of("[clients.a]\n", environ)["a"].host == "a.mine"


@pytest.mark.parametrize("environ", [{}, {"MIKROS_COUPLED_NAMESPACE": ""}])
def test_client_without_host_or_namespace_names_the_variable(environ: dict[str, str]) -> None:
    """No host and no namespace: a config error naming the variable to set."""
    (issue,) = issues_of(doc(extra="[clients.billing]\n"), environ=environ)
    assert issue.path == "clients.billing"
    assert "MIKROS_COUPLED_NAMESPACE" in issue.message
    assert "give host" in issue.message


@pytest.mark.parametrize("value", ["", "x", "0", "70000"])
def test_bad_coupled_port_names_the_variable(value: str) -> None:
    """A client needing MIKROS_COUPLED_PORT and finding no port there names the variable."""
    (issue,) = issues_of(
        doc(extra='[clients.a]\nhost = "h"\n'), environ={"MIKROS_COUPLED_PORT": value}
    )
    assert issue.path == "clients.a.port"
    assert "MIKROS_COUPLED_PORT" in issue.message


def test_coupled_variables_are_not_read_when_unneeded() -> None:
    """Clients with host and port never look at the coupled variables."""
    table = '[clients.a]\nhost = "h"\nport = 1\n'
    assert clients_of(table, {"MIKROS_COUPLED_PORT": "x"})["a"] == ClientSettings("h", 1)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (doc('"http-spec"'), "types[0]"),
        (doc('"http"', "[runtime.http-spec]\n"), "runtime.http-spec"),
        (doc('"http"', "[services.http-spec]\n"), "services.http-spec"),
    ],
)
def test_http_spec_says_what_it_is(text: str, path: str) -> None:
    """http-spec is explained (protobuf-generated routes) with what to use, not "did you mean"."""
    (issue,) = issues_of(text)
    assert issue.path == path
    assert "protobuf HTTP annotations" in issue.message
    assert '"grpc"' in issue.message
    assert '"http"' in issue.message
    assert "did you mean" not in issue.message


# -- environment -----------------------------------------------------------------------------


def test_default_grpc_port_is_mikros_7070() -> None:
    """Without any setting gRPC listens on 7070, as Mikros Go and Rust."""
    assert parse_definition(doc('"grpc"'), environ={}).port("grpc") == 7070


@pytest.mark.parametrize(
    "variable",
    [
        "SVC_API__MIKROS_HTTP_PORT",
        "svc-api__MIKROS_HTTP_PORT",
        "MIKROS_HTTP_PORT_svc_api",
    ],
)
def test_per_service_port_override_forms(variable: str) -> None:
    """Ours, Mikros Go's <kebab>__ and Mikros Rust's _<snake> forms each override the port."""
    environ = {"MIKROS_HTTP_PORT": "7000", variable: "7001"}
    definition = parse_definition(doc('"http:8000"', name="svc_api"), environ=environ)
    assert definition.port("http") == 7001


def test_override_forms_are_read_in_order() -> None:
    """Ours first, then Go's, then Rust's, then the shared name."""
    forms = ["SVC_API__MIKROS_HTTP_PORT", "svc-api__MIKROS_HTTP_PORT", "MIKROS_HTTP_PORT_svc_api"]
    environ = {form: str(7000 + index) for index, form in enumerate(forms)}
    for index in range(len(forms)):
        definition = parse_definition(doc('"http"', name="svc_api"), environ=environ)
        assert definition.port("http") == 7000 + index
        del environ[forms[index]]


def test_another_services_override_is_ignored() -> None:
    """A per-service variable of another service does not touch this one."""
    environ = {"OTHER__MIKROS_HTTP_PORT": "7001", "MIKROS_HTTP_PORT_other": "7002"}
    assert parse_definition(doc('"http"'), environ=environ).port("http") == 8080


def test_bad_override_names_the_variable_it_came_from() -> None:
    """A bad port in an override names that variable, not the shared one."""
    (issue,) = issues_of(doc('"http"'), environ={"svc__MIKROS_HTTP_PORT": "x"})
    assert "svc__MIKROS_HTTP_PORT" in issue.message


def test_env_port_wins_over_types_even_at_its_default() -> None:
    """Env over types, always (Rust lets types win when the variable equals its default)."""
    environ = {"MIKROS_HTTP_PORT": "8080"}
    assert parse_definition(doc('"http:9000"'), environ=environ).port("http") == 8080


@pytest.mark.parametrize(
    ("environ", "deploy"),
    [
        ({}, ""),
        ({"MIKROS_SERVICE_DEPLOY": "prod"}, "prod"),
        ({"MIKROS_SERVICE_DEPLOY": "prod", "svc__MIKROS_SERVICE_DEPLOY": "dev"}, "dev"),
        ({"MIKROS_SERVICE_DEPLOY_svc": "staging"}, "staging"),
    ],
)
def test_deploy_env(environ: dict[str, str], deploy: str) -> None:
    """MIKROS_SERVICE_DEPLOY, per-service first, is on the definition ("" when unset)."""
    assert parse_definition(MINIMAL, environ=environ).deploy_env == deploy


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("t", True), ("TRUE", True), ("True", True), ("0", False), ("f", False)],
)
def test_cicd_test_reads_go_booleans(value: str, expected: bool) -> None:
    """MIKROS_CICD_TEST takes strconv.ParseBool's words, as Mikros Go."""
    definition = parse_definition(MINIMAL, environ={"MIKROS_CICD_TEST": value})
    assert definition.cicd_test is expected
    assert parse_definition(MINIMAL, environ={}).cicd_test is False


@pytest.mark.parametrize("value", ["yes", "", "tRUE", "2"])
def test_cicd_test_not_a_go_boolean_is_an_error(value: str) -> None:
    """A value Mikros Go would fail to start on is a config error naming the variable."""
    (issue,) = issues_of(MINIMAL, environ={"MIKROS_CICD_TEST": value})
    assert "MIKROS_CICD_TEST" in issue.message


def test_mikros_env_gives_other_features_the_per_service_value() -> None:
    """Features read Mikros variables (tracker header, hidden fields) per service, then shared."""
    environ = {"MIKROS_TRACKER_HEADER_NAME": "X-Trace", "SVC__MIKROS_HIDE_RESPONSE_FIELDS": "a,b"}
    definition = parse_definition(MINIMAL, environ=environ)
    assert definition.mikros_env("MIKROS_TRACKER_HEADER_NAME") == "X-Trace"
    assert definition.mikros_env("MIKROS_HIDE_RESPONSE_FIELDS") == "a,b"
    assert definition.mikros_env("MIKROS_UNSET") is None


def test_schema_knows_services_and_go_keys(registry: Registry) -> None:
    """The schema takes [services.<kind>] like [runtime.<kind>], Go's HTTP keys included."""
    properties = definition_schema(registry)["properties"]
    assert properties["services"]["properties"] == properties["runtime"]["properties"]
    http = properties["runtime"]["properties"]["http"]["properties"]
    assert http["write_timeout"]["maximum"] == 3600 * 10**9
    ours, go, go_default = http["read_timeout"]["anyOf"]
    assert (ours["maximum"], go["exclusiveMinimum"]) == (3600, 3600)
    assert (go_default["minimum"], go_default["maximum"]) == (0, 0)
    assert len(http["max_header_bytes"]["anyOf"]) == 3
    assert "required" not in properties["clients"]["additionalProperties"]
