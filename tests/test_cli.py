"""``mikros-trio`` on the command line: exit codes, messages, and never a traceback for a mistake.

Most tests run the installed console script as users do. Where many
inputs are tried (every bad asset, random documents) they call
:func:`mikros_trio.cli.main`, the very function the script runs, in-process,
and confirm a sample through the real process.
"""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import MIKROS_TRIO, REPO, Spawn
from mikros_trio import cli
from mikros_trio.ext import definition_schema

ASSETS = Path(__file__).parent / "assets"

EXIT_USAGE = 2


def _expectation(path: Path) -> str:
    """The key path a bad asset's first line, ``# expect: <key.path>``, promises."""
    first = path.read_text().splitlines()[0]
    match = re.fullmatch(r"#\s*expect:\s*(.+?)\s*", first)
    assert match, f"{path}: first line must be '# expect: <key.path>', got {first!r}"
    return match.group(1)


def _assets(folder: str) -> list[Any]:
    return [
        pytest.param(path, id=f"{folder}/{path.stem}")
        for path in sorted((ASSETS / folder).glob("*.toml"))
    ]


def _no_traceback(*outputs: str) -> None:
    for output in outputs:
        assert "Traceback" not in output, output


# -- check: bad files ---------------------------------------------------------


def _real_process_sample(params: list[Any]) -> list[Any]:
    """The first file of each folder and every syntax error: enough to cover the process path."""
    firsts = {param.values[0].parent: param for param in reversed(params)}
    syntax = [p for p in params if _expectation(p.values[0]) == "<syntax>"]
    return list({param.id: param for param in [*firsts.values(), *syntax]}.values())


_BAD_FILES = _assets("bad") + _assets("bad_graph")


@pytest.mark.parametrize("path", _BAD_FILES)
def test_check_bad_file_names_key_path(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    """``check --config`` on a bad file exits 2 naming the key path its first line expects."""
    # The console script is exactly this function; the real process is
    # covered, on a sample, just below: running ~40 interpreters would cost
    # more than it checks.
    code = cli.main(["check", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE, (out, err)
    expected = _expectation(path)
    if expected != "<syntax>":
        assert expected in err
    assert path.name in err
    _no_traceback(out, err)


@pytest.mark.parametrize("path", _real_process_sample(_BAD_FILES))
def test_check_bad_file_in_a_real_process(spawn: Spawn, path: Path) -> None:
    """The ``mikros-trio`` console script exits 2 on a bad file, naming it, with no traceback."""
    child = spawn(MIKROS_TRIO, "check", "--config", path)
    assert child.wait() == EXIT_USAGE, child.report()
    expected = _expectation(path)
    if expected != "<syntax>":
        assert expected in child.stderr, child.report()
    assert path.name in child.stderr, child.report()
    _no_traceback(child.stdout, child.stderr)


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_check_missing_env_names_it(spawn: Spawn, tmp_path: Path, value: str | None) -> None:
    """A required variable unset, or set empty (Mikros Go refuses it too), is a config error."""
    config = tmp_path / "service.toml"
    config.write_text(
        'name = "needs-env"\ntypes = ["worker"]\nversion = "v1.0.0"\n'
        'envs = ["MIKROS_TEST_SURELY_UNSET"]\n'
    )
    child = spawn(MIKROS_TRIO, "check", "--config", config, env={"MIKROS_TEST_SURELY_UNSET": value})
    assert child.wait() == EXIT_USAGE, child.report()
    said = "empty" if value == "" else "not set"
    assert f"required environment variable MIKROS_TEST_SURELY_UNSET is {said}" in child.stderr
    _no_traceback(child.stdout, child.stderr)


def test_check_takes_go_http_keys(spawn: Spawn, tmp_path: Path) -> None:
    """Go's HTTP keys load (exit 0): each reaches the HTTP kind, none is an error or a note."""
    config = tmp_path / "service.toml"
    config.write_text(
        'name = "http"\ntypes = ["http:8080"]\nversion = "v0.1.0"\nlanguage = "go"\n'
        '[services.http]\ndisable_auth = true\ncors_strict = false\nbase_path = "/api"\n'
        "max_header_bytes = 65536\nwrite_timeout = 15000000000\n"
    )
    child = spawn(MIKROS_TRIO, "check", "--config", config)
    assert child.wait() == 0, child.report()
    assert "note:" not in child.stdout, child.report()
    assert "write_timeout" not in child.stdout, "converted to send_timeout"


# -- check: good targets ------------------------------------------------------


def test_check_worker_example_prints_start_order(spawn: Spawn) -> None:
    """``check`` on the worker example exits 0 and lists the counter before the worker."""
    child = spawn(MIKROS_TRIO, "check", "examples/worker/main.py")
    assert child.wait() == 0, child.report()
    waves = re.findall(r"(?m)^\s+(\d+)\. (.+)$", child.stdout)
    wave_of = {name: int(n) for n, line in waves for name in line.split(", ")}
    assert wave_of.get("counter", 99) < wave_of.get("worker", 0), child.report()
    assert child.stderr == ""


@pytest.mark.parametrize("target", ["examples/script/main.py", "examples/script/service.toml"])
def test_check_through_python_m(spawn: Spawn, target: str) -> None:
    """``python -m mikros_trio.cli`` is the same command as the console script, both forms."""
    child = spawn(sys.executable, "-m", "mikros_trio.cli", "check", target)
    assert child.wait() == 0, child.report()
    assert "examples/script/service.toml: ok" in child.stdout
    assert child.stdout == _check_output(spawn, target)


def _check_output(spawn: Spawn, *args: str | Path, env: dict[str, str] | None = None) -> str:
    """What ``mikros-trio check ARGS`` prints, once it exited 0."""
    child = spawn(MIKROS_TRIO, "check", *args, env=env or {})
    assert child.wait() == 0, child.report()
    assert child.stderr == "", child.report()
    return child.stdout


def _features(output: str) -> list[str]:
    """The ``features:`` line of check's output, as names."""
    match = re.search(r"(?m)^features: (.*)$", output)
    assert match is not None, output
    return match.group(1).split(", ")


def _start_order(output: str) -> list[str]:
    """The components of check's start order, wave by wave."""
    return [
        name for line in re.findall(r"(?m)^\s+\d+\. (.+)$", output) for name in line.split(", ")
    ]


@pytest.mark.parametrize("target", ["service.toml", "./service.toml", "", "."])
def test_check_toml_target_checks_the_file(spawn: Spawn, tmp_path: Path, target: str) -> None:
    """A service.toml path, or a directory holding one, as TARGET is checked as ``--config``."""
    config = tmp_path / "service.toml"
    config.write_text((REPO / "examples" / "worker" / "service.toml").read_text())
    expected = _check_output(spawn, "--config", config)
    assert "the file alone" in expected
    assert _check_output(spawn, tmp_path / target) == expected


def test_run_toml_target_says_to_pass_it_as_config(spawn: Spawn) -> None:
    """``run service.toml`` exits 2: run needs the container, and takes the file as --config."""
    child = spawn(MIKROS_TRIO, "run", "examples/worker/service.toml")
    assert child.wait() == EXIT_USAGE, child.report()
    assert "--config examples/worker/service.toml" in child.stderr, child.report()
    assert "cannot import" not in child.stderr
    _no_traceback(child.stdout, child.stderr)


def test_check_toml_target_and_config_is_a_usage_error(spawn: Spawn) -> None:
    """Naming the file twice (TARGET and --config) exits 2 rather than guess which one wins."""
    toml = "examples/worker/service.toml"
    child = spawn(MIKROS_TRIO, "check", toml, "--config", toml)
    assert child.wait() == EXIT_USAGE, child.report()
    assert "give the file once" in child.stderr
    _no_traceback(child.stdout, child.stderr)


@pytest.mark.parametrize("target", ["missing.toml", "empty-dir"])
def test_check_toml_target_that_is_not_there_exits_2(
    spawn: Spawn, tmp_path: Path, target: str
) -> None:
    """A missing .toml, or a directory with no service.toml (and no package), says so: exit 2."""
    (tmp_path / "empty-dir").mkdir()
    child = spawn(MIKROS_TRIO, "check", tmp_path / target)
    assert child.wait() == EXIT_USAGE, child.report()
    assert target in child.stderr
    assert "cannot import" not in child.stderr
    _no_traceback(child.stdout, child.stderr)


# The examples, each with its container's own components: the only names
# the file alone cannot know.
CHECKED_EXAMPLES = {
    "http": {"store"},
    "grpc": set(),
    "gateway": {"greeter_channel"},
    "worker": {"counter"},
    "script": set(),
}


@pytest.mark.parametrize("example", sorted(CHECKED_EXAMPLES))
def test_check_forms_list_the_same_features(spawn: Spawn, example: str) -> None:
    """With and without the container, check lists the same features and feature components."""
    folder = REPO / "examples" / example
    with_container = _check_output(spawn, folder / "main.py")
    file_alone = _check_output(spawn, "--config", folder / "service.toml")
    assert _features(file_alone) == _features(with_container)
    own = CHECKED_EXAMPLES[example]
    assert _start_order(file_alone) == [
        name for name in _start_order(with_container) if name not in own
    ]


@pytest.mark.parametrize("kind", ["worker", "http"])
def test_check_lists_every_enabled_feature(spawn: Spawn, tmp_path: Path, kind: str) -> None:
    """Every feature enabled in the file is listed by both forms, metrics included."""
    (tmp_path / "main.py").write_text(
        "from dependency_injector import providers\n"
        "from quart_trio import QuartTrio\n"
        "from mikros_trio import ServiceContainer\n\n\n"
        "class Worker:\n"
        "    async def run(self, lifetime):\n"
        "        await lifetime.wait_stopping()\n\n\n"
        "class Container(ServiceContainer):\n"
        "    worker = providers.Factory(Worker)\n"
        "    app = providers.Singleton(QuartTrio, 'app')\n"
    )
    (tmp_path / "service.toml").write_text(
        f'name = "all"\ntypes = ["{kind}"]\nversion = "v1"\n'
        "[features.metrics]\nenabled = true\nport = 0\n"
        "[features.tracing]\nenabled = true\n"
    )
    everything = ["logger", "errors", "env", "metrics", "tracing"]
    for args in (["--config", tmp_path / "service.toml"], [tmp_path / "main.py"]):
        output = _check_output(spawn, *args, env={"OTEL_TRACES_EXPORTER": "none"})
        assert _features(output) == everything, output
        # A worker service serves metrics from a listener of its own; an
        # HTTP one through the HTTP kind, with no component of its own.
        assert ("metrics" in _start_order(output)) is (kind == "worker"), output


def test_check_file_alone_runs_the_feature_builders(spawn: Spawn) -> None:
    """Without a container, check still refuses what a feature's builder refuses, exit 2."""
    child = spawn(
        MIKROS_TRIO,
        "check",
        "examples/http/service.toml",
        env={"MIKROS_HIDE_RESPONSE_FIELDS": "bogus"},
    )
    assert child.wait() == EXIT_USAGE, child.report()
    assert "features.errors.hide_fields" in child.stderr
    _no_traceback(child.stdout, child.stderr)


def test_schema_is_json(spawn: Spawn) -> None:
    """``schema`` exits 0 and prints one JSON object."""
    child = spawn(MIKROS_TRIO, "schema")
    assert child.wait() == 0, child.report()
    schema = json.loads(child.stdout)
    assert isinstance(schema, dict)
    assert "properties" in schema


# -- usage errors -------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["check", "no_such_module_for_mikros_trio"], id="unknown-module"),
        pytest.param(["check", "no_such_module_for_mikros_trio:App"], id="unknown-module-attr"),
        pytest.param(["run", "examples/nope/main.py"], id="missing-file"),
        pytest.param(["check", "--config", "examples/nope/service.toml"], id="missing-config"),
        pytest.param(["check", "examples/worker/main.py:Nope"], id="unknown-attribute"),
        pytest.param(["check", "examples/worker/main.py:Counter"], id="not-a-container"),
        pytest.param(["check", "json"], id="module-without-container"),
        pytest.param(["check"], id="check-without-target"),
        pytest.param(["run"], id="run-without-target"),
        pytest.param([], id="no-arguments"),
        pytest.param(["frobnicate"], id="unknown-command"),
    ],
)
def test_usage_error_exits_2(spawn: Spawn, args: list[str]) -> None:
    """A wrong command line or target exits 2 with a message and no traceback."""
    child = spawn(MIKROS_TRIO, *args)
    assert child.wait() == EXIT_USAGE, child.report()
    assert child.stderr.strip(), "a usage error must say what is wrong"
    _no_traceback(child.stdout, child.stderr)


def test_target_without_container_exits_2(spawn: Spawn, tmp_path: Path) -> None:
    """A Python file with no ServiceContainer subclass is a usage error, not a crash."""
    target = tmp_path / "plain.py"
    target.write_text("VALUE = 1\n")
    child = spawn(MIKROS_TRIO, "check", target)
    assert child.wait() == EXIT_USAGE, child.report()
    assert "Container" in child.stderr
    _no_traceback(child.stdout, child.stderr)


def test_target_file_that_fails_to_import_exits_2(spawn: Spawn, tmp_path: Path) -> None:
    """A target file that raises on import is reported in one line, exit 2."""
    target = tmp_path / "broken.py"
    target.write_text('raise RuntimeError("broken at import")\n')
    child = spawn(MIKROS_TRIO, "check", target)
    assert child.wait() == EXIT_USAGE, child.report()
    assert "broken at import" in child.stderr
    _no_traceback(child.stdout, child.stderr)


@pytest.mark.parametrize("target", [":Container", ".relative", "broken_module_for_mikros_trio"])
def test_bad_module_target_exits_2(spawn: Spawn, tmp_path: Path, target: str) -> None:
    """A module target that cannot be imported, for any reason, is a usage error (exit 2)."""
    (tmp_path / "broken_module_for_mikros_trio.py").write_text('raise RuntimeError("boom")\n')
    child = spawn(MIKROS_TRIO, "check", target, env={"PYTHONPATH": str(tmp_path)})
    assert child.wait() == EXIT_USAGE, child.report()
    _no_traceback(child.stdout, child.stderr)


def test_module_target_resolves_from_working_directory(spawn: Spawn, tmp_path: Path) -> None:
    """``mikros-trio check module:Container`` finds a module in the working directory."""
    (tmp_path / "my_service_module.py").write_text(
        (REPO / "examples" / "worker" / "main.py").read_text()
    )
    config = REPO / "examples" / "worker" / "service.toml"
    child = spawn(
        MIKROS_TRIO, "check", "my_service_module:Container", "--config", config, cwd=tmp_path
    )
    assert child.wait() == 0, child.report()


def test_module_target_reads_the_service_toml_beside_its_module(
    spawn: Spawn, tmp_path: Path
) -> None:
    """``check pkg.main``: the file beside the module wins over the working directory's, as
    ``python -m pkg.main`` calling ``mikros_trio.run(Container)`` reads it."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text((REPO / "examples" / "worker" / "main.py").read_text())
    beside = (REPO / "examples" / "worker" / "service.toml").read_text()
    (package / "service.toml").write_text(beside)
    (tmp_path / "service.toml").write_text(beside.replace('name = "', 'name = "cwd-'))
    child = spawn(MIKROS_TRIO, "check", "pkg.main", cwd=tmp_path)
    assert child.wait() == 0, child.report()
    assert f"{package / 'service.toml'}: ok" in child.stdout
    (package / "service.toml").unlink()
    child = spawn(MIKROS_TRIO, "check", "pkg.main", cwd=tmp_path)
    assert child.wait() == 0, child.report()
    assert "service.toml: ok" in child.stdout
    assert "service cwd-" in child.stdout


# -- property: any document -----------------------------------------------------


def _schema_keys(node: Any) -> set[str]:
    """Every key name service.toml's JSON Schema knows, at any depth."""
    if isinstance(node, list):
        return set().union(*map(_schema_keys, node))
    if not isinstance(node, dict):
        return set()
    names = set(node.get("properties", {})) | set().union(*map(_schema_keys, node.values()))
    return {name for name in names if isinstance(name, str)}


# Real key names (so documents get past the first check) mixed with noise.
_KEYS = sorted(_schema_keys(definition_schema()))
_WORDS = ["worker", "script", "native", "http", "http:8080", "grpc:0", "v1.0.0", "info", "python"]

_key = st.one_of(st.sampled_from(_KEYS), st.text(max_size=8))
_scalar = st.one_of(
    st.sampled_from(_WORDS),
    st.text(max_size=10),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.datetimes(),
    st.dates(),
    st.times(),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_key, inner, max_size=4),
    max_leaves=12,
)
_BASE = {"name": "fuzzed", "types": ["worker"], "version": "v1.0.0"}
_tables = st.dictionaries(_key, _value, max_size=8)
# Three shapes: anything; a valid core plus anything (mostly errors deep
# in the file); a valid core plus a free-form [service] table (mostly ok).
_documents = st.one_of(
    _tables,
    _tables.map(lambda extra: {**_BASE, **extra}),
    st.dictionaries(_key, _value, max_size=4).map(lambda service: {**_BASE, "service": service}),
)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    # JSON's string escapes are TOML's, except lone surrogates, which make
    # a syntax error: also a case worth trying.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    pairs = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
    return "{" + ", ".join(pairs) + "}"


def _toml(document: dict[str, Any]) -> str:
    """``document`` as TOML: scalars and arrays first, then one ``[table]`` per dict."""
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in document.items() if type(v) is not dict
    ]
    for key, table in document.items():
        if type(table) is dict:
            lines.append(f"[{_toml_key(key)}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(document=_documents, noise=st.sampled_from(["", "[", "= 1", "\x00", "\ufeff"]))
def test_check_any_document_exits_0_or_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], document: dict[str, Any], noise: str
) -> None:
    """``check --config`` on any TOML-ish document returns 0 or 2 and never prints a traceback."""
    config = tmp_path / "service.toml"
    config.write_text(_toml(document) + noise, encoding="utf-8", errors="surrogatepass")
    code = cli.main(["check", "--config", str(config)])
    out, err = capsys.readouterr()
    assert code in (0, EXIT_USAGE), (code, out, err)
    _no_traceback(out, err)
    if code == EXIT_USAGE:
        assert str(config) in err


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(document=_documents)
def test_check_any_document_in_a_real_process(
    spawn: Spawn, tmp_path: Path, document: dict[str, Any]
) -> None:
    """The console script agrees with the in-process command on random documents."""
    config = tmp_path / "service.toml"
    config.write_text(_toml(document), encoding="utf-8", errors="surrogatepass")
    child = spawn(MIKROS_TRIO, "check", "--config", config)
    assert child.wait() in (0, EXIT_USAGE), child.report()
    _no_traceback(child.stdout, child.stderr)
