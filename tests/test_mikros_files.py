"""Real Mikros service.toml files: each loads, or is refused for a reason Mikros refuses it too.

The corpus under ``assets/mikros/`` holds every service.toml of Mikros Go's
examples at v0.19.0 and at main, of Mikros Rust's examples and test data,
the blocks of the docs' service.toml guide, and mikros-cli's ``mikros new``
output rendered by hand; each file's first line names its origin (see the
README there). Every file has a verdict below, and a file without one
fails :func:`test_every_file_has_a_verdict`.

Mikros Rust's example apps register plugin kinds and features in code
(``ServiceBuilder::custom``, ``with_features``); a Python service registers
them through entry points. Files that use them are loaded with a registry
holding stand-ins of those plugins (:data:`PLUGINS`), as the apps build them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from mikros_trio.errors import ConfigError
from mikros_trio.ext import (
    ClientSettings,
    Definition,
    FeatureSpec,
    KindSpec,
    Registry,
    default_registry,
    load_definition,
)

CORPUS = Path(__file__).parent / "assets" / "mikros"
FILES = sorted(path.relative_to(CORPUS).as_posix() for path in CORPUS.rglob("*.toml"))


@dataclass(frozen=True, slots=True)
class SimpleApiSettings:
    """Mikros Rust's example feature ``simple_api`` (examples/features/simple_api)."""

    collections: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NoSettings:
    """Mikros Rust's example feature ``example``: ``enabled`` and nothing else."""


@dataclass(frozen=True, slots=True)
class CronjobSettings:
    """Mikros Rust's example kind ``cronjob`` (examples/services/cronjob).

    Its settings may be absent: the kind's initialize leaves them ``None``.
    """

    frequency: str = ""
    days: tuple[str, ...] = ()
    scheduled_times: tuple[str, ...] = ()


#: The plugins Mikros Rust's example apps register in their main.rs.
PLUGINS = Registry(
    kinds={
        **default_registry().kinds,
        "cronjob": KindSpec("cronjob", CronjobSettings, "tests:cronjob"),
    },
    features={
        **default_registry().features,
        "simple_api": FeatureSpec("simple_api", SimpleApiSettings, "tests:simple_api"),
        "example": FeatureSpec("example", NoSettings, "tests:example"),
    },
)

#: Files that load, and the registry they load with.
LOADS: dict[str, Registry | None] = {
    "cli/grpc_module_path.toml": None,
    "cli/http.toml": None,
    "cli/script_with_feature.toml": None,
    "cli/worker_rust.toml": None,
    "docs/clients.toml": None,
    "docs/custom_settings.toml": None,
    "docs/envs.toml": None,
    "docs/features.toml": PLUGINS,
    "docs/hybrid.toml": None,
    # [log] keys of Go v0.19.0 (error_stacktrace) and Rust (local_timestamp,
    # display_errors): LogSettings, which the logs helper's branch extends.
    "docs/log_go.toml": None,
    "docs/log_rust.toml": None,
    "docs/required_fields.toml": None,
    "go-main/grpc.toml": None,
    "go-main/http.toml": None,
    "go-main/script.toml": None,
    "go-main/worker.toml": None,
    "go-v0.19.0/grpc.toml": None,
    "go-v0.19.0/http.toml": None,
    "go-v0.19.0/script.toml": None,
    "go-v0.19.0/worker.toml": None,
    "rust/cronjob_service.toml": PLUGINS,
    "rust/grpc.toml": None,
    "rust/grpc_with_lifecycle.toml": None,
    "rust/http.toml": None,
    "rust/http_with_lifecycle.toml": None,
    "rust/http_with_lifecycle_and_state.toml": None,
    "rust/http_with_protobuf.toml": PLUGINS,
    "rust/http_with_state.toml": None,
    "rust/script.toml": None,
    "rust/test_ok_clients.toml": PLUGINS,
    "rust/test_ok_cronjob.toml": PLUGINS,
    "rust/test_ok_custom_settings.toml": None,
    "rust/test_ok_hybrid.toml": None,
}

_HTTP_SPEC = (
    "types[0]",
    "routes are generated from the protobuf HTTP annotations",
    'Mikros Rust has no "http-spec" kind either (definition/validation.rs: '
    '"service type is not supported"); Go generates its routes from protobuf',
)

#: Files refused: (key path, message fragment, why Mikros refuses it too, or why we differ).
REJECTED: dict[str, tuple[str, str, str]] = {
    "cli/http_spec.toml": _HTTP_SPEC,
    "go-main/http_spec.toml": _HTTP_SPEC,
    "go-v0.19.0/http_spec.toml": _HTTP_SPEC,
    "rust/test_err_invalid_toml.toml": (
        "",
        "invalid TOML",
        "an unterminated string: Mikros Rust's own test expects MalformedToml",
    ),
    "rust/test_err_unsupported_type.toml": (
        "types[0]",
        'unknown kind "websocket"',
        "Mikros Rust's own test expects it refused unless websocket is whitelisted",
    ),
    # The two below load in Mikros, which ignores keys it does not read. The
    # issue keeps a key no Mikros version (nor any plugin) defines an error.
    "docs/services.toml": (
        "services.http.use_tls",
        'unknown key "use_tls"',
        "the guide's illustration: no Mikros version defines use_tls in [services.http] "
        "nor workers in [services.native]",
    ),
    "rust/native.toml": (
        "features.another_api",
        'unknown feature "another_api"',
        "no Mikros plugin named another_api exists: the app registers simple_api and "
        "example, and Mikros Rust ignores the table",
    ),
    "rust/test_ok.toml": (
        "features.another_api",
        'unknown feature "another_api"',
        "as rust/native.toml: a table for a feature nobody registers",
    ),
}


def test_every_file_has_a_verdict() -> None:
    """Each corpus file is either expected to load or expected to be refused, not both."""
    assert set(LOADS).isdisjoint(REJECTED)
    assert sorted([*LOADS, *REJECTED]) == FILES
    assert len(FILES) >= 40


def test_every_file_names_its_origin() -> None:
    """Each file's first line says which repository, revision and path it comes from."""
    for name in FILES:
        first = (CORPUS / name).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# origin: mikros-dev/mikros"), name


def load(name: str, registry: Registry | None = None) -> Definition:
    return load_definition(CORPUS / name, environ={}, registry=registry)


@pytest.mark.parametrize("name", sorted(LOADS))
def test_file_loads(name: str) -> None:
    """The file loads as it is, every kind it lists with its settings."""
    definition = load(name, LOADS[name])
    assert set(definition.runtime) == set(definition.kinds)
    assert definition.version.startswith(("v", "0"))


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_file_is_rejected_for_its_reason(name: str) -> None:
    """The file is refused with an issue at the key that makes Mikros (or the issue) refuse it."""
    path, fragment, _why = REJECTED[name]
    with pytest.raises(ConfigError) as caught:
        load(name, PLUGINS)
    assert any(issue.path == path and fragment in issue.message for issue in caught.value.issues), (
        caught.value.issues
    )


# -- what the loaded files mean ------------------------------------------------------


def test_go_main_http_example_takes_disable_auth() -> None:
    """Go main's HTTP example: [runtime.http] disable_auth loads and reaches the HTTP kind."""
    definition = load("go-main/http.toml")
    assert definition.runtime["http"].disable_auth is True
    assert definition.envs == ("SOME_VALUE",)
    assert definition.port("http") == 8080


def test_go_example_without_a_port_listens_on_mikros_default() -> None:
    """Go's gRPC example names no port: it gets Mikros' 7070, not grpcio's 50051."""
    assert load("go-v0.19.0/grpc.toml").port("grpc") == 7070
    assert load("rust/grpc.toml").port("grpc") == 7070


def test_cli_module_path_name() -> None:
    """mikros-cli's fully qualified name names the service by its last element."""
    definition = load("cli/grpc_module_path.toml")
    assert (definition.name, definition.full_name) == ("users", "github.com/acme/users")
    assert definition.product == "ACME"


def test_cli_short_versions() -> None:
    """Go's short versions v1 and v1.2, which mikros-cli's validator accepts, load."""
    assert load("cli/http.toml").version == "v1.2"
    assert load("cli/worker_rust.toml").version == "v1"


def test_docs_clients_keep_host_and_port() -> None:
    """The guide's [clients.*] tables dial what they say."""
    assert load("docs/clients.toml").clients == {
        "user": ClientSettings("localhost", 7070),
        "address": ClientSettings("127.0.0.1", 7071),
    }


def test_rust_cronjob_reads_its_services_table() -> None:
    """Rust's [services.cronjob] is the plugin kind's settings table, as load_service reads it."""
    definition = load("rust/test_ok_cronjob.toml", PLUGINS)
    assert definition.runtime["cronjob"] == CronjobSettings("weekly", ("wed",), ("09:00", "10:00"))


def test_rust_plugin_feature_settings() -> None:
    """Rust's [features.simple_api] decodes into the plugin's settings, enabled."""
    config = load("rust/test_ok_clients.toml", PLUGINS).features["simple_api"]
    assert config.enabled
    assert config.settings == SimpleApiSettings(("name1", "name2"))


def test_plugin_files_name_the_missing_plugin_without_it() -> None:
    """Without the plugins registered, a file using them names each one (as Rust's whitelist)."""
    with pytest.raises(ConfigError) as caught:
        load("rust/cronjob_service.toml")
    assert {issue.path for issue in caught.value.issues} == {"types[0]", "features.simple_api"}
