"""The tests' shared helpers: real processes, in-process services, raw HTTP/2, leaks.

Running the examples and the CLI as real processes (bounded waits, no
leaked pipes), the echo gRPC test service, the HTTP test app and its
clients, scraping metrics, traced services, the gateway examples, secrets'
leak forms and hand-built HTTP/2. Importing this module stays cheap:
grpcio, quart, httpx, trio and the framework are imported by the helpers
that use them, when used.
"""

from __future__ import annotations

import functools
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
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest

if TYPE_CHECKING:  # grpcio, trio, the framework… are imported by the helpers using them
    import grpc
    import httpx
    import trio
    from opentelemetry.sdk.trace import ReadableSpan
    from quart_trio import QuartTrio

    from mikros_trio import Service, ServiceContainer
    from mikros_trio.ext import Component, Telemetry
    from mikros_trio.features.metrics import Metrics
    from mikros_trio.features.tracing import Tracing
    from mikros_trio.testing import RunningService, ServiceStarter

T = TypeVar("T")

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


#: A worker service with short lifecycle bounds (the container gives ``worker``).
WORKER_TOML = """
name = "svc"
types = ["worker"]
version = "1.0.0"
[lifecycle]
drain_timeout = 1.0
shutdown_timeout = 3.0
"""


def write_worker_toml(tmp_path: Path, extra: str = "") -> Path:
    """:data:`WORKER_TOML`, then ``extra`` (more tables), as ``tmp_path/service.toml``."""
    path = tmp_path / "service.toml"
    path.write_text(WORKER_TOML + extra)
    return path


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


def run_http_service(
    spawn: Spawn, program: Path, config: Path, toml: str, env: Mapping[str, str]
) -> tuple[Child, int]:
    """``mikros-trio run --verbose`` of ``program`` with ``toml`` written to ``config``, ready.

    ``toml`` gets ``[runtime.http]`` on 127.0.0.1 and a short ``[lifecycle]``
    appended; the HTTP port is a free one (``MIKROS_HTTP_PORT``, also
    returned); ``env`` adds to the environment. Returns once ``/readyz``
    answers 200.
    """
    port = free_port()
    config.write_text(
        toml + '[runtime.http]\nhost = "127.0.0.1"\n'
        "[lifecycle]\nshutdown_timeout = 5.0\ndrain_timeout = 2.0\n"
    )
    child = spawn(
        MIKROS_TRIO,
        "run",
        program,
        "--config",
        config,
        "--verbose",
        env={**env, "MIKROS_HTTP_PORT": str(port)},
    )
    wait_until_ok(child, port)
    return child, port


# -- gRPC: grpcio channels, health polling, importing an example's modules -----------

#: grpcio channel options: never route 127.0.0.1 through a proxy from the environment.
GRPC_OPTIONS = (("grpc.enable_http_proxy", 0),)

#: Options for a channel with a connection of its own: by default grpcio shares
#: one connection among all channels with the same target and options.
OWN_CONNECTION = (*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1))


@contextmanager
def grpc_channel(target: int | str) -> Iterator[grpc.Channel]:
    """A grpcio channel to 127.0.0.1:``target`` (a port) or to ``target``; closed on exit.

    An unclosed channel warns.
    """
    import grpc

    address = f"127.0.0.1:{target}" if isinstance(target, int) else target
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
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
    so the example's own imports (``greeter_proto``…) resolve. A ``main.py``
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
    from mikros_trio import ServiceContainer
    from mikros_trio._container import _load_factory
    from mikros_trio._definition import parse_definition
    from mikros_trio.ext import BuildContext, Telemetry, default_registry

    definition = parse_definition(toml, environ=dict(environ or {}))
    telemetry = Telemetry(definition.name, definition.version)
    settings = definition.features[name].settings
    context = BuildContext(name, settings, definition, ServiceContainer(), telemetry)
    factory = _load_factory(default_registry().features[name].factory)
    return telemetry, list(factory(context))


# -- in-process test services of any kind: service.toml, starting, lifecycle events --

#: No single wait in the in-process service tests may take longer than this (seconds).
BOUND = 5.0


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (JSON's forms are TOML's for these; a path is its text)."""
    return json.dumps(str(value) if isinstance(value, Path) else value)


def _table(name: str, values: Mapping[str, Any]) -> list[str]:
    return ["", f"[{name}]", *(f"{key} = {toml_value(v)}" for key, v in values.items())]


#: The short ``[lifecycle]`` timeouts of every in-process test service.
TIMEOUTS = {"start_timeout": 5.0, "drain_timeout": 3.0, "shutdown_timeout": 8.0}


def toml_text(top: Mapping[str, Any], tables: Mapping[str, Mapping[str, Any]]) -> str:
    """A TOML document: the ``top`` keys, then each table in order."""
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for table, values in tables.items():
        lines += _table(table, values)
    return "\n".join(lines) + "\n"


def _write_toml(
    tmp_path: Path,
    name: str,
    kind: str,
    runtime: Mapping[str, Any] | None,
    lifecycle: Mapping[str, Any] | None,
    clients: Mapping[str, int | tuple[str, int]] | None = None,
) -> Path:
    """``tmp_path``/service.toml for a ``kind`` service on 127.0.0.1 (see :func:`write_toml`)."""
    tables: dict[str, Mapping[str, Any]] = {
        f"runtime.{kind}": {"host": "127.0.0.1", **(runtime or {})},
        "lifecycle": {**TIMEOUTS, **(lifecycle or {})},
    }
    for client, target in (clients or {}).items():
        host, port = target if isinstance(target, tuple) else ("127.0.0.1", target)
        tables[f"clients.{client}"] = {"host": host, "port": port}
    path = tmp_path / "service.toml"
    path.write_text(toml_text({"name": name, "types": [kind], "version": "1.0.0"}, tables))
    return path


async def _start(
    mikros_service: ServiceStarter,
    write: Callable[..., Path],
    default: type[ServiceContainer],
    tmp_path: Path,
    options: dict[str, Any],
) -> RunningService:
    """Start ``container=`` (else ``default``) with ``write(tmp_path, **options)``, bounded."""
    import trio

    overrides = options.pop("overrides", None)
    container = options.pop("container", None) or default
    path = write(tmp_path, **options)
    with trio.fail_after(BOUND):
        return await mikros_service.start(container, path, overrides=overrides)


def phase_time(running: RunningService, component: str, phase: str) -> float:
    """Trio time of the first event where ``component`` reached ``phase``."""
    for event in running.events:
        if event.component == component and event.phase == phase:
            return event.time
    raise AssertionError(f"{component} never reached {phase}: {running.events}")


# -- the echo gRPC test service, in-process: its servicer, containers and grpcio calls -
#
# Its classes subclass generated code and its constants hold protobuf and grpcio
# values, so they are built on first use (module ``__getattr__``, PEP 562):
# ``from helpers import EchoServicer`` imports grpc then, ``import helpers`` never does.

#: The echo service's full name, as reflection and health list it.
ECHO = "mikros.testsvc.v1.Echo"

#: The HTTP/2 path of its Unary method.
UNARY = f"/{ECHO}/Unary"

#: What :func:`_echo_service` builds: ``EchoRequest`` and ``EchoReply`` (the messages);
#: ``SERVICE_ERRORS``, the ``EchoRequest.fail`` values that raise a ServiceError, with
#: the gRPC code each maps to under ``grpc_status = "mapped"`` (the default sends
#: UNKNOWN); ``EchoServicer`` and its ``Container`` (and ``ClientContainer``, plus a
#: channel to ``[clients.peer]``); ``GrpcioEcho``, the same echo served by grpcio.
_ECHO_NAMES = frozenset(
    {
        "EchoRequest",
        "EchoReply",
        "SERVICE_ERRORS",
        "EchoServicer",
        "Container",
        "ClientContainer",
        "GrpcioEcho",
    }
)


def __getattr__(name: str) -> Any:
    """The names built on first use: the echo service's, the HTTP test app's, the traced app's."""
    if name in _ECHO_NAMES:
        return _echo_service()[name]
    if name == "TracedContainer":
        return _traced_container()
    if name in _HTTP_NAMES:
        return _http_service()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _echo_service() -> dict[str, Any]:
    """The echo service's messages, error table and classes (see :data:`_ECHO_NAMES`)."""
    import grpc
    import trio
    from dependency_injector import providers
    from purerpc.grpclib.exceptions import AbortedError

    import mikros_trio.grpc
    from mikros_trio import (
        ConditionError,
        InternalError,
        NotFoundError,
        PermissionDeniedError,
        ServiceContainer,
        ServiceError,
        ValidationError,
    )
    from protos import testsvc_grpc, testsvc_pb2, testsvc_pb2_grpc

    EchoRequest = testsvc_pb2.EchoRequest
    EchoReply = testsvc_pb2.EchoReply

    SERVICE_ERRORS: dict[str, tuple[type[ServiceError], grpc.StatusCode]] = {
        "validation": (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
        "not-found": (NotFoundError, grpc.StatusCode.NOT_FOUND),
        "permission": (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
        "condition": (ConditionError, grpc.StatusCode.FAILED_PRECONDITION),
        "internal": (InternalError, grpc.StatusCode.INTERNAL),
    }

    class EchoServicer(testsvc_grpc.EchoServicer):  # type: ignore[misc]  # generated, untyped
        """The test servicer: echoes, and behaves as ``EchoRequest`` asks.

        ``delay`` sleeps before answering (before each item when streaming);
        ``count`` is how many items ServerStream sends; ``fail`` raises (after
        the items, when streaming): a ``SERVICE_ERRORS`` key, ``"runtime"``
        (RuntimeError), ``"status"`` (purerpc's own ABORTED status error) or
        ``"forever"`` (blocks until cancelled). ``entered`` is set when a
        handler starts sleeping; ``finished`` counts handlers that ran to their
        end; ``cancelled`` counts handlers cancelled while blocked; ``active``
        counts handlers running now, and ``idle`` is set when it drops to 0.
        """

        def __init__(self) -> None:
            self.entered = trio.Event()
            self.finished = 0
            self.cancelled = 0
            self.active = 0
            self.idle = trio.Event()

        @contextmanager
        def _running(self) -> Iterator[None]:
            self.active += 1
            self.idle = trio.Event()
            try:
                yield
            finally:
                self.active -= 1
                if self.active == 0:
                    self.idle.set()

        async def _fail(self, request: Any) -> None:
            if request.fail == "runtime":
                raise RuntimeError("the handler broke")
            if request.fail == "status":
                raise AbortedError("a status of the handler's choosing")
            if request.fail == "forever":
                self.entered.set()
                try:
                    await trio.sleep_forever()
                except trio.Cancelled:
                    self.cancelled += 1
                    raise
            if request.fail:
                cls, _ = SERVICE_ERRORS[request.fail]
                raise cls(f"raised {request.fail}", code=7)

        async def _delay(self, request: Any) -> None:
            if request.delay > 0:
                self.entered.set()
                await trio.sleep(request.delay)

        async def Unary(self, request: Any) -> Any:
            with self._running():
                await self._fail(request)
                await self._delay(request)
                self.finished += 1
                return EchoReply(text=request.text, size=len(request.payload))

        async def ServerStream(self, request: Any) -> AsyncIterator[Any]:
            # ``count`` items, ``delay`` apart; then ``fail``, if any.
            with self._running():
                for index in range(request.count):
                    await self._delay(request)
                    yield EchoReply(text=request.text, index=index)
                await self._fail(request)
                self.finished += 1

        async def ClientStream(self, requests: AsyncIterator[Any]) -> Any:
            with self._running():
                texts: list[str] = []
                size = 0
                async for request in requests:
                    await self._fail(request)
                    await self._delay(request)
                    texts.append(request.text)
                    size += len(request.payload)
                self.finished += 1
                return EchoReply(text=",".join(texts), index=len(texts), size=size)

        async def Bidi(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            with self._running():
                index = 0
                async for request in requests:
                    await self._fail(request)
                    await self._delay(request)
                    yield EchoReply(text=request.text.upper(), index=index)
                    index += 1
                self.finished += 1

    class Container(ServiceContainer):
        echo = providers.Singleton(EchoServicer)

    class ClientContainer(Container):
        """The echo service plus a channel to ``[clients.peer]``."""

        peer = mikros_trio.grpc.client("peer")

    class GrpcioEcho(testsvc_pb2_grpc.EchoServicer):  # type: ignore[misc]  # generated, untyped
        """The same echo behaviour, served by grpcio (handlers run in its thread pool)."""

        def __init__(self) -> None:
            self.entered = threading.Event()

        def Unary(self, request: Any, context: grpc.ServicerContext) -> Any:
            if request.fail:
                context.abort(grpc.StatusCode.NOT_FOUND, f"grpcio says {request.fail}")
            if request.delay > 0:
                self.entered.set()
                time.sleep(request.delay)
            return EchoReply(text=request.text, size=len(request.payload))

        def ServerStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            for index in range(request.count):
                yield EchoReply(text=request.text, index=index)

        def ClientStream(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            texts = [request.text for request in requests]
            return EchoReply(text=",".join(texts), index=len(texts))

        def Bidi(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for index, request in enumerate(requests):
                yield EchoReply(text=request.text.upper(), index=index)

    return {
        "EchoRequest": EchoRequest,
        "EchoReply": EchoReply,
        "SERVICE_ERRORS": SERVICE_ERRORS,
        "EchoServicer": EchoServicer,
        "Container": Container,
        "ClientContainer": ClientContainer,
        "GrpcioEcho": GrpcioEcho,
    }


def write_toml(
    tmp_path: Path,
    *,
    grpc: Mapping[str, Any] | None = None,
    lifecycle: Mapping[str, Any] | None = None,
    clients: Mapping[str, int | tuple[str, int]] | None = None,
) -> Path:
    """A service.toml for a grpc service on 127.0.0.1, written into ``tmp_path``.

    ``clients`` maps client names to ports on 127.0.0.1, or to (host, port).
    """
    return _write_toml(tmp_path, "echo", "grpc", grpc, lifecycle, clients)


async def start(mikros_service: ServiceStarter, tmp_path: Path, **options: Any) -> RunningService:
    """Start the echo ``Container`` (or ``container=``) with a service.toml from ``options``."""
    container = _echo_service()["Container"]
    return await _start(mikros_service, write_toml, container, tmp_path, options)


def port(running: RunningService) -> int:
    """The port the service's gRPC server listens on."""
    return running.ports["grpc"]


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking grpcio code in a worker thread, bounded.

    The thread is never abandoned: every grpcio call made there carries a
    timeout below :data:`BOUND`, so it returns on its own.
    """
    import trio

    with trio.fail_after(2 * BOUND):
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def unary(port: int, request: Any, timeout: float = BOUND) -> Any:
    """One grpcio Unary call on a fresh channel (blocking; run it :func:`in_thread`)."""
    from protos import testsvc_pb2_grpc

    with grpc_channel(port) as channel:
        return testsvc_pb2_grpc.EchoStub(channel).Unary(request, timeout=timeout)


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    """The grpc.RpcError that ``fn()`` raises (fails the test if it returns)."""
    import grpc

    try:
        fn()
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded")


class GrpcioPeer:
    """A running grpcio server: its port, its servicer (a ``GrpcioEcho``), and the server."""

    def __init__(self, port: int, servicer: Any, server: grpc.Server) -> None:
        self.port = port
        self.servicer = servicer
        self.server = server


@asynccontextmanager
async def grpcio_peer(port: int = 0) -> AsyncIterator[GrpcioPeer]:
    """A grpcio server with ``GrpcioEcho`` on 127.0.0.1, stopped on exit."""
    from concurrent import futures

    import grpc

    from protos import testsvc_pb2_grpc

    executor = futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.server(executor)
    servicer = _echo_service()["GrpcioEcho"]()
    testsvc_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, f"grpcio could not bind 127.0.0.1:{port}"
    server.start()
    try:
        yield GrpcioPeer(bound, servicer, server)
    finally:
        await in_thread(lambda: server.stop(None).wait(BOUND))
        await in_thread(executor.shutdown)


@asynccontextmanager
async def grpcio_server(port: int = 0) -> AsyncIterator[int]:
    """A grpcio server with ``GrpcioEcho`` on 127.0.0.1; yields its port, stops on exit."""
    async with grpcio_peer(port) as peer:
        yield peer.port


async def agen(items: list[Any], delay: float = 0.0) -> AsyncIterator[Any]:
    """The ``items`` as an async iterator (a client stream), ``delay`` seconds apart."""
    import trio

    for item in items:
        yield item
        if delay:
            await trio.sleep(delay)


# -- the HTTP test service, in-process: its app and container, and HTTP clients -------
#
# The container and the error table hold framework values, so they are built on
# first use (module ``__getattr__``), as the echo service's names are; quart, httpx
# and trustme are imported by the helpers that use them.

#: The real command-line client the tests drive for h2c, TLS and HTTP/2 drains.
CURL = "/usr/bin/curl"

#: What :func:`_http_service` builds: ``HTTP_SERVICE_ERRORS``, the error kinds a
#: handler of :func:`create_app` raises by name, with the HTTP status each must map
#: to; ``HttpContainer``, the service of that app and its :class:`Store`.
_HTTP_NAMES = frozenset({"HTTP_SERVICE_ERRORS", "HttpContainer"})


@functools.cache
def _http_service() -> dict[str, Any]:
    """The names of :data:`_HTTP_NAMES`, built once."""
    from dependency_injector import providers

    from mikros_trio import (
        ConditionError,
        NotFoundError,
        PermissionDeniedError,
        ServiceContainer,
        ValidationError,
    )

    class HttpContainer(ServiceContainer):
        store = providers.Singleton(Store)
        app = providers.Singleton(create_app, store=store)

    return {
        "HTTP_SERVICE_ERRORS": {
            "validation": (ValidationError, 400),
            "permission": (PermissionDeniedError, 403),
            "not-found": (NotFoundError, 404),
            "condition": (ConditionError, 412),
        },
        "HttpContainer": HttpContainer,
    }


class Store:
    """The container component the test app's handlers reach: a tiny key-value store."""

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self.items = dict(items or {"greeting": "hello"})

    def get(self, key: str) -> str:
        from mikros_trio import NotFoundError

        try:
            return self.items[key]
        except KeyError:
            raise NotFoundError(f"no item {key!r}") from None


def create_app(store: Store) -> QuartTrio:
    """The HTTP test app: one route per behaviour the tests pin.

    ``app.entered`` is set whenever a slow handler starts, so a test knows
    its request is in flight; ``app.finished`` counts slow handlers that ran
    to their end.
    """
    import trio
    from quart import request, websocket
    from quart_trio import QuartTrio

    service_errors = _http_service()["HTTP_SERVICE_ERRORS"]
    app = QuartTrio(__name__)
    app.entered = trio.Event()  # type: ignore[attr-defined]
    app.finished = 0  # type: ignore[attr-defined]

    @app.get("/hello")
    async def hello() -> str:
        return "hello"

    @app.get("/slow")
    async def slow() -> dict[str, Any]:
        seconds = float(request.args.get("seconds", "0.5"))
        app.entered.set()  # type: ignore[attr-defined]
        await trio.sleep(seconds)
        app.finished += 1  # type: ignore[attr-defined]
        return {"slept": seconds, "client_port": request.scope["client"][1]}

    @app.get("/stream")
    async def stream() -> tuple[AsyncIterator[bytes], int]:
        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * 65536

        return endless(), 200

    @app.get("/chunks")
    async def chunks() -> tuple[AsyncIterator[bytes], int]:
        count = int(request.args.get("count", "3"))
        delay = float(request.args.get("delay", "0.1"))

        async def paced() -> AsyncIterator[bytes]:
            app.entered.set()  # type: ignore[attr-defined]
            for index in range(count):
                yield f"chunk {index},".encode()
                await trio.sleep(delay)

        return paced(), 200

    @app.get("/boom")
    async def boom() -> str:
        raise RuntimeError("the handler broke")

    @app.get("/raise/<kind>")
    async def raise_kind(kind: str) -> str:
        cls, _ = service_errors[kind]
        raise cls(f"raised {kind}", code=7)

    @app.post("/echo")
    async def echo() -> dict[str, Any]:
        data = await request.get_data()
        return {"length": len(data)}

    @app.get("/items/<key>")
    async def item(key: str) -> dict[str, Any]:
        return {"key": key, "value": store.get(key)}

    @app.websocket("/ws")
    async def echo_socket() -> None:
        while True:
            await websocket.send(await websocket.receive())

    return app


def write_http_toml(
    tmp_path: Path,
    *,
    http: Mapping[str, Any] | None = None,
    lifecycle: Mapping[str, Any] | None = None,
) -> Path:
    """A service.toml for an http service on 127.0.0.1, written into ``tmp_path``."""
    return _write_toml(tmp_path, "web", "http", http, lifecycle)


async def start_http(
    mikros_service: ServiceStarter, tmp_path: Path, **options: Any
) -> RunningService:
    """Start ``HttpContainer`` (or ``container=``) with a service.toml from ``options``.

    ``options`` are :func:`write_http_toml`'s, and ``overrides``.
    """
    container = _http_service()["HttpContainer"]
    return await _start(mikros_service, write_http_toml, container, tmp_path, options)


async def raw_exchange(port: int, data: bytes) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection to ``port`` and read until the server closes it.

    Returns what was read and how long the server took to close; fails
    if it does not close within :data:`BOUND`.
    """
    import trio

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    began = trio.current_time()
    received = b""
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(BOUND):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received, trio.current_time() - began


@dataclass(frozen=True)
class RawResponse:
    """One HTTP/1.x response as it came off the wire (parsed with h11)."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes


def parse_responses(raw: bytes, methods: Sequence[bytes] = ()) -> list[RawResponse]:
    """Every whole response in ``raw``, in order; ``methods`` are the requests' (GET if absent)."""
    import h11

    client = h11.Connection(h11.CLIENT)
    client.receive_data(raw)
    client.receive_data(b"")
    found: list[RawResponse] = []
    index = 0
    while True:
        method = methods[index] if index < len(methods) else b"GET"
        client.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
        client.send(h11.EndOfMessage())
        head: h11.Response | None = None
        body = b""
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:
                return found  # the bytes end inside a response, or before one
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return found
        assert head is not None
        found.append(RawResponse(head.status_code, dict(head.headers), body))
        if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
            return found
        client.start_next_cycle()
        index += 1


def http_port(running: RunningService, name: str = "http") -> int:
    """The port the service's listener ``name`` listens on."""
    return running.ports[name]


def url(running: RunningService, path: str, name: str = "http", scheme: str = "http") -> str:
    """The URL of ``path`` on the service's listener ``name``."""
    return f"{scheme}://127.0.0.1:{http_port(running, name)}{path}"


def client_for(running: RunningService, name: str = "http", **options: Any) -> httpx.AsyncClient:
    """An httpx client for one of the service's listeners, deaf to proxy settings."""
    import httpx

    return httpx.AsyncClient(base_url=url(running, "", name), trust_env=False, **options)


async def get(
    running: RunningService, path: str, name: str = "http", **headers: str
) -> httpx.Response:
    """One GET on the service's listener ``name``, on a fresh connection (no pooling), bounded."""
    import trio

    with trio.fail_after(BOUND):
        async with client_for(running, name=name) as client:
            return await client.get(path, headers=headers)


async def wait_until(running: RunningService | Service, check: Callable[[], bool]) -> None:
    """Return once ``check()`` holds; re-checked on every health change, bounded."""
    import trio

    health = running.health
    with trio.fail_after(BOUND):
        version = health.version
        while not check():
            version = await health.wait_changed(version)


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost: (ca, cert, key)."""
    import trustme

    authority = trustme.CA()
    server = authority.issue_cert("127.0.0.1", "localhost")
    ca, cert, key = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    authority.cert_pem.write_to_path(str(ca))
    server.cert_chain_pems[0].write_to_path(str(cert))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(cert), append=True)
    server.private_key_pem.write_to_path(str(key))
    return ca, cert, key


async def curl(*args: str) -> tuple[str, str]:
    """Run curl with ``args``, bounded; return (body, "<http version> <status>").

    It must exit 0: an HTTP error status is still a success for curl.
    """
    import trio

    with trio.fail_after(BOUND):
        done = await trio.run_process(
            [
                CURL,
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "4",
                "-w",
                "\n%{http_version} %{http_code}",
                *args,
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    body, _, summary = done.stdout.decode().rpartition("\n")
    return body, summary


# -- metrics: services with the feature on, and reading their exposition back -----------

#: ``[features.metrics]`` of a test service: its own listener (if any) on an ephemeral port.
LOCAL_METRICS = {"host": "127.0.0.1", "port": 0}

#: The samples of an exposition, by (name, labels).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_toml(
    *,
    types: str | tuple[str, ...] = "http",
    metrics: Mapping[str, Any] | None = LOCAL_METRICS,
    tables: Mapping[str, Mapping[str, Any]] | None = None,
    name: str = "svc",
) -> str:
    """A service.toml on 127.0.0.1 with short timeouts; ``metrics=None`` leaves the feature off."""
    kinds = [types] if isinstance(types, str) else list(types)
    all_tables: dict[str, Mapping[str, Any]] = {"lifecycle": TIMEOUTS}
    for kind in kinds:
        if kind in ("http", "grpc"):
            all_tables[f"runtime.{kind}"] = {"host": "127.0.0.1"}
    if metrics is not None:
        all_tables["features.metrics"] = {"enabled": True, **metrics}
    for table, values in (tables or {}).items():
        all_tables[table] = {**all_tables.get(table, {}), **values}
    return toml_text({"name": name, "types": kinds, "version": "1.2.3"}, all_tables)


def write_metrics_service(tmp_path: Path, **options: Any) -> Path:
    """:func:`metrics_toml` written to a fresh file under ``tmp_path``."""
    path = tmp_path / f"{options.get('name', 'svc')}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(metrics_toml(**options))
    return path


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (name, labels), through prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample called ``name`` with exactly ``labels``, or ``None``."""
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample called ``name``, by labels."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


def metrics_of(running: RunningService) -> Metrics:
    """The running service's :class:`Metrics`."""
    from mikros_trio.features.metrics import Metrics

    return running.service.telemetry.get(Metrics)


async def scrape(port: int, path: str = "/metrics") -> httpx.Response:
    """One GET on 127.0.0.1:``port`` with a fresh connection, bounded."""
    import httpx
    import trio

    with trio.fail_after(BOUND):
        async with httpx.AsyncClient(trust_env=False) as client:
            return await client.get(f"http://127.0.0.1:{port}{path}")


async def scraped(port: int, path: str = "/metrics") -> Samples:
    """The samples served at ``path``; the response must be a 200 in the Prometheus format."""
    import prometheus_client

    response = await scrape(port, path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    return parse(response.text)


async def settled(running: RunningService, gauge: str) -> None:
    """Wait until the in-flight ``gauge`` is 0: every call the client saw end was recorded.

    A kind ends a call just after the response went out, so a client can
    read its response a moment before the call is counted.
    """
    import trio

    registry = metrics_of(running).registry
    with trio.fail_after(BOUND):
        # Polling: the observer has no event to wait on, and must not grow one for tests.
        while registry.get_sample_value(gauge) != 0:  # noqa: ASYNC110
            await trio.sleep(0.001)


# -- tracing: traced services with their spans kept in memory, and span ids -----------

#: An incoming W3C parent: trace and span ids, sampled.
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"

#: A secret a traced service's environment holds; it must never reach a span.
SECRET = "s3cr3t-token-value"

#: The environ of a traced test service: spans kept in memory, one secret.
MEMORY = {"OTEL_TRACES_EXPORTER": "memory", "API_TOKEN": SECRET}


def service_toml(
    *, types: str = "http", tracing: Mapping[str, Any] | None = None, name: str = "traced"
) -> str:
    """A service.toml on 127.0.0.1 with tracing on (``exporter`` from ``tracing``, default otlp)."""
    tables: dict[str, Mapping[str, Any]] = {
        "lifecycle": TIMEOUTS,
        "features.tracing": {"enabled": True, **(tracing or {})},
        "features.env": {"secrets": ["API_TOKEN"]},
    }
    if types in ("http", "grpc"):
        tables[f"runtime.{types}"] = {"host": "127.0.0.1"}
    top = {"name": name, "types": [types], "version": "v1.2.0", "envs": ["API_TOKEN"]}
    return toml_text(top, tables)


def write_service(tmp_path: Path, **options: Any) -> Path:
    """:func:`service_toml` written to a fresh file under ``tmp_path``."""
    path = tmp_path / f"{options.get('name', 'traced')}.toml"
    path.write_text(service_toml(**options))
    return path


def tracing_of(running: RunningService) -> Tracing:
    """The running service's :class:`Tracing`."""
    from mikros_trio.features.tracing import Tracing

    return running.service.telemetry.get(Tracing)


async def spans_of(running: RunningService, count: int) -> tuple[ReadableSpan, ...]:
    """The service's finished spans, once there are at least ``count`` (bounded wait).

    A kind ends a call just after its response went out, so a client can
    read the response a moment before the span is finished.
    """
    import trio

    tracing = tracing_of(running)
    with trio.fail_after(BOUND):
        while True:
            spans = tracing.spans()
            if len(spans) >= count:
                return spans
            await trio.sleep(0.001)


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    """(trace id, span id) of ``span`` in lower-case hex."""
    context = span.get_span_context()
    assert context is not None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def parent_ids(span: ReadableSpan) -> tuple[str, str] | None:
    """(trace id, span id) of ``span``'s parent in hex, or ``None`` for a root span."""
    if span.parent is None:
        return None
    return format(span.parent.trace_id, "032x"), format(span.parent.span_id, "016x")


def built(
    toml: str, environ: Mapping[str, str] | None = None
) -> tuple[Telemetry, Tracing, list[Any]]:
    """Build the tracing feature for ``toml`` on a fresh hub, as the container layer does."""
    from mikros_trio.features.tracing import Tracing

    telemetry, components = build_feature("tracing", toml, {"API_TOKEN": SECRET, **(environ or {})})
    return telemetry, telemetry.get(Tracing), components


def create_traced_app() -> QuartTrio:
    """The traced test app: one route per behaviour the tracing tests pin."""
    import trio
    from opentelemetry import trace
    from opentelemetry.trace import StatusCode
    from quart_trio import QuartTrio

    from mikros_trio import NotFoundError
    from mikros_trio._telemetry import current_call, current_telemetry
    from mikros_trio.features.tracing import Tracing

    app = QuartTrio("tracing_test_app")

    @app.get("/ids")
    async def ids() -> dict[str, Any]:
        call = current_call()
        assert call is not None
        current = trace.get_current_span().get_span_context()
        return {
            "ids": dict(call.ids),
            "current": [format(current.trace_id, "032x"), format(current.span_id, "016x")],
        }

    @app.get("/items/<item_id>")
    async def item(item_id: str) -> str:
        raise NotFoundError(f"no item {item_id!r}")

    @app.get("/boom")
    async def boom() -> str:
        raise RuntimeError(f"the handler broke holding {SECRET}")

    @app.get("/enrich")
    async def enrich() -> str:
        span = trace.get_current_span()
        span.set_attribute("app.user", "ada")
        span.set_attribute("app.bad", {"not": "a primitive"})  # type: ignore[arg-type]
        span.add_event("cache.miss", {"key": "ada"})
        span.update_name("overridden")  # the route name set at the end wins
        return "done"

    @app.get("/degrade")
    async def degrade() -> str:
        span = trace.get_current_span()
        span.record_exception(ValueError("cache down"))
        span.set_status(StatusCode.ERROR, "served stale data")
        span.set_status(StatusCode.UNSET)  # as the SDK: UNSET never overrides
        return "stale"

    @app.get("/leak")
    async def leak() -> str:
        span = trace.get_current_span()
        span.set_attribute("app.token", repr(SECRET))
        span.set_attributes({"app.list": [SECRET, "x"], f"app.{SECRET}": 1})
        span.add_event(f"used {SECRET}", {"hex": SECRET.encode().hex()})
        span.add_link(span.get_span_context(), {"link": SECRET})
        span.set_status(StatusCode.ERROR, f"refused {json.dumps(SECRET)}")
        span.update_name(f"GET {SECRET}")
        return "leaked"

    @app.get("/work")
    async def work() -> str:
        telemetry = current_telemetry()
        assert telemetry is not None
        with telemetry.get(Tracing).tracer.start_as_current_span("load-profile"):
            await trio.lowlevel.checkpoint()
        return "done"

    return app


@functools.cache
def _traced_container() -> type[ServiceContainer]:
    """``TracedContainer``: the service of :func:`create_traced_app` (built on first use)."""
    from dependency_injector import providers

    from mikros_trio import ServiceContainer

    class TracedContainer(ServiceContainer):
        app = providers.Singleton(create_traced_app)

    return TracedContainer


# -- the gateway example calling the grpc example, both in-process -------------------

#: The two examples' folders.
GRPC = REPO / "examples" / "grpc"
GATEWAY = REPO / "examples" / "gateway"


@dataclass(frozen=True)
class Examples:
    """Both examples' main.py, imported (the ``examples`` fixture of conftest.py)."""

    greeter: ModuleType
    gateway: ModuleType


def gateway_config(tmp_path: Path, greeter_port: int) -> Path:
    """A copy of the gateway's service.toml whose ``[clients.greeter]`` is the running greeter."""
    import re

    text = (GATEWAY / "service.toml").read_text()
    text, count = re.subn(
        r"(?ms)^(\[clients\.greeter\]\n.*?^port\s*=\s*)\d+", rf"\g<1>{greeter_port}", text
    )
    assert count == 1, "no [clients.greeter] port in the gateway's service.toml"
    path = tmp_path / "service.toml"
    path.write_text(text)
    return path


async def start_greeter_and_gateway(
    mikros_service: ServiceStarter, examples: Examples, tmp_path: Path
) -> tuple[RunningService, RunningService]:
    """The greeter, then the gateway pointed at it; both ready."""
    import trio

    with trio.fail_after(PATIENCE):
        greeter = await mikros_service.start(examples.greeter.Container, GRPC / "service.toml")
        config = gateway_config(tmp_path, greeter.ports["grpc"])
        gateway = await mikros_service.start(examples.gateway.Container, config)
    return greeter, gateway


# -- secrets: what a leak would look like ------------------------------------------


def leak_forms(secret: str) -> dict[str, str]:
    """Each text a leak of ``secret`` would show, by name of the encoding that made it.

    Python's ``repr``/``ascii`` of the string and of its UTF-8 bytes, hex,
    JSON with and without ``ensure_ascii``, URL quoting (path, component,
    ``quote_plus``), base64 (standard and URL-safe), and for a URL its
    password as written and decoded. Computed with the standard library
    alone, never the framework's masking, so a test looking for them checks
    the framework rather than itself.
    """
    import base64
    import json
    import urllib.parse

    data = secret.encode()
    forms = {
        "raw": secret,
        "repr": repr(secret)[1:-1],
        "ascii": ascii(secret)[1:-1],
        "bytes repr": repr(data)[2:-1],
        "hex": data.hex(),
        "HEX": data.hex().upper(),
        "json": json.dumps(secret)[1:-1],
        "json utf-8": json.dumps(secret, ensure_ascii=False)[1:-1],
        "quote": urllib.parse.quote(secret),
        "quote component": urllib.parse.quote(secret, safe=""),
        "quote_plus": urllib.parse.quote_plus(secret),
        "base64": base64.b64encode(data).decode().rstrip("="),
        "urlsafe base64": base64.urlsafe_b64encode(data).decode().rstrip("="),
    }
    password = urllib.parse.urlsplit(secret).password
    if password:
        for name, form in leak_forms(urllib.parse.unquote(password)).items():
            forms[f"password {name}"] = form
        forms["password as written"] = password
    return forms


def leaked_forms(secret: str, text: str) -> list[str]:
    """The names of the :func:`leak_forms` of ``secret`` found in ``text`` (decoded JSON too)."""
    texts = output_texts(text)
    return sorted({name for name, form in leak_forms(secret).items() for t in texts if form in t})


def output_texts(text: str) -> list[str]:
    """``text``, and every string (keys too) inside each of its lines that is a JSON value.

    A leak inside a JSON line is JSON-escaped once more; decoding the line
    shows it as the program wrote it.
    """
    import json

    found = [text]

    def walk(value: object) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                found.append(str(key))
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for line in text.splitlines():
        if line.startswith(("{", "[")):
            # Not JSON after all: the raw text is checked already.
            with suppress(ValueError):
                walk(json.loads(line))
    return found


# -- lifecycle: the log lines of a child's output ------------------------------------


def log_lines(output: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``output`` (the logger's lines), parsed; other lines are skipped."""
    lines = []
    for line in output.splitlines():
        if line.startswith("{"):
            with suppress(ValueError):
                lines.append(json.loads(line))
    return lines


def events_of(output: str, logger: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``output`` that ``logger`` wrote (an example's own lines), in order."""
    return [line for line in log_lines(output) if line.get("logger") == logger]


def event_names(output: str, logger: str) -> list[str]:
    """The ``event`` of each line :func:`events_of` finds."""
    return [line["event"] for line in events_of(output, logger)]


# -- raw HTTP/2 (a blocking client, a trio one), and a process's resources --------------


def grpc_frame(body: bytes, length: int | None = None) -> bytes:
    """One length-prefixed, uncompressed gRPC message; ``length`` overrides the declared length."""
    return b"\x00" + (len(body) if length is None else length).to_bytes(4, "big") + body


def grpc_header_block(encoder: Any, path: str, content_type: str = "application/grpc") -> bytes:
    """The HPACK block (``encoder`` is the connection's) of a gRPC request's headers."""
    return bytes(
        encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "t"),
                ("content-type", content_type),
                ("te", "trailers"),
            ]
        )
    )


def grpc_request(
    encoder: Any,
    stream_id: int,
    path: str,
    body: bytes | None,
    *,
    end_stream: bool = True,
    content_type: str = "application/grpc",
) -> bytes:
    """HEADERS (and DATA carrying ``body``, already gRPC-framed) of one request for ``path``.

    ``encoder`` is the connection's hpack ``Encoder``. ``body=None`` sends
    the HEADERS alone; ``end_stream`` ends the stream on the last frame.
    """
    from hyperframe.frame import DataFrame, HeadersFrame

    block = grpc_header_block(encoder, path, content_type)
    end = ["END_STREAM"] if end_stream else []
    if body is None:
        return bytes(HeadersFrame(stream_id, block, flags=["END_HEADERS", *end]).serialize())
    return bytes(
        HeadersFrame(stream_id, block, flags=["END_HEADERS"]).serialize()
        + DataFrame(stream_id, body, flags=end).serialize()
    )


def parse_frames(buffer: bytes) -> tuple[list[Any], bytes]:
    """The complete HTTP/2 frames at the start of ``buffer``, and the bytes left over."""
    from hyperframe.frame import Frame

    frames = []
    while len(buffer) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
        if len(buffer) < 9 + length:
            break
        frame.parse_body(memoryview(buffer[9 : 9 + length]))
        buffer = buffer[9 + length :]
        frames.append(frame)
    return frames, buffer


class _FrameReader:
    """What :class:`RawH2` and :class:`RawClient` share: the frames read so far, and EOF."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.eof = False
        self._buffer = b""

    def _take(self, data: bytes) -> list[Any]:
        """The complete frames ``data`` ends (kept in :attr:`frames`); no data is EOF."""
        if not data:
            self.eof = True
            return []
        frames, self._buffer = parse_frames(self._buffer + data)
        self.frames += frames
        return frames


class RawH2(_FrameReader):
    """A hand-driven HTTP/2 client on a blocking socket, for what grpcio would never send.

    Frames are built with hyperframe and hpack, not an h2 state machine, so
    a test can break any rule; what the server sends is parsed into
    :attr:`frames`, in order. PINGs are answered unless ``answer_pings`` is
    false. Every read is bounded by the socket's timeout.
    """

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(
        self,
        port: int,
        settings: Mapping[int, int] | None = None,
        *,
        answer_pings: bool = True,
    ) -> None:
        from hpack import Decoder, Encoder
        from hyperframe.frame import SettingsFrame

        super().__init__()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
        self.answer_pings = answer_pings
        self._encoder = Encoder()
        self._decoder = Decoder()
        self.send(self.PREFACE + SettingsFrame(0, settings=dict(settings or {})).serialize())

    def send(self, data: bytes) -> None:
        """Send raw bytes; a connection the server closed counts as EOF, not an error."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.eof = True

    def header_block(self, path: str) -> bytes:
        """The HPACK block of a gRPC request's headers for ``path``."""
        return grpc_header_block(self._encoder, path)

    def request(self, stream_id: int, path: str, body: bytes | None, end: bool = True) -> bytes:
        """HEADERS (and DATA carrying ``body``, already gRPC-framed) of one request."""
        return grpc_request(self._encoder, stream_id, path, body, end_stream=end)

    def receive(self) -> None:
        """Read once (bounded) and parse every complete frame."""
        from hyperframe.frame import PingFrame

        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        for frame in self._take(data):
            if isinstance(frame, PingFrame) and "ACK" not in frame.flags and self.answer_pings:
                self.send(PingFrame(0, frame.opaque_data, flags=["ACK"]).serialize())

    def until(self, done: Callable[[RawH2], bool], timeout: float = PATIENCE) -> bool:
        """Read until ``done(self)`` or EOF or ``timeout``; return ``done(self)``."""
        deadline = time.monotonic() + timeout
        while not done(self) and not self.eof and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.receive()
            except TimeoutError:
                break
        return done(self)

    def of_type(self, name: str) -> list[Any]:
        """The frames received so far whose class is ``name`` (``"GoAwayFrame"``…)."""
        return [frame for frame in self.frames if type(frame).__name__ == name]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RawClient(_FrameReader):
    """A hand-driven HTTP/2 client on a trio socket stream, for what grpcio would never send.

    The async sibling of :class:`RawH2`: frames are built with hyperframe
    and read back without a client state machine, so a test sees exactly
    what the server wrote, in order.
    """

    #: The connection preface and an empty SETTINGS frame.
    PREFACE = RawH2.PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

    def __init__(self, stream: trio.SocketStream) -> None:
        from hpack import Decoder, Encoder

        super().__init__()
        self.stream = stream
        #: Decoded header blocks by stream id, in order (headers, then trailers).
        self.headers: dict[int, list[dict[str, str]]] = {}
        self._encoder = Encoder()
        self._decoder = Decoder()

    def request(
        self,
        stream_id: int,
        path: str,
        body: bytes | None,
        *,
        end_stream: bool = True,
        **options: Any,
    ) -> bytes:
        """HEADERS and DATA frames of one gRPC request carrying ``body`` (framed already).

        ``body=None`` sends the HEADERS alone, ending the stream there;
        ``content_type=`` replaces ``application/grpc`` (see :func:`grpc_request`).
        """
        end_stream = end_stream or body is None
        return grpc_request(self._encoder, stream_id, path, body, end_stream=end_stream, **options)

    async def receive(self) -> None:
        """Read what the server sent next (bounded); parse every complete frame."""
        import trio
        from hyperframe.frame import HeadersFrame

        with trio.fail_after(BOUND):
            data = await self.stream.receive_some(65536)
        for frame in self._take(data):
            if isinstance(frame, HeadersFrame):
                decoded = {str(k): str(v) for k, v in self._decoder.decode(frame.data)}
                self.headers.setdefault(frame.stream_id, []).append(decoded)

    def ended(self, stream_id: int) -> bool:
        from hyperframe.frame import DataFrame, HeadersFrame

        return any(
            isinstance(f, HeadersFrame | DataFrame)
            and f.stream_id == stream_id
            and "END_STREAM" in f.flags
            for f in self.frames
        )

    async def trailers(self, stream_id: int) -> dict[str, str]:
        """The trailers that end ``stream_id`` (fails if the connection ends first)."""
        while not self.ended(stream_id):
            assert not self.eof, f"the connection ended before stream {stream_id} did"
            await self.receive()
        return self.headers[stream_id][-1]

    async def until_eof(self) -> None:
        """Read until the server closes the connection (bounded)."""
        while not self.eof:
            await self.receive()


def rss_kb(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


# PostgreSQL: a throwaway cluster (the code is shared with bench/postgres.py, so it
# lives in the package, standard library only).

if TYPE_CHECKING:
    from mikros_trio._pgcluster import Cluster


@contextmanager
def postgres_cluster() -> Iterator[Cluster]:
    """A started throwaway cluster on 127.0.0.1, removed on exit.

    Fails the test (never skips: CI must run it) when the server binaries
    are missing. Tests that take the server away (stop/start) use their own
    cluster; the others share the session's ``postgres_server``.
    """
    from mikros_trio._pgcluster import MISSING, Cluster, binaries

    if binaries() is None:
        pytest.fail(MISSING)
    with Cluster() as cluster:
        yield cluster


# -- a real redis-server ---------------------------------------------------------


class RedisServer:
    """A throwaway ``redis-server`` on a free 127.0.0.1 port: no persistence, own temp dir.

    Started by :meth:`start`, stopped by :meth:`stop` (SIGTERM, then SIGKILL
    if it lingers); :meth:`restart` keeps the port, so clients see the same
    server go away and come back. :meth:`command` speaks raw RESP over a
    socket of its own, so fixtures and tests reach the server without the
    client under test.
    """

    def __init__(self, directory: Path, *options: str) -> None:
        import shutil

        binary = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
        )
        if binary is None:
            pytest.fail("redis-server not found: install Redis (Debian package redis-server)")
        self.binary = binary
        self.directory = directory
        self.options = options
        self.host = "127.0.0.1"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, *, password: str = "") -> str:
        """``redis://[:password@]127.0.0.1:<port>/<db>``."""
        auth = f":{password}@" if password else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    def start(self) -> None:
        """Start the server; wait until it answers PING (or fail the test, with its log)."""
        log = self.directory / "redis.log"
        args = [self.binary, "--port", str(self.port), "--bind", self.host]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        args += ["--logfile", str(log), *self.options]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline and self.process.poll() is None:
            with suppress(OSError):
                if self.command("PING").startswith((b"+PONG", b"-NOAUTH")):
                    return
            time.sleep(0.01)
        self.stop()
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        pytest.fail(f"redis-server on port {self.port} did not start:\n{text}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after PATIENCE seconds); idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(PATIENCE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(PATIENCE)

    def restart(self) -> None:
        """Stop the server and start a new one on the same port."""
        self.stop()
        self.start()

    def command(self, *args: str, password: str = "") -> bytes:
        """Send one command (after ``AUTH password`` if given) and return its raw RESP reply."""
        commands = [("AUTH", password)] if password else []
        commands.append(args)
        payload = b"".join(
            b"*%d\r\n" % len(command)
            + b"".join(b"$%d\r\n%s\r\n" % (len(part.encode()), part.encode()) for part in command)
            for command in commands
        )
        with socket.create_connection((self.host, self.port), timeout=PATIENCE) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # the server answers, then sees EOF and closes
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        return reply.split(b"\r\n", 1)[1] if password else reply


@contextmanager
def redis_server_process(directory: Path, *options: str) -> Iterator[RedisServer]:
    """A started :class:`RedisServer` in ``directory``, stopped on exit."""
    server = RedisServer(directory, *options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
