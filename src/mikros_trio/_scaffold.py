"""``mikros-trio new``: a project a team would keep, from an empty folder.

It writes ``pyproject.toml``, ``service.toml``, the package (container and
the entry of each kind), tests on the pytest plugin, a Dockerfile and the
Kubernetes manifests (both from :mod:`._deploy`, so they say what the
service does), and a README whose two commands install and run, and install
and test. For gRPC, the ``.proto`` is compiled by ``mikros-trio codegen``
at scaffold time, so the project runs without grpcio-tools.

Where mikros-trio comes from: the project depends on it by name, with the
extras its kinds and features need. ``--mikros-trio-spec`` replaces the
default ``mikros-trio>=<this version>`` (e.g. ``mikros-trio @ file:///src/mikros-trio``
for an unreleased checkout); the extras are put in after the name.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from string import Template
from typing import Any, Final

from ._codegen import CodegenError, generate
from ._definition import load_definition
from ._deploy import DeployError, Options, dockerfile, manifests, to_yaml
from ._registry import default_registry

__all__ = ["add_new", "scaffold"]

EXIT_USAGE: Final = 2
FEATURES: Final = ("metrics", "tracing")
# A Kubernetes name (the Service's) and the start of a Python identifier.
_NAME: Final = re.compile(r"[a-z][a-z0-9_-]{0,61}[a-z0-9]|[a-z]")
# `mikros-trio`, then a version specifier or ` @ url`; extras go after the name.
_SPEC: Final = re.compile(r"mikros[-_.]trio(?P<rest>\s*(?:@.+|[<>=!~].*)?)", re.IGNORECASE)


class ScaffoldError(Exception):
    """A name, kind or folder ``new`` cannot use; printed, exit 2."""


def add_new(commands: Any) -> None:
    """Add the ``new`` subcommand to the CLI's subparsers."""
    kinds = [spec.name for spec in default_registry().kinds.values()]
    new = commands.add_parser("new", help="write a new service project (refuses to overwrite)")
    new.add_argument("name", help="service name: lower case letters, digits, '-' or '_'")
    new.add_argument(
        "--kind",
        action="append",
        choices=kinds,
        dest="kinds",
        help="service kind, repeatable as types allows (default http; script stands alone)",
    )
    new.add_argument(
        "--features",
        type=_features,
        default=(),
        metavar="LIST",
        help=f"comma-separated optional features to enable: {', '.join(FEATURES)}",
    )
    new.add_argument("--dir", type=Path, help="folder to write (default ./NAME)")
    new.add_argument(
        "--mikros-trio-spec",
        default=None,
        metavar="REQ",
        help="the dependency on mikros-trio, as 'mikros-trio>=0.1' or "
        "'mikros-trio @ file:///path/to/checkout' (default mikros-trio>=this version)",
    )
    new.set_defaults(handler=_handle)


def _features(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in FEATURES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown feature {unknown[0]!r}; expected some of {', '.join(FEATURES)}"
        )
    return names


def _handle(args: argparse.Namespace) -> int:
    folder = args.dir if args.dir is not None else Path(args.name)
    try:
        written = scaffold(
            folder, args.name, args.kinds or ["http"], args.features, args.mikros_trio_spec
        )
    except ScaffoldError as error:
        print(f"mikros-trio new: {error}", file=sys.stderr)
        return EXIT_USAGE
    for path in written:
        print(path)
    print(f"next: cd {folder} and follow README.md", file=sys.stderr)
    return 0


def default_spec() -> str:
    """``mikros-trio>=`` the version running this command."""
    try:
        return f"mikros-trio>={version('mikros-trio')}"
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "mikros-trio"


def requirement(spec: str, extras: list[str]) -> str:
    """``spec`` with ``extras`` after the distribution's name."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        raise ScaffoldError(
            f"--mikros-trio-spec {spec!r}: expected 'mikros-trio' followed by a version "
            "specifier or ' @ URL' (e.g. 'mikros-trio @ file:///path/to/checkout')"
        )
    name = f"mikros-trio[{','.join(extras)}]" if extras else "mikros-trio"
    return name + match["rest"]


def scaffold(
    folder: Path,
    name: str,
    kinds: list[str],
    features: tuple[str, ...] = (),
    spec: str | None = None,
) -> list[Path]:
    """Write the project for service ``name`` into ``folder``; return the files written.

    Raises :class:`ScaffoldError` (nothing written) when the name, the kinds
    or the spec are unusable, or when any file it would write exists.
    """
    if not _NAME.fullmatch(name) or "--" in name or "__" in name:
        raise ScaffoldError(
            f"name {name!r}: expected a lower-case letter, then letters, digits, single '-' "
            "or '_' (63 at most, not ending in '-' or '_'): it names the package and the "
            "Kubernetes objects"
        )
    kinds = list(dict.fromkeys(kinds))
    if "script" in kinds and len(kinds) > 1:
        raise ScaffoldError(f"--kind {' --kind '.join(kinds)}: a script stands alone")
    package = name.replace("-", "_")
    registry = default_registry().kinds
    extras = [extra for kind in kinds if (extra := registry[kind].extra)]
    extras += features
    spec = spec or default_spec()
    dependencies = (requirement(spec, extras), requirement(spec, ["pytest"]))
    files = _files(name, package, kinds, features, dependencies)
    if folder.exists() and not folder.is_dir():
        raise ScaffoldError(f"refusing to overwrite: {folder} exists and is not a folder")
    # What codegen and deploy write too, though their names are known only then.
    paths = [*files, "Dockerfile", "k8s", f"src/{package}/proto"]
    existing = sorted(str(folder / path) for path in paths if (folder / path).exists())
    if existing:
        raise ScaffoldError(f"refusing to overwrite: {', '.join(existing)} already exist")
    written: list[Path] = []
    for relative, text in files.items():
        path = folder / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as error:
            raise ScaffoldError(f"{path}: {error.strerror or error}") from None
        written.append(path)
    if "grpc" in kinds:
        try:
            written += generate(folder / "src" / package / "proto")
        except CodegenError as error:
            raise ScaffoldError(
                f"{error} (the project is written but its gRPC code is not)"
            ) from None
    definition = load_definition(folder / "service.toml", environ={})
    written.append(folder / "Dockerfile")
    (folder / "Dockerfile").write_text(dockerfile(definition, f"{package}.main:Container"))
    if "script" not in kinds:  # a script is a Kubernetes Job, which deploy does not write
        try:
            documents, _ = manifests(definition, Options())
        except DeployError as error:
            raise ScaffoldError(str(error)) from None
        (folder / "k8s").mkdir(exist_ok=True)
        for document in documents:
            path = folder / "k8s" / f"{document['kind'].lower()}.yaml"
            path.write_text(to_yaml(document))
            written.append(path)
    return written


# -- the files ----------------------------------------------------------------------


def _files(
    name: str,
    package: str,
    kinds: list[str],
    features: tuple[str, ...],
    dependencies: tuple[str, str],
) -> dict[str, str]:
    registry = default_registry().kinds
    types = ", ".join(
        f'"{kind}:{registry[kind].default_port}"' if registry[kind].default_port else f'"{kind}"'
        for kind in kinds
    )
    values = {
        "name": name,
        "package": package,
        "types": types,
        "dependency": dependencies[0],
        "test_dependency": dependencies[1],
        # hatchling refuses a `name @ url` dependency unless told it is meant.
        "direct": (
            "\n[tool.hatch.metadata]\nallow-direct-references = true\n"
            if "@" in dependencies[0]
            else ""
        ),
        "kinds": " and ".join(kinds),
    }
    toml = SERVICE_TOML + "".join(FEATURE_TOML[feature] for feature in features)
    if "worker" in kinds:
        toml += "\n[service]\ninterval = 1.0   # seconds between the worker's rounds\n"
    main = _main_py(kinds)
    tests = TESTS_HEAD + "".join(TESTS[kind] for kind in kinds).rstrip("\n") + "\n"
    files = {
        "pyproject.toml": PYPROJECT,
        "service.toml": toml,
        "README.md": README,
        ".gitignore": ".venv/\n__pycache__/\n*.egg-info/\n",
        f"src/{package}/__init__.py": '"""The $name service."""\n',
        f"src/{package}/main.py": main,
        "tests/test_service.py": tests,
    }
    if "grpc" in kinds:
        files[f"src/{package}/proto/{package}.proto"] = PROTO
    return {path: Template(text).substitute(values) for path, text in files.items()}


def _main_py(kinds: list[str]) -> str:
    """``main.py``: only the imports and classes its kinds use, so it reads as written by hand."""
    loop = "worker" in kinds
    once = loop or "script" in kinds
    imports = [
        *(["import logging"] if once else []),
        *(["from dataclasses import dataclass"] if loop else []),
        "",
        *(["import trio"] if once else []),
        "from dependency_injector import providers",
        f"from mikros_trio import {'Lifetime, ' if loop else ''}ServiceContainer",
        *(["from quart_trio import QuartTrio"] if "http" in kinds else []),
        # Generated by `mikros-trio codegen src/<package>/proto`, again after editing the .proto.
        *(["", "from .proto import ${package}_grpc, ${package}_pb2"] if "grpc" in kinds else []),
    ]
    container = MAIN_CONTAINER + ("    service_model = Settings\n\n" if loop else "")
    container += "    greeter = providers.Singleton(Greeter)\n"
    return "".join(
        (
            MAIN_DOC,
            "\n".join(imports).lstrip("\n") + "\n",
            LOGGER if once else "",
            SETTINGS if loop else "",
            GREETER,
            *(MAIN_PARTS[kind] for kind in kinds),
            container,
            *(CONTAINER_LINES[kind] for kind in kinds),
        )
    )


PYPROJECT: Final = """\
[build-system]
requires = ["hatchling>=1.25"]
build-backend = "hatchling.build"

[project]
name = "$name"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["$dependency"]

[project.optional-dependencies]
# pytest, pytest-trio and httpx; the mikros_service fixture comes with mikros-trio.
test = ["$test_dependency"]

[tool.hatch.build.targets.wheel]
packages = ["src/$package"]
$direct
[tool.pytest.ini_options]
addopts = ["-ra", "--strict-markers", "--strict-config"]
testpaths = ["tests"]
xfail_strict = true
filterwarnings = ["error"]
"""

SERVICE_TOML: Final = """\
# `mikros-trio schema` prints every key; MIKROS_<KIND>_PORT overrides a port.
name = "$name"
types = [$types]
version = "v0.1.0"

[log]
level = "info"

[lifecycle]
drain_timeout = 5.0      # requests and rounds in flight get this long on shutdown
shutdown_timeout = 10.0  # the whole shutdown, hooks included
# Behind a load balancer, a few seconds here let it stop routing to a pod
# being removed before the pod stops accepting.
readiness_delay = 0.0
"""

FEATURE_TOML: Final = {
    "metrics": "\n[features.metrics]\nenabled = true   # Prometheus at /metrics\n",
    "tracing": "\n[features.tracing]\nenabled = true\n"
    'exporter = "console"   # "otlp" with a collector\n',
}

README: Final = """\
# $name

A service of kinds $kinds, on mikros-trio.

Run it, and test it (each command sets up `.venv` first):

```sh
python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/mikros-trio run $package.main
python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest
```

`service.toml` configures it; `src/$package/main.py` is the code. For
Kubernetes, build the `Dockerfile` in this folder and apply `k8s/`. Both
come from `service.toml`; after changing it, write them again with
`mikros-trio deploy dockerfile $package.main:Container --out .` and
`mikros-trio deploy k8s --out k8s`.
"""

PROTO: Final = """\
syntax = "proto3";

package $package;

service Greeter {
  rpc SayHello (HelloRequest) returns (HelloReply);
}

message HelloRequest {
  string name = 1;
}

message HelloReply {
  string message = 1;
}
"""

MAIN_DOC: Final = '''\
"""The $name service: its container, and what each kind runs.

Started by ``mikros-trio run $package.main`` from the folder of service.toml.
"""

from __future__ import annotations

'''

LOGGER: Final = "\nlog = logging.getLogger(__name__)\n"

SETTINGS: Final = '''

@dataclass(frozen=True)
class Settings:
    """The ``[service]`` table of service.toml, validated at start-up."""

    interval: float = 1.0
'''

GREETER: Final = '''

class Greeter:
    """The service's own logic; tests replace it through the container."""

    def greet(self, name: str) -> str:
        return f"Hello, {name}!"

'''

MAIN_PARTS: Final = {
    "http": '''
def create_app(greeter: Greeter) -> QuartTrio:
    """The HTTP API; probes, metrics and JSON errors come from the framework."""
    app = QuartTrio(__name__)

    @app.get("/hello/<name>")
    async def hello(name: str) -> dict[str, str]:
        return {"message": greeter.greet(name)}

    return app

''',
    "grpc": '''
class GreeterServicer(${package}_grpc.GreeterServicer):
    """The gRPC servicer; its base class is generated from proto/$package.proto."""

    def __init__(self, greeter: Greeter) -> None:
        self.greeter = greeter

    async def SayHello(self, message: ${package}_pb2.HelloRequest) -> ${package}_pb2.HelloReply:
        return ${package}_pb2.HelloReply(message=self.greeter.greet(message.name))

''',
    "worker": '''
class Worker:
    """A loop until shutdown; a round in flight finishes before the service stops."""

    def __init__(self, greeter: Greeter, settings: Settings) -> None:
        self.greeter = greeter
        self.settings = settings
        self.rounds = 0

    async def run(self, lifetime: Lifetime) -> None:
        while not lifetime.stopping:
            log.info("worker: %s", self.greeter.greet("worker"))
            self.rounds += 1
            with trio.move_on_after(self.settings.interval):
                await lifetime.wait_stopping()

''',
    "script": '''
class Job:
    """Runs once; the int it returns is the process's exit code."""

    def __init__(self, greeter: Greeter) -> None:
        self.greeter = greeter

    async def run(self) -> int:
        await trio.lowlevel.checkpoint()
        log.info("job: %s", self.greeter.greet("script"))
        return 0

''',
}

MAIN_CONTAINER: Final = """
class Container(ServiceContainer):
"""

CONTAINER_LINES: Final = {
    "http": "    app = providers.Singleton(create_app, greeter=greeter)\n",
    "grpc": "    servicer = providers.Singleton(GreeterServicer, greeter=greeter)\n",
    "worker": "    worker = providers.Singleton(\n"
    "        Worker, greeter=greeter, settings=ServiceContainer.settings\n"
    "    )\n",
    "script": "    script = providers.Factory(Job, greeter=greeter)\n",
}


TESTS_HEAD: Final = '''\
"""The service, started in-process with its real lifecycle on free ports."""

from __future__ import annotations

from pathlib import Path

import trio

from $package.main import Container

CONFIG = Path(__file__).parents[1] / "service.toml"
BOUND = 10  # seconds any wait may take


class FakeGreeter:
    def greet(self, name: str) -> str:
        return f"fake {name}"


FAKE = FakeGreeter()

'''

TESTS: Final = {
    "http": '''
async def test_hello_answers_json(mikros_service):
    """GET /hello/<name> answers the greeting as JSON; the probes answer too."""
    running = await mikros_service.start(Container, CONFIG)
    with trio.fail_after(BOUND):
        async with running.http_client() as client:
            response = await client.get("/hello/ada")
            ready = await client.get("/readyz")
    assert response.json() == {"message": "Hello, ada!"}
    assert ready.status_code == 200


async def test_hello_uses_the_greeter_provider(mikros_service):
    """Overriding the greeter provider changes what the route says."""
    running = await mikros_service.start(Container, CONFIG, overrides={"greeter": FAKE})
    with trio.fail_after(BOUND):
        async with running.http_client() as client:
            response = await client.get("/hello/ada")
    assert response.json() == {"message": "fake ada"}

''',
    "grpc": '''
async def test_say_hello_over_grpc(mikros_service):
    """SayHello answers through a real channel; an overridden greeter is used."""
    from $package.proto import ${package}_grpc, ${package}_pb2

    running = await mikros_service.start(Container, CONFIG, overrides={"greeter": FAKE})
    with trio.fail_after(BOUND):
        async with running.grpc_channel() as channel:
            stub = ${package}_grpc.GreeterStub(channel)
            reply = await stub.SayHello(${package}_pb2.HelloRequest(name="ada"))
    assert reply.message == "fake ada"

''',
    "worker": '''
async def test_worker_runs_rounds_until_stopped(mikros_service):
    """The worker runs a round at start, then stops cleanly (exit 0)."""
    running = await mikros_service.start(Container, CONFIG)
    worker = running.container.worker()
    with trio.fail_after(BOUND):
        while worker.rounds == 0:
            await trio.sleep(0.01)
        assert await running.stop() == 0

''',
    "script": '''
async def test_script_exits_0(mikros_service):
    """The script runs once with the overridden greeter and exits 0."""
    running = await mikros_service.start(Container, CONFIG, overrides={"greeter": FAKE})
    with trio.fail_after(BOUND):
        assert await running.wait() == 0

''',
}
