"""``mikros-trio codegen``: protoc with purerpc's plugin, output importable as part of a package.

protoc and purerpc's plugin write absolute imports of sibling modules
(``import greeter_pb2``), which resolve only when the output folder itself
is on ``sys.path``. This command rewrites the imports of modules it has just
generated into relative ones (``from . import greeter_pb2``), so the output
folder is an ordinary package wherever it sits (``acme.proto.greeter_pb2``),
and writes the ``__init__.py`` files the folders need. Imports of modules
it did not generate (protobuf's well-known types) are left alone.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
PLUGIN = "protoc-gen-purerpc"
# What each proto file gives, by suffix; the grpcio stubs only on request.
SUFFIXES = ("_pb2", "_grpc")
GRPCIO_SUFFIX = "_pb2_grpc"

_IMPORT = re.compile(r"^import (?P<module>[\w.]+) as (?P<alias>\w+)$", re.MULTILINE)
_FROM = re.compile(
    r"^from (?P<package>[\w.]+) import (?P<name>\w+) as (?P<alias>\w+)$", re.MULTILINE
)


class CodegenError(Exception):
    """A mistake in the command line, a missing tool, or protoc's refusal; exit 2."""


def add_codegen(commands: Any) -> None:
    """Add the ``codegen`` subcommand to the CLI's subparsers."""
    codegen = commands.add_parser(
        "codegen", help="generate purerpc code from .proto files, importable as a package"
    )
    codegen.add_argument(
        "proto_dir",
        nargs="?",
        type=Path,
        default=Path("proto"),
        metavar="PROTO_DIR",
        help="folder searched recursively for .proto files (default: proto)",
    )
    codegen.add_argument(
        "--out", type=Path, help="package folder to write into (default: PROTO_DIR)"
    )
    codegen.add_argument(
        "--grpcio",
        action="store_true",
        help="also write grpcio stubs (<name>_pb2_grpc.py), e.g. for interop tests",
    )
    codegen.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    try:
        written = generate(args.proto_dir, args.out, grpcio=args.grpcio)
    except CodegenError as error:
        print(f"mikros-trio codegen: {error}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out if args.out is not None else args.proto_dir
    print(f"wrote {len(written)} files to {out}")
    return 0


def generate(proto_dir: Path, out: Path | None = None, *, grpcio: bool = False) -> list[Path]:
    """Compile every ``.proto`` under ``proto_dir`` into the package folder ``out``.

    Returns the files written. Raises :class:`CodegenError` when there is no
    ``.proto``, grpcio-tools or purerpc's plugin is missing, or protoc fails
    (its own message included).
    """
    if not proto_dir.is_dir():
        raise CodegenError(f"{proto_dir}: not a folder (expected the folder holding .proto files)")
    protos = sorted(proto_dir.rglob("*.proto"))
    if not protos:
        raise CodegenError(f"{proto_dir}: no .proto file found (searched it and its subfolders)")
    out = proto_dir if out is None else out
    _require_grpc_tools()
    plugin = _plugin()
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_dir.resolve()}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--purerpc_out={out}",
        f"--plugin={PLUGIN}={plugin}",
    ]
    if grpcio:
        command.append(f"--grpc_python_out={out}")
    command += [str(path.resolve()) for path in protos]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise CodegenError(f"protoc failed (exit {done.returncode}):\n{message}")
    suffixes = (*SUFFIXES, GRPCIO_SUFFIX) if grpcio else SUFFIXES
    stems = [path.relative_to(proto_dir).with_suffix("") for path in protos]
    generated = {
        ".".join((*stem.parent.parts, stem.name + suffix)) for stem in stems for suffix in suffixes
    }
    written: list[Path] = []
    for module in sorted(generated):
        for extension in (".py", ".pyi"):
            path = out.joinpath(*module.split(".")).with_suffix(extension)
            if path.is_file():
                path.write_text(relative_imports(path.read_text(), module, generated))
                written.append(path)
    written += _write_inits(out, {stem.parent for stem in stems}, proto_dir)
    return written


def relative_imports(source: str, module: str, generated: set[str]) -> str:
    """``source`` (of generated ``module``) with its imports of ``generated`` made relative."""
    dots = "." * module.count(".") + "."

    def split(target: str) -> tuple[str, str]:
        package, _, name = target.rpartition(".")
        return dots + package, name

    def import_as(match: re.Match[str]) -> str:
        if match["module"] not in generated:
            return match[0]
        package, name = split(match["module"])
        return f"from {package} import {name} as {match['alias']}"

    def from_as(match: re.Match[str]) -> str:
        if f"{match['package']}.{match['name']}" not in generated:
            return match[0]
        return f"from {dots}{match['package']} import {match['name']} as {match['alias']}"

    # ``from`` first: the lines ``import_as`` writes start with ``from`` too.
    return _IMPORT.sub(import_as, _FROM.sub(from_as, source))


def _write_inits(out: Path, folders: set[Path], proto_dir: Path) -> list[Path]:
    """An ``__init__.py`` in ``out`` and every subfolder holding output, where missing."""
    written = []
    packages = {Path()} | {parent for folder in folders for parent in (folder, *folder.parents)}
    for folder in sorted(packages):
        init = out / folder / "__init__.py"
        if not init.exists():
            init.write_text(f'"""Code generated by ``mikros-trio codegen`` from {proto_dir}."""\n')
            written.append(init)
    return written


def _require_grpc_tools() -> None:
    try:
        importlib.import_module("grpc_tools.protoc")
    except ModuleNotFoundError as error:
        if error.name is None or not error.name.startswith("grpc_tools"):
            raise
        raise CodegenError(
            "grpcio-tools is not installed; it is needed at codegen time only: "
            "pip install 'mikros-trio[codegen]'"
        ) from None


def _plugin() -> Path:
    """purerpc's protoc plugin: beside this interpreter's scripts, else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / PLUGIN
    if beside.is_file():
        return beside
    found = shutil.which(PLUGIN)
    if found is None:
        raise CodegenError(
            f"{PLUGIN} (purerpc's protoc plugin) not found: pip install 'mikros-trio[grpc]'"
        )
    return Path(found)
