"""Sessions CI and developers run: tests, lint, typecheck, examples, bench, docs.

``nox -s tests`` is what .ci/run runs (the README's test command). Every
session installs the project into its own virtualenv, so a fresh machine
with only python3 needs nothing else than nox, itself in a virtualenv (a
Debian python3 refuses ``pip install`` outside one).

Sessions run on the interpreter that runs nox, whatever its version, as long
as the project's ``requires-python`` admits it; ``nox -P 3.12`` picks
another one that is installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox
from packaging.specifiers import SpecifierSet

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
# No fixed version (None: the interpreter running nox). A machine with one
# python3, Debian 12's 3.11 or a newer one, then tests on the interpreter it
# has instead of failing to find another, and CI needs no version manager.
# Listing versions would make nox skip the missing ones (or fail with
# --error-on-missing-interpreters) rather than test what is there.
PYTHON = None
REQUIRES_PYTHON = SpecifierSet(
    nox.project.load_toml(ROOT / "pyproject.toml")["project"]["requires-python"]
)


def _supported(session: nox.Session) -> None:
    """Stop with a clear message when the session's Python is older than the project admits.

    pip would refuse ``-e .`` too, but only after resolving, and the lint
    session installs no project at all.
    """
    version = session.run(
        "python", "-c", "import platform; print(platform.python_version())", silent=True
    )
    version = str(version).strip()
    if version not in REQUIRES_PYTHON:
        session.error(
            f"mikros-trio needs Python {REQUIRES_PYTHON}; this session has {version} "
            "(run nox with a newer python3, or pick one: nox -P 3.12)"
        )


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite, with branch coverage (subprocesses included)."""
    _supported(session)
    session.install("-e", ".[all,test]")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "combine", "--quiet", success_codes=[0, 1])
    session.run("coverage", "report", "--skip-covered", "--sort=cover")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    _supported(session)
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/."""
    _supported(session)
    session.install("-e", ".[all]", "mypy>=1.11", "pytest>=8")
    session.run("mypy", "--strict", "src")


@nox.session(python=PYTHON)
def examples(session: nox.Session) -> None:
    """Run every example's test: each example service is started for real."""
    _supported(session)
    session.install("-e", ".[all,test]")
    session.run(
        "pytest",
        "tests/test_examples.py",
        "tests/test_example_http.py",
        "tests/test_example_grpc.py",
        "tests/test_example_gateway.py",
        "tests/test_example_asgi.py",
        "tests/test_example_orders.py",
        *session.posargs,
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks in bench/: each prints one JSON object as its last line.

    The HTTP benchmarks load servers with wrk, installed here from Debian's
    packages when missing (best effort: without it they fall back to a
    bounded Python client and say so), and run uvicorn + Starlette as a
    reference point. The database benchmarks start their own PostgreSQL and
    Redis servers, from Debian's packages (``.ci/run`` installs them).
    """
    _supported(session)
    if shutil.which("wrk") is None:
        session.run_install(
            "sh",
            "-c",
            "apt-get update -qq && apt-get install -y -qq wrk >/dev/null",
            external=True,
            success_codes=list(range(256)),  # best effort: the benchmarks fall back without wrk
        )
    # Every feature the examples enable (the overhead targets are with all of them on).
    # http_peers runs uvicorn (h11) with the ecosystem's equivalents of our
    # features: starlette-exporter and opentelemetry-instrumentation-asgi.
    session.install(
        "-e",
        ".[http,grpc,metrics,tracing,postgres,redis]",
        "uvicorn",
        "starlette",
        "fastapi",
        "starlette-exporter",
        "opentelemetry-instrumentation-asgi",
        "grpcio>=1.60",
        # postgres.py's baseline: psycopg's own pools (asyncio, and threads).
        "psycopg-pool>=3.3,<3.4",
    )
    scripts = sorted((ROOT / "bench").glob("*.py"))
    for script in scripts:
        if not script.name.startswith("_"):
            session.run("python", str(script), *session.posargs)


@nox.session(python=PYTHON)
def codegen(session: nox.Session) -> None:
    """Regenerate the committed gRPC code with ``mikros-trio codegen``.

    Each proto folder becomes a package whose modules import each other
    relatively: ``<name>_pb2.py`` (messages), ``<name>_pb2.pyi``,
    ``<name>_grpc.py`` (purerpc servicer and stub) and ``<name>_pb2_grpc.py``
    (grpcio stubs, for interop tests). The output is committed, so run this
    after changing a .proto. Pass proto folders to limit it:
    ``nox -s codegen -- examples/grpc/proto``.
    """
    _supported(session)
    session.install("-e", ".[codegen]")
    # proto folder → the package it is generated into.
    packages = {
        "examples/grpc/proto": "examples/grpc/greeter_proto",
        "tests/protos": "tests/protos",
    }
    for folder in session.posargs or list(packages):
        out = packages.get(folder.rstrip("/"), folder)
        session.run("mikros-trio", "codegen", folder, "--out", out, "--grpcio")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site, built into site/; any warning fails it.

    The tutorial includes examples/orders' own files, and the API reference
    is read from the docstrings in src/, so a renamed section or a broken
    docstring reference stops the build. Nothing is fetched while building.
    """
    _supported(session)
    session.install("-e", ".[docs]")
    # Material prints a notice about its successor on every build; it is not a warning.
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})
