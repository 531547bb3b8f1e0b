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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

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


# -- raw HTTP/2 on a blocking socket, and a process's resources ------------------------


def grpc_frame(body: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return b"\x00" + len(body).to_bytes(4, "big") + body


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


class RawH2:
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

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
        self.frames: list[object] = []
        self.eof = False
        self.answer_pings = answer_pings
        self._encoder = Encoder()
        self._decoder = Decoder()
        self._buffer = b""
        self.send(self.PREFACE + SettingsFrame(0, settings=dict(settings or {})).serialize())

    def send(self, data: bytes) -> None:
        """Send raw bytes; a connection the server closed counts as EOF, not an error."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.eof = True

    def header_block(self, path: str) -> bytes:
        """The HPACK block of a gRPC request's headers for ``path``."""
        return bytes(
            self._encoder.encode(
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", path),
                    (":authority", "t"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ]
            )
        )

    def request(self, stream_id: int, path: str, body: bytes | None, end: bool = True) -> bytes:
        """HEADERS (and DATA carrying ``body``, already gRPC-framed) of one request."""
        from hyperframe.frame import DataFrame, HeadersFrame

        block = self.header_block(path)
        if body is None:
            flags = ["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"]
            return bytes(HeadersFrame(stream_id, block, flags=flags).serialize())
        data = DataFrame(stream_id, body, flags=["END_STREAM"] if end else [])
        return bytes(
            HeadersFrame(stream_id, block, flags=["END_HEADERS"]).serialize() + data.serialize()
        )

    def receive(self) -> None:
        """Read once (bounded) and parse every complete frame."""
        from hyperframe.frame import PingFrame

        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            return
        frames, self._buffer = parse_frames(self._buffer + data)
        for frame in frames:
            self.frames.append(frame)
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
