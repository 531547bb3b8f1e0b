"""``mikros-trio codegen``: a real project's protos compiled, imported as a package, called.

The command runs as users run it (the console script, in a temp project);
the result is imported by a fresh interpreter as part of the project's
package (``python -m acme.check`` from ``src/``, nothing added to
``sys.path``) and serves a real call: a purerpc server built on the
generated servicer, called through the generated purerpc stub and through
the generated grpcio stub.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from helpers import MIKROS_TRIO, Spawn, free_port

EXIT_USAGE = 2

TYPES_PROTO = """\
syntax = "proto3";
package acme.common;
message Name { string value = 1; }
"""

USERS_PROTO = """\
syntax = "proto3";
package acme.users;
import "common/types.proto";
import "google/protobuf/timestamp.proto";
message GreetRequest { acme.common.Name name = 1; }
message GreetReply { string text = 1; google.protobuf.Timestamp at = 2; }
service Users { rpc Greet (GreetRequest) returns (GreetReply); }
"""

# A module of the user's package: serves the generated servicer with purerpc,
# calls it through both generated stubs, prints both replies.
CHECK = """\
import sys

import anyio
import grpc
import purerpc

from acme.proto import users_grpc, users_pb2, users_pb2_grpc
from acme.proto.common import types_pb2

PORT = int(sys.argv[1])


class Users(users_grpc.UsersServicer):
    async def Greet(self, message):
        return users_pb2.GreetReply(text="hello " + message.name.value)


def grpcio_call():
    with grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        stub = users_pb2_grpc.UsersStub(channel)
        request = users_pb2.GreetRequest(name=types_pb2.Name(value="grace"))
        return stub.Greet(request, timeout=5).text


async def main():
    server = purerpc.Server(PORT)
    server.add_service(Users().service)
    async with anyio.create_task_group() as tasks:
        await tasks.start(server.serve_async)
        with anyio.fail_after(10):
            async with purerpc.insecure_channel("127.0.0.1", PORT) as channel:
                stub = users_grpc.UsersStub(channel)
                request = users_pb2.GreetRequest(name=types_pb2.Name(value="ada"))
                print("purerpc:", (await stub.Greet(request)).text)
            print("grpcio:", await anyio.to_thread.run_sync(grpcio_call))
        tasks.cancel_scope.cancel()


anyio.run(main, backend="trio")
"""


def _project(root: Path) -> Path:
    """A project with ``src/acme/`` and its protos in ``src/acme/proto/``; returns ``src``."""
    proto = root / "src" / "acme" / "proto"
    (proto / "common").mkdir(parents=True)
    (proto / "common" / "types.proto").write_text(TYPES_PROTO)
    (proto / "users.proto").write_text(USERS_PROTO)
    (root / "src" / "acme" / "__init__.py").write_text('"""The acme service."""\n')
    (root / "src" / "acme" / "check.py").write_text(CHECK)
    return root / "src"


def _no_traceback(child_stderr: str) -> None:
    assert "Traceback" not in child_stderr, child_stderr


def test_generated_package_imports_and_serves_a_real_call(spawn: Spawn, tmp_path: Path) -> None:
    """Generated modules import each other relatively: ``python -m acme.check`` needs no hack."""
    src = _project(tmp_path)
    child = spawn(MIKROS_TRIO, "codegen", "src/acme/proto", "--grpcio", cwd=tmp_path)
    assert child.wait() == 0, child.report()
    proto = src / "acme" / "proto"
    for name in ("users_pb2.py", "users_pb2.pyi", "users_grpc.py", "users_pb2_grpc.py"):
        assert (proto / name).is_file(), name
    assert (proto / "__init__.py").is_file()
    assert (proto / "common" / "__init__.py").is_file()
    assert "from . import users_pb2 as" in (proto / "users_grpc.py").read_text()
    assert "from .common import types_pb2 as" in (proto / "users_pb2.py").read_text()
    # PYTHONPATH unset: only the working directory (``src``) is searched, as for any package.
    run = spawn(
        sys.executable, "-m", "acme.check", str(free_port()), cwd=src, env={"PYTHONPATH": None}
    )
    assert run.wait() == 0, run.report()
    assert run.stdout.splitlines() == ["purerpc: hello ada", "grpcio: hello grace"], run.report()


def test_rerun_is_stable_and_keeps_the_users_init(spawn: Spawn, tmp_path: Path) -> None:
    """A second run writes the same bytes, and an existing ``__init__.py`` is never overwritten."""
    src = _project(tmp_path)
    proto = src / "acme" / "proto"
    (proto / "__init__.py").write_text('"""Mine."""\n')
    first = spawn(MIKROS_TRIO, "codegen", proto, "--out", src / "acme" / "api", cwd=tmp_path)
    assert first.wait() == 0, first.report()
    out = src / "acme" / "api"
    before = {path: path.read_bytes() for path in out.rglob("*.py*")}
    second = spawn(MIKROS_TRIO, "codegen", proto, "--out", out, cwd=tmp_path)
    assert second.wait() == 0, second.report()
    assert {path: path.read_bytes() for path in out.rglob("*.py*")} == before
    assert (proto / "__init__.py").read_text() == '"""Mine."""\n'
    assert not (out / "users_pb2_grpc.py").exists(), "grpcio stubs only with --grpcio"


def test_no_proto_exits_2(spawn: Spawn, tmp_path: Path) -> None:
    """An empty folder, or a folder that is not there, is a usage error naming the folder."""
    (tmp_path / "empty").mkdir()
    empty = spawn(MIKROS_TRIO, "codegen", "empty", cwd=tmp_path)
    assert empty.wait() == EXIT_USAGE, empty.report()
    assert "empty: no .proto file found" in empty.stderr
    _no_traceback(empty.stderr)
    missing = spawn(MIKROS_TRIO, "codegen", cwd=tmp_path)  # default PROTO_DIR: proto
    assert missing.wait() == EXIT_USAGE, missing.report()
    assert "proto: not a folder" in missing.stderr
    _no_traceback(missing.stderr)


def test_protoc_error_exits_2_with_protocs_message(spawn: Spawn, tmp_path: Path) -> None:
    """A broken .proto: protoc's own message (file, line, what) is shown, exit 2."""
    proto = tmp_path / "proto"
    proto.mkdir()
    (proto / "bad.proto").write_text('syntax = "proto3";\nmessage Broken { string = 1; }\n')
    child = spawn(MIKROS_TRIO, "codegen", cwd=tmp_path)
    assert child.wait() == EXIT_USAGE, child.report()
    assert "protoc failed" in child.stderr
    assert "bad.proto:2:" in child.stderr, child.report()
    _no_traceback(child.stderr)
    assert not list(proto.glob("*.py")), "nothing is written when protoc refuses"


def test_missing_grpcio_tools_names_the_extra(spawn: Spawn, tmp_path: Path) -> None:
    """Without grpcio-tools the command says which extra to install, exit 2.

    grpcio-tools is installed here, so a ``grpc_tools`` package that fails
    to import the way an absent one does stands first on the path.
    """
    absent = tmp_path / "absent" / "grpc_tools"
    absent.mkdir(parents=True)
    (absent / "__init__.py").write_text(
        textwrap.dedent(
            """\
            raise ModuleNotFoundError("No module named 'grpc_tools'", name="grpc_tools")
            """
        )
    )
    (tmp_path / "proto").mkdir()
    (tmp_path / "proto" / "x.proto").write_text('syntax = "proto3";\nmessage X {}\n')
    child = spawn(
        MIKROS_TRIO, "codegen", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "absent")}
    )
    assert child.wait() == EXIT_USAGE, child.report()
    assert "grpcio-tools is not installed" in child.stderr
    assert "mikros-trio[codegen]" in child.stderr
    _no_traceback(child.stderr)
