"""``mikros-trio``: run, check and describe services.

Exit codes: 0 ok; 1 the service failed at run time; 2 a configuration or
usage error (printed without a Python traceback); 124 when the watchdog
ended a process stuck past start_timeout or shutdown_timeout; 128 + N when
signal N forced the exit or cut a script short.

    mikros-trio run examples/worker/main.py            # Container, service.toml beside it
    mikros-trio run myservice.app:Container --config service.toml --verbose
    mikros-trio run --reload examples/worker/main.py   # restart on .py/.toml edits
    mikros-trio check examples/worker/main.py          # validate, print the start order
    mikros-trio check service.toml                     # the file alone, no container
    mikros-trio schema > service.schema.json
    mikros-trio new orders --kind http --kind worker   # a new project
    mikros-trio codegen src/orders/proto               # gRPC code from .proto files
    mikros-trio deploy k8s main.py --image IMAGE       # Kubernetes manifests
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from ._codegen import add_codegen
from ._component import Component, Role
from ._container import BuildContext, ServiceContainer, build_components, container_class
from ._definition import Definition, definition_schema, load_definition
from ._deploy import add_deploy
from ._graph import NodeSpec, plan
from ._registry import default_registry
from ._scaffold import add_new
from ._service import (
    Service,
    find_config,
    report_config_error,
    run_process,
    validate_with_envs,
)
from .errors import ConfigError

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line or the target; printed, exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mikros-trio`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
    except ConfigError as error:
        report_config_error(error)
        return EXIT_USAGE
    except UsageError as error:
        print(f"mikros-trio: {error}", file=sys.stderr)
        return EXIT_USAGE
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mikros-trio", description="Run, check and describe mikros_trio services."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="start a service and run it until it stops")
    run.add_argument("target", help="container: path/to/main.py[:Container] or module[:Container]")
    run.add_argument("--config", type=Path, help="service.toml (default: beside the target)")
    run.add_argument("--verbose", "-v", action="store_true", help="print lifecycle events")
    run.add_argument(
        "--workers",
        type=_workers_count,
        metavar="N",
        help="processes serving the service (0: one per CPU); overrides [lifecycle] workers",
    )
    run.add_argument(
        "--reload",
        action="store_true",
        help="restart on changes to .py/.toml files beside the target (needs mikros-trio[dev])",
    )
    run.set_defaults(handler=_run)

    check = commands.add_parser(
        "check", help="validate config, environment and graph; print the start order"
    )
    check.add_argument(
        "target",
        nargs="?",
        help="container, as for run; or a service.toml, or a directory holding one, checked alone",
    )
    check.add_argument("--config", type=Path, help="service.toml (default: beside the target)")
    check.set_defaults(handler=_check)

    schema = commands.add_parser("schema", help="print the JSON Schema of service.toml")
    schema.set_defaults(handler=_schema)
    add_codegen(commands)
    add_deploy(commands)
    add_new(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.reload:
        from ._reload import run_reloading  # watchfiles only with the flag

        return run_reloading(args)
    container, config = _resolve(args.target, args.config)
    # run() owns the process from here: signals, logging, and the exit
    # code, which it raises as SystemExit exactly as `python main.py` would.
    # --verbose turns the event log on; without it MIKROS_TRIO_VERBOSE still decides.
    trio.run(
        functools.partial(
            run_process,
            container,
            config,
            verbose=args.verbose or None,
            workers=args.workers,
            target=args.target,
        )
    )
    raise AssertionError("mikros_trio.run() returned")  # it always raises SystemExit


def _workers_count(text: str) -> int:
    from ._workers import MAX_WORKERS  # only with the flag: a parent imports it anyway

    if not (text.isascii() and text.isdigit()) or int(text) > MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"expected a number of processes 0-{MAX_WORKERS}, got {text!r}"
        )
    return int(text)


def _check(args: argparse.Namespace) -> int:
    target, config = args.target, args.config
    file = _config_target(target) if target is not None else None
    if file is not None:
        if config is not None:
            raise UsageError(
                f"{target} names a service.toml: give the file once, as TARGET or --config"
            )
        target, config = None, file
    if target is None and config is None:
        raise UsageError("check needs a target, --config, or both")
    if target is None:
        definition = load_definition(config)
        waves = validate_with_envs(definition, lambda: plan(_file_nodes(definition)).waves())
        scope = "the file alone; give a target to check the container too"
    else:
        container, config = _resolve(target, config)
        service = Service(container, config)
        definition = service.definition
        waves = service.supervisor.plan.waves()
        scope = f"with container {container_class(service.container).__name__}"
    kinds = ", ".join(t.kind for t in definition.types)
    # Every feature that runs, from the file: some serve through a kind or
    # only publish a policy (errors, env, metrics beside HTTP) and so have no
    # line in the start order.
    features = ", ".join(definition.enabled_features(default_registry()))
    print(f"{definition.source}: ok ({scope})")
    print(f"service {definition.name} {definition.version}; kinds: {kinds}")
    print(f"features: {features}")
    print("start order (components on one line start together; stop is the reverse):")
    for number, wave in enumerate(waves, start=1):
        print(f"  {number}. {', '.join(wave)}")
    return EXIT_OK


def _config_target(target: str) -> Path | None:
    """The service.toml a ``check`` target names, or ``None`` for a container target.

    A ``.toml`` path is that file, a directory holding service.toml is its
    service.toml: both are checked as ``--config`` would (a user pointing at
    the file means the file). A Python package directory without one stays a
    module target.
    """
    path = Path(target)
    if target.endswith(".toml"):
        return path
    if path.is_dir():
        if (path / "service.toml").is_file():
            return path / "service.toml"
        if not (path / "__init__.py").is_file():
            raise UsageError(
                f"directory {target} holds no service.toml (give a service.toml, "
                "a container as path/to/main.py[:Container] or module[:Container], or --config)"
            )
    return None


def _file_nodes(definition: Definition) -> list[NodeSpec]:
    """The graph service.toml alone declares: features, kinds, ``[components]``.

    The features' components are built as for a service, on a bare
    container, so both forms of ``check`` list the same ones and the file
    form catches what a feature's builder refuses. Kinds need the user's
    container to build; here each is one node, as its component would be.
    """
    registry = default_registry()
    # Kinds build nothing here (their factory needs the user's providers),
    # and [components] are nodes from the file, not the bare container's.
    registry = dataclasses.replace(
        registry,
        kinds={
            # By its import path: under `python -m mikros_trio.cli` __name__ is __main__.
            name: dataclasses.replace(spec, factory="mikros_trio.cli:_no_components")
            for name, spec in registry.kinds.items()
        },
    )
    bare = dataclasses.replace(definition, components={})
    _, nodes = build_components(ServiceContainer(), bare, registry)
    # As build_components does for the container's components: all start
    # after the last feature.
    last = [nodes[-1].name] if nodes else []
    nodes += [NodeSpec(t.kind, Role.GENERATING, last, path="types") for t in definition.types]
    nodes += [
        NodeSpec(
            name,
            Role.PROCESSING,
            (*last, *settings.depends_on),
            settings.enhanced_by,
            definition.source,
            f"components.{name}",
        )
        for name, settings in definition.components.items()
    ]
    return nodes


def _no_components(context: BuildContext) -> list[Component]:
    """A kind's builder for ``check --config``: the kind is a node of its own (see above)."""
    return []


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(definition_schema(), indent=2))
    return EXIT_OK


def _resolve(target: str, config: Path | None) -> tuple[type[ServiceContainer], Path]:
    """Import ``target`` and find its container class and its service.toml."""
    spec, _, attribute = target.partition(":")
    attribute = attribute or "Container"
    path = Path(spec)
    if spec.endswith(".toml"):  # check takes these as the file alone; run needs a container
        raise UsageError(
            f"{spec} is a service.toml; run needs the container "
            f"(path/to/main.py[:Container] or module[:Container]) and takes it as --config {spec}"
        )
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise UsageError(f"target file {spec} does not exist")
        module = _import_file(path)
        default_config: Path | None = path.parent / "service.toml"
    else:
        if not spec or spec.startswith("."):
            raise UsageError(f"target {target!r} needs a module name or a .py file")
        # As `python -m` does: modules resolve from the working directory,
        # not from wherever the console script lives.
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(spec)
        except Exception as error:  # any failure in the user's import is a usage error
            raise UsageError(f"cannot import {spec!r}: {type(error).__name__}: {error}") from None
        default_config = None  # as mikros_trio.run finds it: beside the module, else here
    container = getattr(module, attribute, None)
    if not (isinstance(container, type) and issubclass(container, ServiceContainer)):
        raise UsageError(
            f"{spec} has no ServiceContainer subclass named {attribute!r} "
            "(name it with TARGET:Name)"
        )
    if config is not None:
        return container, config
    return container, default_config if default_config is not None else find_config(container)


def _import_file(path: Path) -> Any:
    # Import under a private name so the file's `if __name__ == "__main__"`
    # block (its own trio.run) does not fire.
    name = f"_mikros_trio_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise UsageError(f"importing {path} failed: {type(error).__name__}: {error}") from None
    return module


if __name__ == "__main__":
    raise SystemExit(main())
