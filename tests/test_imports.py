"""What importing the package and starting a service import: only what the kinds and features use.

Every check runs in a fresh interpreter (a real subprocess), since this
test process has long imported everything. Heavy stacks are named by module;
a test here fails the day one of them is imported where it is not used.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import mikros_trio
import mikros_trio.ext
from helpers import PATIENCE, REPO, Spawn

#: The optional stacks: the HTTP and gRPC kinds', the metrics and tracing
#: features', and FastAPI's (which dependency-injector's wiring imports).
OPTIONAL_STACKS = (
    "anyio",
    "coredis",
    "fastapi",
    "flask",
    "grpc",
    "h11",
    "h2",
    "hypercorn",
    "opentelemetry",
    "prometheus_client",
    "psycopg",
    "purerpc",
    "quart",
    "quart_trio",
    "starlette",
    "werkzeug",
    "wsproto",
)
#: Never imported by ``import mikros_trio``: it imports no dependency at all.
NOT_AT_IMPORT = (*OPTIONAL_STACKS, "dependency_injector", "pydantic", "structlog", "trio")
#: Never imported by a worker or script service (nor the wiring module: nothing wires).
NOT_IN_WORKER_OR_SCRIPT = (*OPTIONAL_STACKS, "dependency_injector.wiring")

# Runs an example as `python main.py` does, and writes every module the
# process imported (on the way out too) to the file named in argv[2].
_RUN_EXAMPLE = """
import atexit, json, runpy, sys
main, report = sys.argv[1], sys.argv[2]
def write():
    with open(report, "w") as out:
        json.dump(sorted(sys.modules), out)
atexit.register(write)
sys.argv = [main]
runpy.run_path(main, run_name="__main__")
"""


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (a package or a dotted module) are among ``modules``."""
    found = set(modules) | {module.split(".")[0] for module in modules}
    return sorted(name for name in names if name in found)


def _python(code: str, *, cwd: Path = REPO) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=PATIENCE * 3,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_package_imports_no_dependency() -> None:
    """``import mikros_trio`` imports neither Trio, dependency-injector nor any optional stack."""
    out = _python("import json, sys, mikros_trio; print(json.dumps(sorted(sys.modules)))")
    assert _loaded(json.loads(out), NOT_AT_IMPORT) == []


def test_reading_the_definition_api_needs_no_runtime() -> None:
    """``definition_schema`` and the errors load without Trio or dependency-injector."""
    out = _python(
        """
        import json, sys, mikros_trio
        assert mikros_trio.ext.definition_schema()["type"] == "object"
        assert issubclass(mikros_trio.ConfigError, mikros_trio.ext.MikrosTrioError)
        print(json.dumps(sorted(sys.modules)))
        """
    )
    assert _loaded(json.loads(out), NOT_AT_IMPORT) == []


@pytest.mark.parametrize(
    ("example", "ready"),
    [("worker", '"event":"ticker running"'), ("script", '"event":"budget checked"')],
)
def test_worker_and_script_services_never_import_network_stacks(
    spawn: Spawn, tmp_path: Path, example: str, ready: str
) -> None:
    """A worker or script service, started for real and stopped, never imported an unused stack."""
    report = tmp_path / "modules.json"
    main = REPO / "examples" / example / "main.py"
    child = spawn(sys.executable, "-c", _RUN_EXAMPLE, main, report)
    child.wait_for(ready)
    if example == "worker":
        child.proc.terminate()
    assert child.wait() == 0, child.report()
    modules = json.loads(report.read_text())
    assert "dependency_injector.containers" in modules  # the service did build its container
    assert _loaded(modules, NOT_IN_WORKER_OR_SCRIPT) == []


_MARKERS = {
    "provide": 'Provide["name"]',
    # FastAPI's marker around dependency-injector's: the wiring module's
    # FastAPI integration must be there when it is used.
    "fastapi-depends": 'Depends(Provide["name"])',
}


def _wiring_check(tmp_path: Path, marker: str, body: str, before: str = "") -> None:
    """Run ``body`` after a handlers module with an ``@inject`` function and a container exist."""
    (tmp_path / "handlers.py").write_text(
        "from dependency_injector.wiring import Provide, inject\n"
        "from fastapi import Depends\n"
        "@inject\n"
        f"def greeting(name: str = {marker}) -> str:\n"
        '    return f"hello {name}"\n'
    )
    _python(
        f"""
        import sys
        {before}
        from mikros_trio import ServiceContainer
        wiring_before = "dependency_injector.wiring" in sys.modules
        from dependency_injector import containers, providers
        import handlers

        class Container(ServiceContainer):
            name = providers.Object("world")
        {body}
        """,
        cwd=tmp_path,
    )


def test_a_container_with_wiring_config_still_wires(tmp_path: Path) -> None:
    """``wiring_config`` auto-wires with dependency-injector's own wiring; ``@inject`` works."""
    _wiring_check(
        tmp_path,
        _MARKERS["provide"],
        """
            wiring_config = containers.WiringConfiguration(modules=["handlers"])

        assert not wiring_before  # nothing had wired: mikros_trio did not import the module
        container = Container()
        assert handlers.greeting() == "hello world"
        container.unwire()
        assert handlers.greeting() == "hello Provide['name']"  # the marker itself: unwired
        """,
    )


@pytest.mark.parametrize("marker", sorted(_MARKERS))
@pytest.mark.parametrize("imported_first", [False, True], ids=["lazy", "wiring-imported-first"])
def test_wire_and_unwire_reach_the_real_wiring(
    tmp_path: Path, marker: str, imported_first: bool
) -> None:
    """``container.wire()`` / ``unwire()`` inject and stop injecting, whoever imported wiring."""
    _wiring_check(
        tmp_path,
        _MARKERS[marker],
        f"""
        assert wiring_before is {imported_first}
        container = Container()
        container.wire(modules=[handlers])
        assert handlers.greeting() == "hello world"
        container.name.override("override")
        assert handlers.greeting() == "hello override"
        container.unwire()
        assert handlers.greeting() != "hello override"
        """,
        before="import dependency_injector.wiring" if imported_first else "",
    )


@pytest.mark.parametrize("module", [mikros_trio, mikros_trio.ext], ids=lambda m: m.__name__)
def test_lazy_exports_match_the_type_checkers_imports(module: ModuleType) -> None:
    """Each name is loaded from the module the ``TYPE_CHECKING`` imports name; dir() lists all."""
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    guarded = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    )
    static: dict[str, str] = {}
    for node in guarded.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            static[alias.name] = "." * node.level + (node.module or "")
    assert static == module._MODULE_OF
    assert set(static) == set(module.__all__)
    assert set(module.__all__) <= set(dir(module))
    for name, source_name in static.items():
        source = importlib.import_module(source_name, "mikros_trio")
        assert getattr(module, name) is getattr(source, name)


def test_unknown_names_are_attribute_errors() -> None:
    """A name the package does not export is an AttributeError (so ``hasattr`` is False)."""
    assert not hasattr(mikros_trio, "Nonexistent")
    with pytest.raises(AttributeError, match=r"has no attribute 'run_forever'$"):
        mikros_trio.run_forever  # type: ignore[attr-defined]  # noqa: B018


def test_a_name_of_the_other_tier_says_where_it_is() -> None:
    """``mikros_trio.Telemetry`` and ``mikros_trio.ext.run`` name the module that has them."""
    with pytest.raises(AttributeError, match=r"from mikros_trio\.ext import Telemetry"):
        mikros_trio.Telemetry  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AttributeError, match="from mikros_trio import run"):
        mikros_trio.ext.run  # type: ignore[attr-defined]  # noqa: B018


def test_public_modules_are_attributes_of_the_package() -> None:
    """``import mikros_trio`` then ``mikros_trio.ext`` / ``.grpc``: imported on first access."""
    out = _python(
        """
        import sys, mikros_trio
        assert "mikros_trio.ext" not in sys.modules
        assert mikros_trio.ext.Telemetry.__name__ == "Telemetry"
        assert callable(mikros_trio.grpc.client)
        print("ok")
        """
    )
    assert out.strip() == "ok"
