"""Running the examples and the CLI as real processes: bounded waits, no leaked pipes."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import pytest

if TYPE_CHECKING:  # grpcio is imported by the gRPC helpers only, when used
    import grpc

    from mikros_trio import Component, Telemetry

REPO = Path(__file__).parents[1]

#: Nothing a test waits for may take longer than this; a hung child fails the test.
PATIENCE = 10.0


class Child:
    """A process (run from the repository root by default), its output read by two threads.

    Reading in threads keeps the pipes from filling and lets a test wait for
    a line with a deadline instead of sleeping. ``stdout`` and ``stderr``
    hold everything read so far; after :meth:`wait` they are complete.
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: Path = REPO) -> None:
        self.args = list(args)
        self.proc = subprocess.Popen(
            self.args,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._text = {"stdout": "", "stderr": ""}
        self._ended: set[str] = set()  # streams read to the end
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(name,), daemon=True)
            for name in ("stdout", "stderr")
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str) -> None:
        stream = getattr(self.proc, name)
        for line in stream:
            with self._changed:
                self._text[name] += line
                self._changed.notify_all()
        with self._changed:
            self._ended.add(name)
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        with self._changed:
            return self._text["stdout"]

    @property
    def stderr(self) -> str:
        with self._changed:
            return self._text["stderr"]

    def wait_for(self, text: str, *, stream: str = "stdout", timeout: float = PATIENCE) -> None:
        """Return once ``text`` appears in ``stream``; fail if it does not in time."""
        with self._changed:
            self._changed.wait_for(
                lambda: text in self._text[stream] or stream in self._ended, timeout
            )
            if text in self._text[stream]:
                return
        self.close()
        pytest.fail(f"{text!r} never appeared on {stream} of {self.args}:\n{self.report()}")

    def send(self, signum: signal.Signals) -> float:
        """Send ``signum``; return the ``perf_counter`` time it was sent."""
        sent = time.perf_counter()
        self.proc.send_signal(signum)
        return sent

    def wait(self, timeout: float = PATIENCE) -> int:
        """The exit code, once the process has exited and its output is all read."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"{self.args} did not exit within {timeout} s:\n{self.report()}")
        for reader in self._readers:
            reader.join(PATIENCE)
        return code

    def report(self) -> str:
        return f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"

    def close(self) -> None:
        """Kill the process if it still runs, and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(PATIENCE)
        for reader in self._readers:
            reader.join(PATIENCE)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Spawn(Protocol):
    """The ``spawn`` fixture: ``spawn(program, *args, env={...})`` starts a :class:`Child`."""

    def __call__(
        self,
        *args: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        cwd: Path = REPO,
    ) -> Child: ...


#: How to run the command line: the console script the package installs.
MIKROS_TRIO = str(Path(sys.executable).with_name("mikros-trio"))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bound to port 0, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until_ok(
    child: Child, port: int, path: str = "/readyz", timeout: float = PATIENCE
) -> None:
    """Poll ``GET path`` on 127.0.0.1:``port`` until it answers 200 (never a blind sleep).

    Fails the test, with the child's output, if that takes longer than
    ``timeout`` or the child exits first.
    """
    deadline = time.monotonic() + timeout
    while child.proc.poll() is None and time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass  # not listening yet
        finally:
            connection.close()
        time.sleep(0.02)
    child.close()
    pytest.fail(f"GET {path} on port {port} never answered 200:\n{child.report()}")


# -- gRPC: grpcio channels, health polling, importing an example's modules -----------

#: grpcio channel options: never route 127.0.0.1 through a proxy from the environment.
GRPC_OPTIONS = (("grpc.enable_http_proxy", 0),)

#: Options for a channel with a connection of its own: by default grpcio shares
#: one connection among all channels with the same target and options.
OWN_CONNECTION = (*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1))


@contextmanager
def grpc_channel(port: int) -> Iterator[grpc.Channel]:
    """A grpcio channel to 127.0.0.1:``port``, closed on exit (an unclosed one warns)."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        yield channel


def grpc_health(port: int, service: str = "", timeout: float = 1.0) -> int | None:
    """One ``grpc.health.v1`` Check on a fresh channel: the status, or None if it failed."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc_channel(port) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
    return int(reply.status)


def wait_until_serving(child: Child, port: int, timeout: float = PATIENCE) -> None:
    """Poll health Check("") on 127.0.0.1:``port`` until SERVING (never a blind sleep).

    Fails the test, with the child's output, if that takes longer than
    ``timeout`` or the child exits first.
    """
    from grpc_health.v1 import health_pb2

    deadline = time.monotonic() + timeout
    while child.proc.poll() is None and time.monotonic() < deadline:
        if grpc_health(port) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.02)
    child.close()
    pytest.fail(f"health Check on port {port} never answered SERVING:\n{child.report()}")


def import_example(path: Path, name: str) -> ModuleType:
    """Import ``path`` (an example's module) as ``name``, its folder on ``sys.path``.

    The folder stays on ``sys.path`` (as the gateway example itself does),
    so the example's own imports (``greeter_pb2``…) resolve. A ``main.py``
    needs a ``name`` no other example's module takes; the module is in
    ``sys.modules`` while it runs (dataclasses look it up).
    """
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def build_feature(
    name: str, toml: str, environ: Mapping[str, str] | None = None
) -> tuple[Telemetry, list[Component]]:
    """Build feature ``name`` of the service ``toml`` describes, as the container layer does.

    Returns the service's fresh telemetry hub (where the feature registered
    its observers and objects) and the feature's components, not started.
    """
    from mikros_trio import BuildContext, ServiceContainer, Telemetry, default_registry
    from mikros_trio._container import _load_factory
    from mikros_trio._definition import parse_definition

    definition = parse_definition(toml, environ=dict(environ or {}))
    telemetry = Telemetry(definition.name, definition.version)
    settings = definition.features[name].settings
    context = BuildContext(name, settings, definition, ServiceContainer(), telemetry)
    factory = _load_factory(default_registry().features[name].factory)
    return telemetry, list(factory(context))


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def first_error(output: str) -> str:
    """The ``event`` of the first error-level JSON log line in ``output`` ('' if none)."""
    for line in output.splitlines():
        if line.startswith("{") and '"level":"error"' in line:
            event: str = json.loads(line)["event"]
            return event
    return ""
