"""The env feature: boot check, per-service overrides, typed access and secrets never shown.

Unit tests build an :class:`Env` from a real definition (``environ=`` is the
whole environment it sees); the builder runs with a real ``BuildContext``,
container and telemetry hub; the end-to-end guarantee — a secret's value
appears in no output, log line or response — runs a real service process
through the ``mikros-trio`` command line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
from dependency_injector import providers

from helpers import MIKROS_TRIO, Spawn, run_http_service
from mikros_trio import ConfigError, Lifetime, Service, ServiceContainer
from mikros_trio._definition import env_forms, mikros_env_forms
from mikros_trio._telemetry import Telemetry
from mikros_trio.ext import BuildContext, Definition, parse_definition
from mikros_trio.features.env import Env, Secret, build_env
from mikros_trio.features.settings import EnvSettings
from mikros_trio.testing import ServiceStarter

HERE = Path(__file__).parent


def definition(
    environ: Mapping[str, str],
    *,
    name: str = "items-api",
    envs: tuple[str, ...] = ("DB_DSN", "WORKERS", "RATIO", "DEBUG", "TOKEN"),
    secrets: tuple[str, ...] = ("TOKEN",),
) -> Definition:
    """A worker service's definition declaring ``envs``, with ``secrets`` in [features.env]."""
    text = (
        f'name = "{name}"\ntypes = ["worker"]\nversion = "v1.0.0"\nenvs = {list(envs)!r}\n'.replace(
            "'", '"'
        )
        + f"[features.env]\nsecrets = {list(secrets)!r}\n".replace("'", '"')
    )
    return parse_definition(text, environ=environ)


FULL = {
    "DB_DSN": "postgres://db/shared",
    "WORKERS": "4",
    "RATIO": "0.25",
    "DEBUG": "yes",
    "TOKEN": "t0ken-shared",
}


# -- names: the override forms ---------------------------------------------------------


def test_forms_put_the_shell_override_first_then_go_then_the_name() -> None:
    """items-api's DB_DSN is read from ITEMS_API__DB_DSN, then items-api__DB_DSN, then DB_DSN."""
    assert env_forms("items-api", "DB_DSN") == ("ITEMS_API__DB_DSN", "items-api__DB_DSN", "DB_DSN")
    assert env_forms("Orders.v2", "X") == ("ORDERS_V2__X", "orders.v2__X", "X")


@pytest.mark.parametrize(
    ("name", "kebab"),
    [
        # go-strcase's own KebabCase table, which Mikros Go's service.FromString uses.
        ("Foo", "foo"),
        ("FooB", "foo-b"),
        ("FooID", "foo-id"),
        (" FooBar\t", "foo-bar"),
        ("HTTPStatusCode", "http-status-code"),
        ("ParseURL.DoParse", "parse-url.do-parse"),
        ("Convert-dash", "convert-dash"),
        ("Skip___MultipleUnderscores", "skip-multiple-underscores"),
        ("items_api", "items-api"),
        # go-strcase's edges, kept: a leading separator still writes "-", a
        # trailing one is written as it is, non-ASCII letters keep their case.
        ("_items", "-items"),
        ("items_", "items_"),
        ("a__b-_c", "a-b-c"),
        ("ÉtéAPI", "Étéapi"),
        ("github.com/Acme/Users", "github.com/acme/users"),
        ("x", "x"),
    ],
)
def test_go_form_uses_mikros_go_kebab_case(name: str, kebab: str) -> None:
    """The Go form spells the service name exactly as Mikros Go's env.Load does."""
    assert env_forms(name, "K")[1] == f"{kebab}__K"


@pytest.mark.parametrize(
    ("name", "snake"),
    [
        # Mikros Rust's ServiceName::to_snake_case, which its Env suffixes use.
        ("items-api", "items_api"),
        ("ItemsApi", "items_api"),
        ("HTTPServer", "h_t_t_p_server"),
        ("Items-Api", "items_api"),
        ("items_API", "items_a_p_i"),
    ],
)
def test_rust_form_uses_mikros_rust_snake_case(name: str, snake: str) -> None:
    """Mikros variables take Rust's MIKROS_X_<snake name> after Go's form, before the name."""
    forms = mikros_env_forms(name, "MIKROS_HTTP_PORT")
    assert forms[-2:] == (f"MIKROS_HTTP_PORT_{snake}", "MIKROS_HTTP_PORT")
    assert forms[:-2] == env_forms(name, "MIKROS_HTTP_PORT")[:-1]


def test_missing_envs_accepts_any_form_and_lists_every_missing_name() -> None:
    """A name set only through an override is present; every unset or empty name is reported."""
    environ = {"ITEMS_API__DB_DSN": "x", "items-api__WORKERS": "2", "DEBUG": ""}
    assert definition(environ).missing_envs() == ("RATIO", "DEBUG", "TOKEN")
    other = definition({"OTHER_SVC__RATIO": "1"})
    assert "RATIO" in other.missing_envs()


def test_service_build_reports_all_missing_envs_at_once() -> None:
    """Building a service with three unset names raises one ConfigError naming all three."""
    with pytest.raises(ConfigError) as caught:
        Service(ProbeContainer, definition({"DB_DSN": "x", "WORKERS": "1"})).build()
    message = str(caught.value)
    for name in ("RATIO", "DEBUG", "TOKEN"):
        assert name in message
    assert len(caught.value.issues) == 3


def test_missing_env_in_a_real_process_names_both_forms(spawn: Spawn, tmp_path: Path) -> None:
    """``mikros-trio check`` exits 2 naming the variable and its per-service override."""
    config = tmp_path / "service.toml"
    config.write_text(
        'name = "items-api"\ntypes = ["worker"]\nversion = "v1.0.0"\n'
        'envs = ["MIKROS_TEST_UNSET_A", "MIKROS_TEST_UNSET_B"]\n'
    )
    unset = {
        form: None
        for name in ("MIKROS_TEST_UNSET_A", "MIKROS_TEST_UNSET_B")
        for form in env_forms("items-api", name)
    }
    child = spawn(MIKROS_TRIO, "check", "--config", config, env=unset)
    assert child.wait() == 2, child.report()
    for name in ("MIKROS_TEST_UNSET_A", "MIKROS_TEST_UNSET_B"):
        assert name in child.stderr
        assert f"ITEMS_API__{name}" in child.stderr, child.report()
    assert "Traceback" not in child.stderr


# -- typed access ----------------------------------------------------------------------------


def test_typed_reads_parse_each_type() -> None:
    """str, int, float and bool read and convert the declared values."""
    env = Env(definition(FULL))
    assert env.str("DB_DSN") == "postgres://db/shared"
    assert env.int("WORKERS") == 4
    assert env.float("RATIO") == 0.25
    assert env.bool("DEBUG") is True


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[("true", True), ("1", True), ("YES", True), (" on ", True)],
        *[("false", False), ("0", False), ("No", False), ("off", False)],
    ],
)
def test_bool_accepts_the_usual_words(text: str, value: bool) -> None:
    """true/false, 1/0, yes/no, on/off, in any case, are flags."""
    assert Env(definition({**FULL, "DEBUG": text})).bool("DEBUG") is value


def test_override_is_read_before_the_shared_name() -> None:
    """ITEMS_API__DB_DSN wins over DB_DSN, and source() says which variable was read."""
    env = Env(definition({**FULL, "ITEMS_API__DB_DSN": "postgres://db/items"}))
    assert env.str("DB_DSN") == "postgres://db/items"
    assert env.source("DB_DSN") == "ITEMS_API__DB_DSN"
    assert env.source("WORKERS") == "WORKERS"


def test_shell_override_wins_over_go_override() -> None:
    """With both override spellings set, the upper-case one is read."""
    environ = {**FULL, "items-api__WORKERS": "8", "ITEMS_API__WORKERS": "16"}
    assert Env(definition(environ)).int("WORKERS") == 16
    assert Env(definition({**FULL, "items-api__WORKERS": "8"})).int("WORKERS") == 8


def test_reads_the_definition_environ_not_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable changed in os.environ after loading is not seen: the checked snapshot is read."""
    monkeypatch.setenv("DB_DSN", "postgres://db/process")
    env = Env(definition(FULL))
    monkeypatch.setenv("ITEMS_API__DB_DSN", "postgres://db/later")
    assert env.str("DB_DSN") == "postgres://db/shared"
    assert os.environ["DB_DSN"] == "postgres://db/process"


@pytest.mark.parametrize(
    ("method", "name", "text", "expected"),
    [
        ("int", "WORKERS", "four", "expected a 64-bit integer"),
        ("int", "WORKERS", "1_000", "expected a 64-bit integer"),
        ("int", "WORKERS", "9" * 5000, "expected a 64-bit integer"),
        ("int", "WORKERS", str(2**63), "expected a 64-bit integer"),
        ("float", "RATIO", "nan", "expected a finite number"),
        ("float", "RATIO", "1e999", "expected a finite number"),
        ("bool", "DEBUG", "maybe", "expected true/false"),
    ],
)
def test_bad_value_names_variable_expectation_and_value(
    method: str, name: str, text: str, expected: str
) -> None:
    """A value that does not parse is a ConfigError naming the variable, the type and the value."""
    env = Env(definition({**FULL, name: text}))
    with pytest.raises(ConfigError) as caught:
        getattr(env, method)(name)
    message = str(caught.value)
    assert name in message
    assert expected in message
    assert f'"{text[:40]}' in message  # a long value is shown cut


def test_bad_value_from_override_says_which_variable() -> None:
    """When the override held the bad value, the error names it."""
    env = Env(definition({**FULL, "ITEMS_API__WORKERS": "lots"}))
    with pytest.raises(ConfigError, match=r"WORKERS.*\"lots\".*ITEMS_API__WORKERS"):
        env.int("WORKERS")


def test_bad_secret_value_is_not_shown() -> None:
    """A secret that does not parse is reported without its value."""
    env = Env(definition({**FULL, "TOKEN": "hunter2-not-a-number"}))
    with pytest.raises(ConfigError) as caught:
        env.int("TOKEN")
    assert "hunter2" not in str(caught.value)
    assert "secret" in str(caught.value)
    assert "TOKEN" in str(caught.value)


def test_unchecked_missing_name_names_its_overrides() -> None:
    """An Env over a definition nobody checked says which variables it looked for."""
    env = Env(definition({}))
    with pytest.raises(ConfigError, match="nor its per-service override ITEMS_API__DB_DSN or"):
        env.str("DB_DSN")


def test_undeclared_name_is_an_error_unless_it_has_a_default() -> None:
    """Reading a name envs does not list raises; a default= makes it optional and still reads it."""
    env = Env(definition({**FULL, "REGION": "eu", "ITEMS_API__POOL": "9"}))
    with pytest.raises(ConfigError, match=r"REGION is read but not declared in envs.*default="):
        env.str("REGION")
    with pytest.raises(ConfigError, match="did you mean"):
        env.int("WORKER")
    assert env.str("REGION", default="us") == "eu"
    assert env.int("POOL", default=1) == 9
    assert env.int("ABSENT", default=3) == 3
    assert env.bool("ABSENT", default=False) is False
    assert env.float("ABSENT", default=1) == 1.0


def test_get_is_optional_access() -> None:
    """get() returns a declared or undeclared value, or the default, and never raises."""
    env = Env(definition({**FULL, "REGION": "eu"}))
    assert env.get("DB_DSN") == "postgres://db/shared"
    assert env.get("REGION") == "eu"
    assert env.get("ABSENT") is None
    assert env.get("ABSENT", "fallback") == "fallback"
    assert "REGION" in env
    assert "ABSENT" not in env


# -- secrets -----------------------------------------------------------------------------------


def test_secret_never_shows_its_value() -> None:
    """str, repr, f-strings and the Env's repr never show a secret; reveal() gives it."""
    env = Env(definition(FULL))
    token = env.secret("TOKEN")
    assert isinstance(token, Secret)
    assert token.reveal() == "t0ken-shared"
    for shown in (str(token), repr(token), f"{token}", f"{token!r}", repr(env), str([token])):
        assert "t0ken" not in shown
    assert str(token) == "***"
    assert "TOKEN" in repr(token)
    assert bool(token)


def test_secret_must_be_listed() -> None:
    """env.secret() on a name [features.env] secrets does not list says to list it."""
    env = Env(definition(FULL))
    with pytest.raises(ConfigError, match=r"features\.env\.secrets.*DB_DSN"):
        env.secret("DB_DSN")


# -- the builder ---------------------------------------------------------------------------------


def build(
    environ: Mapping[str, str], secrets: tuple[str, ...]
) -> tuple[Telemetry, ServiceContainer]:
    """Run build_env the way the container layer does; return the hub and the container."""
    loaded = definition(environ, secrets=secrets)
    container = ServiceContainer()
    telemetry = Telemetry(loaded.name, loaded.version)
    settings = loaded.features["env"].settings
    assert isinstance(settings, EnvSettings)
    components = build_env(BuildContext("env", settings, loaded, container, telemetry))
    assert list(components) == []
    return telemetry, container


def test_build_registers_every_form_of_each_secret() -> None:
    """Both the shared and the override value of a secret are masked by the hub; others are not."""
    environ = {**FULL, "ITEMS_API__TOKEN": "t0ken-for-items", "items-api__TOKEN": "t0ken-go"}
    telemetry, _ = build(environ, ("TOKEN",))
    line = "shared=t0ken-shared items=t0ken-for-items go=t0ken-go dsn=postgres://db/shared"
    assert telemetry.redact(line) == "shared=*** items=*** go=*** dsn=postgres://db/shared"


def test_build_names_a_short_secret_by_its_variable() -> None:
    """A secret under 8 characters is reported weak by the variable it came from, not its value."""
    environ = {**FULL, "TOKEN": "abc", "ITEMS_API__TOKEN": "t0ken-for-items"}
    telemetry, _ = build(environ, ("TOKEN",))
    assert telemetry.weak_secrets == ("TOKEN",)
    assert telemetry.redact("abc t0ken-for-items") == "*** ***"


def test_a_dsn_secret_masks_its_password_as_a_driver_sees_it() -> None:
    """A DSN listed as a secret masks its password, decoded, wherever it shows alone."""
    environ = {**FULL, "DB_DSN": "postgresql://app:p%40ss-w0rd-9@db/items"}
    telemetry, _ = build(environ, ("TOKEN", "DB_DSN"))
    assert telemetry.redact("password='p@ss-w0rd-9' user=app") == "password='***' user=app"


def test_build_gives_the_container_and_the_hub_the_env() -> None:
    """ServiceContainer.env provides the Env, which telemetry.get(Env) also returns."""
    telemetry, container = build(FULL, ("TOKEN",))
    env = container.env()
    assert isinstance(env, Env)
    assert telemetry.get(Env) is env
    assert env.int("WORKERS") == 4


def test_secret_not_in_envs_is_a_config_error_with_a_suggestion() -> None:
    """A secret envs does not declare fails at features.env.secrets[i] with a did-you-mean."""
    with pytest.raises(ConfigError) as caught:
        build(FULL, ("TOKEN", "TOKEM"))
    (issue,) = caught.value.issues
    assert issue.path == "features.env.secrets[1]"
    assert 'did you mean "TOKEN"' in issue.message


class Probe:
    """A worker built with the Env injected: reads a typed value when it is constructed."""

    def __init__(self, env: Env) -> None:
        self.workers = env.int("WORKERS")

    async def run(self, lifetime: Lifetime) -> None:
        await lifetime.wait_stopping()


class ProbeContainer(ServiceContainer):
    worker = providers.Singleton(Probe, env=ServiceContainer.env)


async def test_components_get_the_env_injected(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A provider injected with ServiceContainer.env reads the override in a running service."""
    config = tmp_path / "service.toml"
    config.write_text(
        'name = "probe"\ntypes = ["worker"]\nversion = "v1.0.0"\nenvs = ["WORKERS"]\n'
        "[lifecycle]\nshutdown_timeout = 5.0\ndrain_timeout = 2.0\n"
    )
    running = await mikros_service.start(
        ProbeContainer, config, environ={"WORKERS": "3", "PROBE__WORKERS": "5"}
    )
    probe = running.container.worker()
    assert isinstance(probe, Probe)
    assert probe.workers == 5
    assert await running.stop() == 0


# -- end to end: a secret's value appears nowhere -------------------------------------------

SHARED_SECRET = "S3cr3t-shared-4f1c"
SERVICE_SECRET = "S3cr3t-leaky-9b7e"


def test_secret_never_appears_in_output_or_responses(spawn: Spawn, tmp_path: Path) -> None:
    """A service logging its secret and raising it (500, 404, crashed worker) never shows it."""
    child, port = run_http_service(
        spawn,
        HERE / "leaky_service.py",
        tmp_path / "service.toml",
        'name = "leaky"\ntypes = ["http", "worker"]\nversion = "v1.0.0"\nenvs = ["TOKEN"]\n'
        '[features.env]\nsecrets = ["TOKEN"]\n',
        {"TOKEN": SHARED_SECRET, "LEAKY__TOKEN": SERVICE_SECRET},
    )
    bodies = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0, trust_env=False) as http:
        boom = http.get("/boom")
        assert boom.status_code == 500
        missing = http.get("/missing")
        assert missing.status_code == 404
        bodies += [boom.text, missing.text, http.get("/healthz").text]
        assert http.get("/crash").status_code == 200
    assert child.wait() == 1, child.report()
    everything = "\n".join([child.stdout, child.stderr, *bodies])
    for secret in (SHARED_SECRET, SERVICE_SECRET):
        assert secret not in everything, child.report()
    # The lines were written, masked: not dropped.
    assert "upstream rejected token ***" in boom.json().get("details", ""), boom.text
    assert missing.json()["message"] == "no account for token ***"
    assert re.search(r"calling upstream with token \*\*\*", everything), child.report()
    assert re.search(r"worker failed with token \*\*\*", everything), child.report()
    assert re.search(r"shared token is \*\*\*", everything), child.report()
