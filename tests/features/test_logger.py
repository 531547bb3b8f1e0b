"""The logger feature: structured lines from every source, per service, secrets masked.

The first part drives the feature through a real
:class:`~mikros_trio._telemetry.Telemetry` and its pipeline, as the kinds
do (``begin`` / ``end``, lifecycle events). The rest starts real services
with ``mikros_service`` (an HTTP app whose handlers log through structlog
and the standard library, the gRPC echo servicer of ``helpers``,
a periodic worker), calls them with httpx and grpcio, and reads back the
lines each wrote to its own log file. One test runs the worker example as
a real process and parses its stdout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio
import trio.testing
from dependency_injector import providers
from quart import request
from quart_trio import QuartTrio

from helpers import REPO, Examples, Spawn, start_greeter_and_gateway
from mikros_trio import ConfigError, Service, ServiceContainer
from mikros_trio._container import BuildContext
from mikros_trio._telemetry import Telemetry
from mikros_trio.errors import ErrorKind
from mikros_trio.ext import parse_definition
from mikros_trio.features.logger import _HEADS_KEPT, LogPipeline, build_logger, show_debug
from mikros_trio.features.settings import LoggerSettings
from mikros_trio.testing import RunningService, ServiceStarter

#: No single wait in these tests may take longer than this (seconds).
BOUND = 5.0

#: What every line starts with, in this order.
HEAD = ["timestamp", "level", "logger", "event"]

#: ISO 8601, UTC, with microseconds.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

#: A secret with characters JSON escapes (a quote, a backslash): masking must not miss it.
SECRET = 'hunter2-"quoted"-\\path'

#: An id the service makes when the client sends none (or a bad one).
NEW_ID = re.compile(r"^[0-9a-f]{32}$")


# -- helpers -----------------------------------------------------------------------------------


def _value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key} = {_value(item)}" for key, item in value.items()) + "}"
    return json.dumps(str(value) if isinstance(value, Path) else value)


def service_toml(
    tmp_path: Path,
    *,
    name: str = "web",
    types: str = "http",
    log: Mapping[str, Any] | None = None,
    tables: Mapping[str, Mapping[str, Any]] | None = None,
    envs: tuple[str, ...] = (),
    product: str = "",
) -> Path:
    """A service.toml on 127.0.0.1 with short timeouts, its log lines in ``<tmp>/<name>.log``."""
    sections: dict[str, Mapping[str, Any]] = {
        "log": log or {},
        "features.logger": {"output": tmp_path / f"{name}.log"},
        f"runtime.{types}": {"host": "127.0.0.1"} if types in ("http", "grpc") else {},
        "lifecycle": {"start_timeout": 5.0, "drain_timeout": 2.0, "shutdown_timeout": 6.0},
        **(tables or {}),
    }
    lines = [f'name = "{name}"', f'types = ["{types}"]', 'version = "1.2.3"']
    lines += [f"envs = {json.dumps(list(envs))}"]
    if product:
        lines.append(f"product = {json.dumps(product)}")
    for section, values in sections.items():
        lines += ["", f"[{section}]", *(f"{key} = {_value(v)}" for key, v in values.items())]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log file, parsed (each one must be a JSON object)."""
    parsed = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(isinstance(line, dict) for line in parsed)
    return parsed


def by_event(lines: list[dict[str, Any]], event: str) -> dict[str, Any]:
    """The one line whose event is ``event``."""
    found = [line for line in lines if line["event"] == event]
    assert len(found) == 1, (event, lines)
    return found[0]


def create_app() -> QuartTrio:
    """Handlers that log the ways an application does, then answer."""
    app = QuartTrio(__name__)

    @app.get("/work")
    async def work() -> str:
        structlog.get_logger("tests.handler").info("structlog line", item=7)
        logging.getLogger("tests.handler").info("stdlib line %d", 7, extra={"order": "o-1"})

        async def library_call() -> None:  # a child task: it sees the request's ids too
            logging.getLogger("some_library.core").warning("library line")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(library_call)
        return "done"

    @app.get("/levels")
    async def levels() -> str:
        log = logging.getLogger("tests.handler")
        log.debug("debug line")
        log.info("info line")
        log.warning("warning line")
        structlog.get_logger("tests.handler").debug("structlog debug line")
        return "ok"

    @app.get("/leak")
    async def leak() -> str:
        token = request.args["token"]
        logging.getLogger("tests.handler").warning("calling upstream with %s", token)
        structlog.get_logger("tests.handler").info("bound", credentials=token)
        try:
            raise PermissionError(f"upstream rejected {token}")
        except PermissionError:
            logging.getLogger("tests.handler").exception("upstream failed")
        raise RuntimeError(f"giving up with {token}")

    return app


class Container(ServiceContainer):
    app = providers.Singleton(create_app)


class Ticker:
    """A periodic worker job that logs and fails every other iteration."""

    def __init__(self) -> None:
        self.runs = 0

    async def run_once(self) -> None:
        self.runs += 1
        structlog.get_logger("tests.ticker").info("tick", run=self.runs)
        if self.runs % 2 == 0:
            raise ValueError(f"run {self.runs} failed")


class WorkerContainer(ServiceContainer):
    worker = providers.Singleton(Ticker)


async def start(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    container: type[ServiceContainer] = Container,
    **options: Any,
) -> RunningService:
    """Start ``container`` with a :func:`service_toml` from ``options``."""
    environ = options.pop("environ", None)
    path = service_toml(tmp_path, **options)
    with trio.fail_after(BOUND):
        return await mikros_service.start(container, path, environ=environ)


async def get(running: RunningService, path: str, **options: Any) -> httpx.Response:
    """One GET on the service's HTTP port, bounded, deaf to proxy settings."""
    base = f"http://127.0.0.1:{running.ports['http']}"
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
            return await client.get(path, **options)


def log_path(tmp_path: Path, name: str = "web") -> Path:
    return tmp_path / f"{name}.log"


# -- the pipeline and the observer, against a Telemetry --------------------------------------


#: The service.toml of the unit tests' service (a worker; nothing of it runs).
UNIT = 'name = "unit"\ntypes = ["worker"]\nversion = "0.1.0"\n'


def built(
    tmp_path: Path,
    toml: str = "",
    *,
    head: str = UNIT,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> tuple[LogPipeline, Telemetry]:
    """The logger feature of a worker service built from ``toml`` (more tables), to a file.

    ``head`` replaces the service's top-level keys, ``environ`` its
    environment; ``options`` are more ``[features.logger]`` settings.
    """
    definition = parse_definition(head + toml, environ=environ or {})
    telemetry = Telemetry(definition.name, definition.version)
    settings = LoggerSettings(output=str(tmp_path / "unit.log"), **options)
    context = BuildContext("logger", settings, definition, ServiceContainer(), telemetry)
    [component] = build_logger(context)
    assert component.name == "logger"
    return telemetry.get(LogPipeline), telemetry


def test_access_line_of_a_server_call(tmp_path: Path) -> None:
    """A server call gets a request id, and its end writes one access line carrying it."""
    pipeline, telemetry = built(tmp_path)
    call = telemetry.begin("http", "server", "", method="GET", target="/items/9", headers=[])
    request_id = call.ids["request_id"]
    assert NEW_ID.match(request_id)
    assert call.outgoing == {"x-request-id": request_id}
    call.name = "/items/<item_id>"
    telemetry.end(call, "404")
    pipeline.close()
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert list(line)[:4] == HEAD
    assert TIMESTAMP.match(line["timestamp"])
    assert line["level"] == "info"
    assert line["logger"] == "mikros_trio.access"
    assert line["event"] == "GET /items/9 404"
    assert (line["service"], line["version"]) == ("unit", "0.1.0")
    assert line["request_id"] == request_id
    assert line["kind"] == "http"
    assert (line["name"], line["method"], line["path"]) == ("/items/<item_id>", "GET", "/items/9")
    assert line["status"] == "404"
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= 0


@pytest.mark.parametrize("secret", ["", "hunter2"])
def test_access_lines_are_the_text_emit_would_write(tmp_path: Path, secret: str) -> None:
    """write_plain renders exactly what head() + ids + fields through emit() render."""
    toml = '[log]\nattributes = { team = "core \\"ß\\"", shard = 3 }\n'
    pipeline, telemetry = built(tmp_path, toml)
    if secret:
        telemetry.add_secrets([secret])
    ids = {"request_id": "r-\u2028-1", "trace_id": "0af7651916cd43dd8448eb211c80319c"}
    fields: list[tuple[str, str | float]] = [
        ("kind", "http"),
        ("name", '/items/<id> "quoted" \\ \t é 💥'),
        ("path", f"/items/{secret or 'x'}?q=\x01"),
        ("status", "200"),
        ("duration_ms", 12.345),
        ("error", "ValueError: 1e-07 < 0.1"),
    ]
    pipeline.write_plain(logging.INFO, "mikros_trio.access", f"GET {secret} 200", ids, fields)
    line = pipeline.head(logging.INFO, "mikros_trio.access", f"GET {secret} 200", time.time())
    line.update(ids)
    line.update(fields)
    pipeline.emit(line)
    pipeline.close()
    plain, general = log_path(tmp_path, "unit").read_text().splitlines()
    stamp = re.compile(r'^\{"timestamp":"[^"]*"')
    assert stamp.sub("", plain) == stamp.sub("", general)
    if secret:
        assert secret not in plain
        assert json.loads(plain)["event"] == "GET *** 200"


def test_unicode_line_separators_never_split_a_line(tmp_path: Path) -> None:
    """U+2028, U+2029 and NEL in a client's path are escaped: one line for every line reader."""
    pipeline, telemetry = built(tmp_path)
    target = "/a\u2028b\u2029c\x85d"
    call = telemetry.begin("http", "server", "", method="GET", target=target, headers=[])
    telemetry.end(call, "404")
    pipeline.log(logging.INFO, "also\u2028here")
    pipeline.close()
    text = log_path(tmp_path, "unit").read_text()
    assert len(text.splitlines()) == 2
    access, other = (json.loads(line) for line in text.splitlines())
    assert access["path"] == target
    assert other["event"] == "also\u2028here"


def test_an_id_named_like_a_field_keeps_the_line_valid(tmp_path: Path) -> None:
    """An observer's id called like the access line's own fields never repeats a key."""
    pipeline, _ = built(tmp_path)
    fields: list[tuple[str, str | float]] = [("kind", "http"), ("status", "200")]
    pipeline.write_plain(logging.INFO, "x", "e", {"status": "theirs", "service": "s"}, fields)
    pipeline.close()
    pairs = json.loads(
        log_path(tmp_path, "unit").read_text(), object_pairs_hook=lambda items: items
    )
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys))
    assert dict(pairs)["status"] == "200"


def test_rendered_heads_stay_bounded_however_many_events(tmp_path: Path) -> None:
    """Plain lines whose events never repeat (raw paths) keep at most _HEADS_KEPT rendered
    heads, and every line is still written whole."""
    pipeline, _ = built(tmp_path)
    count = _HEADS_KEPT * 3
    fields: list[tuple[str, str | float]] = [("status", "200")]
    for index in range(count):
        pipeline.write_plain(logging.INFO, "x", f"GET /item/{index} 200", {}, fields)
    assert len(pipeline._heads) <= _HEADS_KEPT
    pipeline.close()
    lines = read_lines(log_path(tmp_path, "unit"))
    assert [line["event"] for line in lines] == [f"GET /item/{i} 200" for i in range(count)]


def test_failed_call_is_an_error_line_with_its_exception(tmp_path: Path) -> None:
    """A failed call's access line is at error level and names the exception."""
    pipeline, telemetry = built(tmp_path)
    call = telemetry.begin("grpc", "server", "/pkg.Svc/Do", target="/pkg.Svc/Do")
    telemetry.end(call, "INTERNAL", failed=True, error=KeyError("missing"))
    pipeline.close()
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert (line["level"], line["event"]) == ("error", "/pkg.Svc/Do INTERNAL")
    assert line["error"] == "KeyError: 'missing'"
    assert "path" not in line  # the target is the method itself


#: MIKROS_TRACKER_HEADER_NAME set to another header.
TRACKER = {"MIKROS_TRACKER_HEADER_NAME": "X-Correlation-ID"}


@pytest.mark.parametrize(
    ("environ", "header"), [({}, "x-request-id"), (TRACKER, "x-correlation-id")]
)
def test_request_id_goes_on_to_client_calls(
    tmp_path: Path, environ: dict[str, str], header: str
) -> None:
    """A client call made while serving sends the served call's request id, and logs at debug.

    In the header MIKROS_TRACKER_HEADER_NAME names, lower case (as gRPC metadata must be).
    """
    pipeline, telemetry = built(tmp_path, '[log]\nlevel = "debug"\n', environ=environ)
    served = telemetry.begin("grpc", "server", "/a.A/Get", headers=[(header, "req-42")])
    token = telemetry.enter(served)
    try:
        client = telemetry.begin("grpc", "client", "/b.B/Fetch", target="b")
        assert client.outgoing == {header: "req-42"}
        telemetry.end(client, "OK")
    finally:
        telemetry.leave(token)
    telemetry.end(served, "OK")
    pipeline.close()
    client_line, served_line = read_lines(log_path(tmp_path, "unit"))
    assert (client_line["level"], client_line["side"], client_line["target"]) == (
        "debug",
        "client",
        "b",
    )
    assert client_line["request_id"] == served_line["request_id"] == "req-42"


@pytest.mark.parametrize("kind", ["worker", "script"])
def test_worker_iterations_and_script_runs_get_a_request_id(tmp_path: Path, kind: str) -> None:
    """An internal call has its own request id, its lines carry it, and its client calls send it."""
    pipeline, telemetry = built(tmp_path)
    call = telemetry.begin(kind, "internal", "job")
    token = telemetry.enter(call)
    try:
        request_id = call.ids["request_id"]
        assert NEW_ID.match(request_id)
        outgoing = telemetry.begin("grpc", "client", "/greeter.Greeter/SayHello")
        assert outgoing.outgoing == {"x-request-id": request_id}
        telemetry.end(outgoing, "OK")
        pipeline.log(logging.INFO, "inside the job")
    finally:
        telemetry.leave(token)
        telemetry.end(call, "ok")
    pipeline.close()
    lines = read_lines(log_path(tmp_path, "unit"))
    inside = next(line for line in lines if line["event"] == "inside the job")
    assert inside["request_id"] == request_id


@pytest.mark.parametrize(
    "incoming",
    ["", "x" * 129, "two words", "new\u2028line", "<script>"],
    ids=["empty", "too-long", "space", "unicode", "markup"],
)
def test_unsafe_incoming_request_id_is_replaced(tmp_path: Path, incoming: str) -> None:
    """An incoming x-request-id that is empty, too long or has odd characters gets a new id."""
    pipeline, telemetry = built(tmp_path)
    call = telemetry.begin("http", "server", "", headers=[(b"x-request-id", incoming.encode())])
    pipeline.close()
    assert NEW_ID.match(call.ids["request_id"])


def test_access_log_off_writes_no_access_line(tmp_path: Path) -> None:
    """``access_log = false`` keeps request ids but writes no access line."""
    definition = parse_definition(
        'name = "unit"\ntypes = ["worker"]\nversion = "0.1.0"\n', environ={}
    )
    telemetry = Telemetry("unit", "0.1.0")
    settings = LoggerSettings(output=str(tmp_path / "unit.log"), access_log=False)
    build_logger(BuildContext("logger", settings, definition, ServiceContainer(), telemetry))
    pipeline = telemetry.get(LogPipeline)
    pipeline.open()
    call = telemetry.begin("http", "server", "/x", headers=[])
    telemetry.end(call, "200")
    pipeline.log(logging.WARNING, "still logging")
    pipeline.close()
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert line["event"] == "still logging"
    assert "request_id" in call.ids


@asynccontextmanager
async def flushing(
    tmp_path: Path, flush_interval: float = 0.5
) -> AsyncIterator[tuple[LogPipeline, trio.CancelScope]]:
    """A unit pipeline, open with its periodic flush running as the feature's component runs it.

    Yields the pipeline and the flush's cancel scope; closes the pipeline on the way out.
    """
    pipeline, _ = built(tmp_path, flush_interval=flush_interval)
    pipeline.open()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipeline.flush_periodically)
            await trio.testing.wait_all_tasks_blocked()
            yield pipeline, nursery.cancel_scope
            nursery.cancel_scope.cancel()
    finally:
        pipeline.close()


def events_in(tmp_path: Path) -> list[str]:
    """The events in the unit pipeline's file so far."""
    path = log_path(tmp_path, "unit")
    return [line["event"] for line in read_lines(path)] if path.exists() else []


async def test_info_lines_wait_for_the_periodic_flush(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """While the service runs, an info line reaches the file within flush_interval, not at once."""
    async with flushing(tmp_path) as (pipeline, _):
        pipeline.log(logging.INFO, "first")
        pipeline.log(logging.DEBUG, "not at this level")
        pipeline.log(logging.INFO, "second")
        assert events_in(tmp_path) == []
        await trio.sleep(0.4)
        assert events_in(tmp_path) == []
        await trio.sleep(0.2)
        assert events_in(tmp_path) == ["first", "second"]


async def test_warnings_and_errors_flush_at_once_with_what_waited(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A warning goes out as it is written, the waiting info lines before it, in order."""
    async with flushing(tmp_path) as (pipeline, _):
        pipeline.log(logging.INFO, "waiting")
        pipeline.log(logging.WARNING, "warning")
        assert events_in(tmp_path) == ["waiting", "warning"]
        pipeline.log(logging.ERROR, "error")
        assert events_in(tmp_path) == ["waiting", "warning", "error"]


async def test_lines_from_other_threads_flush_at_once(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Only the service's own thread defers: a line logged from a worker thread is out at once."""
    async with flushing(tmp_path) as (pipeline, _):
        await trio.to_thread.run_sync(lambda: pipeline.log(logging.INFO, "from a thread"))
        assert events_in(tmp_path) == ["from a thread"]


async def test_stopping_the_flush_writes_what_waits_and_later_lines_at_once(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """When the periodic flush ends (shutdown), waiting lines go out; then every line at once."""
    async with flushing(tmp_path) as (pipeline, flush):
        pipeline.log(logging.INFO, "waiting")
        flush.cancel()
        await trio.lowlevel.checkpoint()  # the flush task ends
        assert events_in(tmp_path) == ["waiting"]
        pipeline.log(logging.INFO, "shutdown line")
        assert events_in(tmp_path) == ["waiting", "shutdown line"]


async def test_flush_interval_zero_flushes_every_line(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """flush_interval = 0: each line is in the file as soon as it is written."""
    async with flushing(tmp_path, flush_interval=0) as (pipeline, _):
        pipeline.log(logging.INFO, "at once")
        assert events_in(tmp_path) == ["at once"]


def _traceback(exception: Any) -> bool:
    return isinstance(exception, str) and exception.startswith("Traceback")


def _message_alone(exception: Any) -> bool:
    return bool(exception == "ValueError: bad input")


@pytest.mark.parametrize(
    ("table", "check"),
    [
        ('error_stack_trace = "default"', _traceback),
        (
            'error_stack_trace = "structured"',
            lambda e: e[0]["exc_type"] == "ValueError" and e[0]["frames"],
        ),
        ('error_stack_trace = "disabled"', _message_alone),
        # Go v0.19.0's boolean key.
        ("error_stacktrace = true", _traceback),
        ("error_stacktrace = false", _message_alone),
    ],
)
def test_error_stack_trace_modes(tmp_path: Path, table: str, check: Any) -> None:
    """``[log] error_stack_trace`` (Go v0.19.0: ``error_stacktrace``): trace, list or message."""
    pipeline, _ = built(tmp_path, f"[log]\n{table}\n")
    try:
        raise ValueError("bad input")
    except ValueError as error:
        pipeline.log(logging.ERROR, "it broke", exc_info=error)
    pipeline.close()
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert check(line["exception"]), line["exception"]


def test_console_on_a_terminal_with_colours(monkeypatch: pytest.MonkeyPatch) -> None:
    """With format auto, a terminal on stdout gets the coloured console renderer."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    controller, terminal = os.openpty()
    try:
        with open(terminal, "w", encoding="utf-8", closefd=False) as tty:
            monkeypatch.setattr(sys, "stdout", tty)
            pipeline = LogPipeline(Telemetry("tty", "1.0"), output="stdout")
            assert pipeline.format == "console"
            pipeline.log(logging.WARNING, "on a terminal", logger="tests.tty", user="ada")
            pipeline.close()
        written = os.read(controller, 65536).decode()
    finally:
        os.close(controller)
        os.close(terminal)
    assert "\x1b[" in written  # colours
    assert "on a terminal" in written
    assert "ada" in written
    assert not written.lstrip().startswith("{")


def test_console_masks_secrets_in_tracebacks(tmp_path: Path) -> None:
    """The console renderer's own traceback text is masked too."""
    telemetry = Telemetry("unit", "0.1.0")
    telemetry.add_secrets([SECRET])
    pipeline = LogPipeline(telemetry, format="console", output=str(tmp_path / "unit.log"))
    try:
        raise RuntimeError(f"token {SECRET} refused")
    except RuntimeError as error:
        pipeline.log(logging.ERROR, "refused", exc_info=error, sent=SECRET)
    pipeline.close()
    text = (tmp_path / "unit.log").read_text()
    assert "Traceback" in text
    assert "RuntimeError: token *** refused" in text
    assert SECRET not in text


def test_a_secret_in_a_key_or_a_nested_value_is_masked(tmp_path: Path) -> None:
    """Keys a caller chose, nested dicts and lists, bytes and other objects are masked too."""
    pipeline, telemetry = built(tmp_path)
    telemetry.add_secrets([SECRET])
    pipeline.log(
        logging.WARNING,
        "structured",
        nested={"deep": [SECRET, {SECRET: repr(SECRET)}], SECRET.encode(): 1},
        raw=SECRET.encode(),
        **{f"key {SECRET}": "value"},
    )
    pipeline.close()
    text = log_path(tmp_path, "unit").read_text()
    assert SECRET not in text
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert line["nested"] == {"deep": ["***", {"***": "'***'"}], "b'***'": 1}
    assert line["raw"] == "b'***'"
    assert line["key ***"] == "value"


def test_a_line_that_cannot_be_formatted_is_reported_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A format that does not fit its arguments is an error line, masked, not raw stderr text."""
    pipeline, telemetry = built(tmp_path)
    telemetry.add_secrets([SECRET])
    pipeline.open()
    try:
        record = logging.getLogger("tests.handler").makeRecord(
            "tests.handler", logging.WARNING, __file__, 1, "a count of %d", (SECRET,), None
        )
        # Straight to the root handler: pytest's own capture handler raises on such a line.
        [handler] = [h for h in logging.getLogger().handlers if type(h).__name__ == "_Handler"]
        handler.handle(record)
    finally:
        pipeline.close()
    assert capsys.readouterr().err == ""
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert line["level"] == "error"
    assert line["event"] == "a log line from tests.handler could not be written"
    assert line["message"] == "a count of %d"
    assert line["arguments"] == "('***',)"
    assert "TypeError" in line["exception"]
    assert SECRET not in json.dumps(line)


def test_a_thread_exception_is_a_masked_line_and_the_previous_hook_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """threading.excepthook writes an error line with the traceback, masked; then chains."""
    seen: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    pipeline, telemetry = built(tmp_path)
    telemetry.add_secrets([SECRET])
    pipeline.open()

    def fail() -> None:
        raise RuntimeError(f"thread holding {SECRET!r}")

    thread = threading.Thread(target=fail, name="failing-thread")
    thread.start()
    thread.join()
    pipeline.close()
    assert threading.excepthook == seen.append, "the previous hook is back"
    assert [args.thread for args in seen] == [thread]
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert line["level"] == "error"
    assert line["event"] == "uncaught exception in thread failing-thread"
    assert "RuntimeError: thread holding '***'" in line["exception"]
    assert "in fail" in line["exception"]


def test_a_warning_is_a_masked_line_and_still_recorded(tmp_path: Path) -> None:
    """warnings.warn writes a py.warnings line, masked; catch_warnings still records it."""
    pipeline, telemetry = built(tmp_path)
    telemetry.add_secrets([SECRET])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline.open()
        warnings.warn(f"token {SECRET!r} expires", UserWarning, stacklevel=1)
        pipeline.close()
        assert warnings.showwarning is getattr(warnings, "_showwarning_orig", None)
    assert [str(warning.message) for warning in caught] == [f"token {SECRET!r} expires"]
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert line["logger"] == "py.warnings"
    assert (line["level"], line["event"]) == ("warning", "UserWarning: token '***' expires")
    assert line["category"] == "UserWarning"
    assert line["source"].startswith(__file__)


def test_a_warning_filtered_as_an_error_still_raises_while_a_pipeline_is_live(
    tmp_path: Path,
) -> None:
    """filterwarnings = error (this suite's setting) still raises: the hook only shows warnings."""
    pipeline, _ = built(tmp_path)
    pipeline.open()
    try:
        with pytest.raises(UserWarning, match="still an error"):
            warnings.warn("still an error", UserWarning, stacklevel=1)
    finally:
        pipeline.close()
    assert log_path(tmp_path, "unit").read_text() == ""


class Undead:
    """Its finaliser fails: Python reports that through sys.unraisablehook."""

    def __del__(self) -> None:
        raise RuntimeError(f"finaliser holding {SECRET}")


def test_an_unraisable_exception_is_a_masked_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing finaliser writes an error line naming the object, masked; the hook chains."""
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    pipeline, telemetry = built(tmp_path)
    telemetry.add_secrets([SECRET])
    pipeline.open()
    Undead()
    pipeline.close()
    assert sys.unraisablehook == seen.append, "the previous hook is back"
    assert len(seen) == 1
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert line["level"] == "error"
    assert line["event"].startswith("Exception ignored in: <function Undead.__del__")
    assert "RuntimeError: finaliser holding ***" in line["exception"]


def test_lines_after_the_service_closed_still_mask_its_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once every pipeline is closed, stray lines go to stderr with the secrets still masked."""
    pipeline, telemetry = built(tmp_path)
    telemetry.add_secrets([SECRET])
    pipeline.open()
    pipeline.close()
    logging.getLogger("tests.late").warning("late line with %s", SECRET)
    err = capsys.readouterr().err
    assert "late line with ***" in err
    assert SECRET not in err


def test_output_in_a_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    """A log file in a folder that does not exist fails the build, naming the key."""
    definition = parse_definition(
        'name = "unit"\ntypes = ["worker"]\nversion = "0.1.0"\n', environ={}
    )
    settings = LoggerSettings(output=str(tmp_path / "nowhere" / "unit.log"))
    context = BuildContext("logger", settings, definition, ServiceContainer(), Telemetry())
    with pytest.raises(ConfigError, match=r"features\.logger\.output"):
        build_logger(context)


# -- HTTP services ----------------------------------------------------------------------------


async def test_lines_are_json_with_service_and_version(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Every line is a JSON object with the head fields, the service's name and version."""
    running = await start(mikros_service, tmp_path)
    assert (await get(running, "/work")).text == "done"
    await running.stop()
    lines = read_lines(log_path(tmp_path))
    assert len(lines) >= 6  # listening, ready, 3 handler lines, access, shutdown, stopped
    for line in lines:
        assert list(line)[:4] == HEAD, line
        assert TIMESTAMP.match(line["timestamp"]), line
        assert (line["service"], line["version"]) == ("web", "1.2.3"), line


async def test_handler_lines_share_the_access_lines_request_id(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A request's structlog, stdlib and library lines, access line and response share one id."""
    running = await start(mikros_service, tmp_path)
    response = await get(running, "/work")
    request_id = response.headers["x-request-id"]
    assert NEW_ID.match(request_id)
    await running.stop()  # the access line is written once the response is sent
    lines = read_lines(log_path(tmp_path))
    structlog_line = by_event(lines, "structlog line")
    stdlib_line = by_event(lines, "stdlib line 7")
    library_line = by_event(lines, "library line")
    access = by_event(lines, "GET /work 200")
    for line in (structlog_line, stdlib_line, library_line, access):
        assert line["request_id"] == request_id, line
    assert (structlog_line["logger"], structlog_line["item"]) == ("tests.handler", 7)
    assert (stdlib_line["logger"], stdlib_line["order"]) == ("tests.handler", "o-1")
    assert (library_line["logger"], library_line["level"]) == ("some_library.core", "warning")
    assert (access["logger"], access["kind"], access["status"]) == (
        "mikros_trio.access",
        "http",
        "200",
    )
    # Lines outside any request carry no request id.
    assert "request_id" not in by_event(lines, "service ready")


async def test_structlog_and_stdlib_lines_have_one_shape(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A structlog line and a stdlib line differ only in their own fields."""
    running = await start(mikros_service, tmp_path, log={"attributes": {"team": "core"}})
    await get(running, "/work")
    lines = read_lines(log_path(tmp_path))
    structlog_line = by_event(lines, "structlog line")
    stdlib_line = by_event(lines, "stdlib line 7")
    assert list(structlog_line)[:-1] == list(stdlib_line)[:-1]  # item=7 vs order="o-1"
    assert list(structlog_line)[-1:] == ["item"]
    assert list(stdlib_line)[-1:] == ["order"]


async def test_incoming_request_id_is_honoured_and_echoed(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A sane incoming x-request-id is used for the request's lines and sent back."""
    running = await start(mikros_service, tmp_path)
    response = await get(running, "/work", headers={"X-Request-ID": "client-req-0001"})
    assert response.headers["x-request-id"] == "client-req-0001"
    await running.stop()
    lines = read_lines(log_path(tmp_path))
    assert by_event(lines, "structlog line")["request_id"] == "client-req-0001"
    assert by_event(lines, "GET /work 200")["request_id"] == "client-req-0001"


async def test_level_filters_every_source(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """``[log] level = "warning"`` drops info and debug lines of every source, access lines too."""
    running = await start(mikros_service, tmp_path, log={"level": "warning"})
    assert logging.getLogger().level == logging.WARNING  # libraries' info calls stay cheap
    assert (await get(running, "/levels")).status_code == 200
    await running.stop()
    events = [line["event"] for line in read_lines(log_path(tmp_path))]
    assert events == ["warning line"]


async def test_debug_level_shows_debug_lines_and_lifecycle_steps(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """``[log] level = "debug"`` lets debug lines through and logs each component's steps."""
    running = await start(mikros_service, tmp_path, log={"level": "debug"})
    await get(running, "/levels")
    running.service.telemetry.get(LogPipeline).flush()
    lines = read_lines(log_path(tmp_path))
    events = {line["event"] for line in lines}
    assert {"debug line", "structlog debug line", "info line", "warning line"} <= events
    assert {"http starting", "http started", "service ready"} <= events


async def test_static_attributes_on_every_line(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """``[log] attributes`` appear on every line, after the service's identity."""
    attributes = {"team": "core", "shard": 3, "canary": True}
    running = await start(mikros_service, tmp_path, log={"attributes": attributes})
    await get(running, "/work")
    await running.stop()
    lines = read_lines(log_path(tmp_path))
    identity = ["service", "version", "deploy_env", "team", "shard", "canary"]
    for line in lines:
        assert list(line)[4:10] == identity, line
        assert (line["team"], line["shard"], line["canary"]) == ("core", 3, True)


async def test_file_output_gets_every_line_to_the_last(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """The log file holds the supervisor's last line ("service stopped") and is closed after it."""
    running = await start(mikros_service, tmp_path)
    await get(running, "/work")
    pipeline = running.service.telemetry.get(LogPipeline)
    assert pipeline.live
    assert await running.stop() == 0
    assert pipeline.closed
    lines = read_lines(log_path(tmp_path))
    shutdown = by_event(lines, "service shutdown (stopped by the test harness)")
    assert lines.index(shutdown) < len(lines) - 1
    assert lines[-1]["event"] == "service stopped (exit code 0)"
    assert lines[-1]["logger"] == "mikros_trio.lifecycle"


async def test_two_services_in_one_process_keep_their_own_output(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Two services in one process write their lines to their own files, with their own names."""
    first = await start(mikros_service, tmp_path, name="first")
    second = await start(mikros_service, tmp_path, name="second")
    await get(first, "/work")
    await get(second, "/levels")
    await second.stop()
    await first.stop()
    first_lines = read_lines(log_path(tmp_path, "first"))
    second_lines = read_lines(log_path(tmp_path, "second"))
    assert {line["service"] for line in first_lines} == {"first"}
    assert {line["service"] for line in second_lines} == {"second"}
    first_events = {line["event"] for line in first_lines}
    second_events = {line["event"] for line in second_lines}
    assert {"structlog line", "library line", "GET /work 200"} <= first_events
    assert {"warning line", "GET /levels 200"} <= second_events
    assert not first_events & {"warning line", "GET /levels 200"}
    assert not second_events & {"structlog line", "library line", "GET /work 200"}


async def test_lines_from_outside_any_service_go_to_the_latest(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A line logged by code outside every service goes to the most recently started one."""
    await start(mikros_service, tmp_path, name="older")
    await start(mikros_service, tmp_path, name="newer")
    logging.getLogger("tests.outside").warning("from the test itself")
    assert "from the test itself" in log_path(tmp_path, "newer").read_text()
    assert "from the test itself" not in log_path(tmp_path, "older").read_text()


async def test_secrets_never_reach_the_output(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A secret in a message, a field, an exception and its traceback is masked everywhere."""
    running = await start(
        mikros_service,
        tmp_path,
        environ={"API_TOKEN": SECRET},
        envs=("API_TOKEN",),
        tables={"features.env": {"secrets": ["API_TOKEN"]}},
    )
    telemetry = running.service.telemetry
    assert telemetry.has_secrets
    response = await get(running, "/leak", params={"token": SECRET})
    assert response.status_code == 500
    await running.stop()
    text = log_path(tmp_path).read_text()
    assert SECRET not in text
    assert json.dumps(SECRET)[1:-1] not in text  # nor its JSON-escaped form
    lines = read_lines(log_path(tmp_path))
    assert by_event(lines, "calling upstream with ***")["level"] == "warning"
    assert by_event(lines, "bound")["credentials"] == "***"
    failed = by_event(lines, "upstream failed")
    assert "PermissionError: upstream rejected ***" in failed["exception"]
    assert "Traceback" in failed["exception"]
    assert by_event(lines, "GET /leak 500")["error"] == "RuntimeError: giving up with ***"


async def test_a_short_secret_is_warned_about_by_name_at_start(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """A secret under 8 characters gets a warning naming its variable, never its value."""
    running = await start(
        mikros_service,
        tmp_path,
        environ={"PIN": "4921"},
        envs=("PIN",),
        tables={"features.env": {"secrets": ["PIN"]}},
    )
    await running.stop()
    text = log_path(tmp_path).read_text()
    assert "4921" not in text
    [line] = [line for line in read_lines(log_path(tmp_path)) if line.get("secret")]
    assert line["level"] == "warning"
    assert line["secret"] == "PIN"
    assert line["event"].startswith("PIN is a secret of fewer than 8 characters")


async def test_console_format_when_forced(mikros_service: ServiceStarter, tmp_path: Path) -> None:
    """``[log] format = "console"`` writes readable key=value lines, no colours into a file."""
    running = await start(mikros_service, tmp_path, log={"format": "console"})
    await get(running, "/work")
    await running.stop()
    text = log_path(tmp_path).read_text()
    assert "\x1b[" not in text
    structlog_line = next(line for line in text.splitlines() if "structlog line" in line)
    assert "[info" in structlog_line
    assert "[tests.handler]" in structlog_line
    assert "service=web" in structlog_line
    assert "item=7" in structlog_line
    assert re.search(r"request_id=[0-9a-f]{32}", structlog_line)
    assert not text.lstrip().startswith("{")


async def test_stdout_output_is_json_when_not_a_terminal(
    mikros_service: ServiceStarter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the default output (stdout, not a terminal here) lines are JSON on stdout."""
    path = service_toml(tmp_path)
    text = path.read_text().replace(f'output = "{log_path(tmp_path)}"', 'output = "stdout"')
    path.write_text(text)
    with trio.fail_after(BOUND):
        running = await mikros_service.start(Container, path)
    assert running.service.telemetry.get(LogPipeline).format == "json"
    await get(running, "/work")
    await running.stop()
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {"structlog line", "GET /work 200", "service stopped (exit code 0)"} <= {
        line["event"] for line in lines
    }


async def test_caplog_still_sees_records(
    mikros_service: ServiceStarter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pytest's caplog keeps working next to the feature's handler, for both APIs."""
    running = await start(mikros_service, tmp_path)
    with caplog.at_level(logging.INFO, logger="tests.handler"):
        await get(running, "/work")
    messages = [r.getMessage() for r in caplog.records if r.name == "tests.handler"]
    assert "stdlib line 7" in messages
    assert any("structlog line" in message for message in messages)


# -- gRPC and worker services -----------------------------------------------------------------


async def test_grpc_calls_get_access_lines_with_the_incoming_request_id(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Each RPC gets one access line with its method, status code name and request id."""
    import grpc

    from helpers import Container as EchoContainer
    from helpers import EchoRequest, grpc_channel, in_thread
    from protos import testsvc_pb2_grpc

    running = await start(mikros_service, tmp_path, EchoContainer, name="echo", types="grpc")

    def calls(port: int) -> tuple[str, grpc.StatusCode]:
        with grpc_channel(port) as channel:
            stub = testsvc_pb2_grpc.EchoStub(channel)
            reply = stub.Unary(
                EchoRequest(text="hi"), metadata=[("x-request-id", "rpc-7")], timeout=BOUND
            )
            try:
                stub.Unary(EchoRequest(fail="not-found"), timeout=BOUND)
            except grpc.RpcError as error:
                return reply.text, error.code()
        raise AssertionError("the failing call succeeded")

    text, code = await in_thread(calls, running.ports["grpc"])
    assert (text, code) == ("hi", grpc.StatusCode.UNKNOWN)  # a NotFoundError
    running.service.telemetry.get(LogPipeline).flush()
    lines = read_lines(log_path(tmp_path, "echo"))
    ok = by_event(lines, "/mikros.testsvc.v1.Echo/Unary OK")
    assert (ok["kind"], ok["level"], ok["request_id"]) == ("grpc", "info", "rpc-7")
    assert ok["service"] == "echo"
    missing = by_event(lines, "/mikros.testsvc.v1.Echo/Unary UNKNOWN")
    assert NEW_ID.match(missing["request_id"])
    assert (missing["error_kind"], missing["level"]) == ("NotFoundError", "info")


async def test_worker_iterations_get_a_line(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A periodic worker's iterations each get a line; a failed one is an error line."""
    running = await start(
        mikros_service,
        tmp_path,
        WorkerContainer,
        name="ticker",
        types="worker",
        tables={"runtime.worker": {"interval": 1.0}},
    )
    await trio.sleep(2.5)  # three iterations: ok, error, ok
    await running.stop()
    lines = read_lines(log_path(tmp_path, "ticker"))
    iterations = [line for line in lines if line["logger"] == "mikros_trio.access"]
    assert [(line["status"], line["level"]) for line in iterations][:3] == [
        ("ok", "info"),
        ("error", "error"),
        ("ok", "info"),
    ]
    assert iterations[1]["error"] == "ValueError: run 2 failed"
    assert iterations[0]["event"] == "worker ok"
    ticks = [line for line in lines if line["event"] == "tick"]
    assert [tick["run"] for tick in ticks][:3] == [1, 2, 3]


# -- a real process ------------------------------------------------------------------------


def test_worker_example_writes_json_lines_to_stdout(spawn: Spawn) -> None:
    """The worker example, run as a process, writes parseable JSON lines with its identity."""
    child = spawn(
        sys.executable,
        REPO / "examples" / "worker" / "main.py",
        env={"MIKROS_SERVICE_DEPLOY": "prod"},
    )
    child.wait_for('"event":"service ready"')
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.report()
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    assert [line["event"] for line in lines if line["logger"] == "mikros_trio.lifecycle"] == [
        "service ready",
        "service shutdown (SIGTERM)",
        "service stopped (exit code 0)",
    ], child.report()
    # The example's own lines (structlog.get_logger("ticker")) carry the same identity.
    assert {line["logger"] for line in lines} == {"mikros_trio.lifecycle", "ticker"}
    identities = {(line["service"], line["version"], line["deploy_env"]) for line in lines}
    assert identities == {("ticker", "v0.1.0", "prod")}
    assert child.stderr == "", child.report()


def test_a_bad_tracker_header_stops_a_real_process_with_exit_code_2(spawn: Spawn) -> None:
    """A MIKROS_TRACKER_HEADER_NAME no header can have: config error naming it, exit 2."""
    child = spawn(
        sys.executable,
        REPO / "examples" / "worker" / "main.py",
        env={"MIKROS_TRACKER_HEADER_NAME": "x-id\r\nset-cookie: a=b"},
    )
    assert child.wait() == 2, child.report()
    assert "MIKROS_TRACKER_HEADER_NAME" in child.stderr, child.report()
    assert "Traceback" not in child.stderr, child.report()


def test_verbose_keeps_the_event_log_on_stderr(spawn: Spawn) -> None:
    """MIKROS_TRIO_VERBOSE=1 prints the event log on stderr; log lines stay JSON on stdout."""
    child = spawn(
        sys.executable, REPO / "examples" / "worker" / "main.py", env={"MIKROS_TRIO_VERBOSE": "1"}
    )
    child.wait_for("service: ready", stream="stderr")
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.report()
    assert re.search(r"^\[.*\] service: stopped \(exit code 0\)$", child.stderr, re.MULTILINE)
    assert "{" not in child.stderr, child.report()
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    assert lines[-1]["event"] == "service stopped (exit code 0)", child.report()


async def test_verbose_lets_framework_debug_lines_out(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """``--verbose`` shows the framework's debug lines, not other libraries' ones."""
    running = await start(mikros_service, tmp_path)
    framework = logging.getLogger("mikros_trio")
    try:
        show_debug(running.service.telemetry)
        logging.getLogger("mikros_trio.tests").debug("framework detail")
        logging.getLogger("some_library").debug("library detail")
    finally:
        framework.setLevel(logging.NOTSET)
    running.service.telemetry.get(LogPipeline).flush()
    events = {line["event"] for line in read_lines(log_path(tmp_path))}
    assert "framework detail" in events
    assert "library detail" not in events


def test_a_verbose_service_opens_its_logger_to_debug_lines(tmp_path: Path) -> None:
    """``Service(verbose=True)``, as ``--verbose`` builds it: pipeline and framework at debug."""
    framework = logging.getLogger("mikros_trio")
    quiet = Service(Container, service_toml(tmp_path))
    quiet.build()
    assert quiet.telemetry.get(LogPipeline).levelno == logging.INFO
    assert framework.level == logging.NOTSET
    try:
        verbose = Service(Container, service_toml(tmp_path), verbose=True)
        verbose.build()
        assert verbose.telemetry.get(LogPipeline).levelno == logging.DEBUG
        assert framework.level == logging.DEBUG
    finally:
        framework.setLevel(logging.NOTSET)


async def test_request_id_follows_a_call_across_services(
    mikros_service: ServiceStarter,
    examples: Examples,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The gateway example's request id reaches the greeter's access line through gRPC."""
    greeter, gateway = await start_greeter_and_gateway(mikros_service, examples, tmp_path)
    base = f"http://127.0.0.1:{gateway.ports['http']}"
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
            response = await client.get(
                "/hello", params={"name": "Ada"}, headers={"x-request-id": "edge-1"}
            )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "edge-1"
    await gateway.stop()
    await greeter.stop()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    access = {
        line["service"]: line
        for line in lines
        if line.get("logger") == "mikros_trio.access" and line.get("side") is None
    }
    assert access["gateway"]["event"] == "GET /hello 200"
    assert access["greeter"]["event"] == "/greeter.Greeter/SayHello OK"
    assert access["gateway"]["request_id"] == access["greeter"]["request_id"] == "edge-1"


# -- Mikros parity: its [log] keys, its line layout, its environment ----------------------

#: A line of a Mikros Go v0.19.0 script service, re-expressed from its README
#: (mikros-dev/mikros, v0.19.0, README.md, line 114; the fixed attributes are
#: set in service.go, the head by slog's JSON handler in
#: internal/components/logger/logger.go). Only its keys and value shapes matter.
GO_LINE = {
    "time": "2024-02-09T07:54:57.159449-03:00",
    "level": "INFO",
    "msg": "service is running",
    "service.name": "script-example",
    "service.type": "script",
    "service.version": "v1.0.0",
    "service.env": "local",
    "service.product": "Matrix",
    "service.mode": "script",
}

#: The head every Mikros Go line starts with, in that order.
GO_HEAD = list(GO_LINE)[:8]

#: What Go's slog handler writes for the time: RFC 3339, fraction, Z or an offset.
GO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")

#: The script service the Go line came from, as a service.toml here.
SCRIPT = 'name = "script-example"\ntypes = ["script"]\nversion = "v1.0.0"\nproduct = "Matrix"\n'


def test_a_mikros_line_has_the_keys_of_a_go_line(tmp_path: Path) -> None:
    """format = "mikros": a line from each road parses to a Go line's keys, in its order."""
    pipeline, _ = built(tmp_path, '[log]\nformat = "mikros"\n', head=SCRIPT)
    pipeline.open()
    try:
        extra = {"service.mode": "script"}
        pipeline.log(logging.INFO, "service is running", **extra)
        logging.getLogger("tests.go").info("service is running", extra=extra)
        structlog.get_logger("tests.go").info("service is running", **extra)
    finally:
        pipeline.close()
    lines = read_lines(log_path(tmp_path, "unit"))
    assert len(lines) == 3
    for line in lines:
        assert list(line) == list(GO_LINE), line
        assert GO_TIME.match(line["time"]), line["time"]
        assert {key: line[key] for key in GO_LINE if key != "time"} == {
            key: value for key, value in GO_LINE.items() if key != "time"
        }


def test_a_mikros_access_line_starts_as_a_go_line(tmp_path: Path) -> None:
    """The access line's own road (pre-rendered JSON) writes the same head as any other line."""
    pipeline, telemetry = built(
        tmp_path, '[log]\nformat = "mikros"\n', environ={"MIKROS_SERVICE_DEPLOY": "prod"}
    )
    call = telemetry.begin("http", "server", "/items", method="GET", target="/items", headers=[])
    telemetry.end(call, "200")
    pipeline.close()
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert list(line)[:8] == GO_HEAD
    assert (line["level"], line["msg"]) == ("INFO", "GET /items 200")
    assert (line["service.type"], line["service.env"], line["service.product"]) == (
        "worker",
        "prod",
        "",
    )
    assert line["request_id"] == call.ids["request_id"]


@pytest.mark.parametrize(
    ("levelno", "name"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARN"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "FATAL"),
    ],
)
def test_mikros_level_names(tmp_path: Path, levelno: int, name: str) -> None:
    """Levels read as slog and Mikros Go name them (WARN, not WARNING; critical is FATAL)."""
    pipeline, _ = built(tmp_path, '[log]\nformat = "mikros"\nlevel = "debug"\n')
    pipeline.log(levelno, "a line")
    pipeline.close()
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert line["level"] == name


@pytest.mark.parametrize("mode", ["default", "structured", "disabled"])
def test_a_mikros_error_line_has_the_keys_of_a_go_error_line(tmp_path: Path, mode: str) -> None:
    """An exception is Go's error.message, the caller its source, the traceback its stack.

    Go main's handleErrorMessage (internal/components/logger/logger.go)
    adds ``source`` (function, "dir/file", line) to every error line, and
    ``stack`` in its structured mode; components/logger/field.go names the
    error ``error.message``. Here "default" puts the trace in ``stack`` too:
    Go prints it raw after the line, which no JSON log store can read.
    """
    pipeline, _ = built(tmp_path, f'[log]\nformat = "mikros"\nerror_stack_trace = "{mode}"\n')
    pipeline.open()
    try:
        try:
            raise ValueError("bad input")
        except ValueError:
            logging.getLogger("tests.go").exception("it broke")
    finally:
        pipeline.close()
    [line] = read_lines(log_path(tmp_path, "unit"))
    go_keys = {*GO_HEAD, "error.message", "source"} | ({"stack"} if mode != "disabled" else set())
    assert set(line) == go_keys
    assert list(line)[:8] == GO_HEAD
    assert (line["level"], line["msg"], line["error.message"]) == (
        "ERROR",
        "it broke",
        "ValueError: bad input",
    )
    assert line["source"] == {
        "function": "test_logger.test_a_mikros_error_line_has_the_keys_of_a_go_error_line",
        "file": "features/test_logger.py",
        "line": line["source"]["line"],
    }
    assert isinstance(line["source"]["line"], int)
    if mode != "disabled":
        assert line["stack"].startswith("Traceback")
        assert "bad input" in line["stack"]


async def test_every_line_of_a_mikros_service_has_the_go_head(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Lifecycle, access, structlog, stdlib and library lines all start with Go's keys."""
    environ = {"MIKROS_SERVICE_DEPLOY": "prod"}
    running = await start(
        mikros_service,
        tmp_path,
        log={"format": "mikros", "attributes": {"team": "core"}},
        product="Shop",
        environ=environ,
    )
    await get(running, "/work")
    await running.stop()
    lines = read_lines(log_path(tmp_path))
    events = {line["msg"] for line in lines}
    assert {"structlog line", "stdlib line 7", "library line", "GET /work 200"} <= events
    assert "service stopped (exit code 0)" in events
    for line in lines:
        assert list(line)[:9] == [*GO_HEAD, "team"], line
        assert (line["service.name"], line["service.type"], line["service.version"]) == (
            "web",
            "http",
            "1.2.3",
        )
        assert (line["service.env"], line["service.product"]) == ("prod", "Shop")
        assert line["level"] in {"INFO", "WARN"}


async def test_product_and_deploy_env_on_every_line(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """Our layout carries the product and MIKROS_SERVICE_DEPLOY on every line too."""
    environ = {"MIKROS_SERVICE_DEPLOY": "dev"}
    running = await start(mikros_service, tmp_path, product="Shop", environ=environ)
    await get(running, "/work")
    await running.stop()
    lines = read_lines(log_path(tmp_path))
    assert len(lines) > 5
    for line in lines:
        assert list(line)[:8] == [*HEAD, "service", "version", "product", "deploy_env"], line
        assert (line["product"], line["deploy_env"]) == ("Shop", "dev")


def test_an_unset_deploy_env_is_local_as_in_mikros(tmp_path: Path) -> None:
    """Without MIKROS_SERVICE_DEPLOY a line says "local", as in Go and Rust; no product, no key."""
    pipeline, _ = built(tmp_path)
    pipeline.log(logging.INFO, "a line")
    pipeline.close()
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert line["deploy_env"] == "local"
    assert "product" not in line


@pytest.mark.parametrize(
    "table",
    [
        'error_stacktrace = true\nerror_stack_trace = "disabled"',
        'error_stacktrace = false\nerror_stack_trace = "structured"',
    ],
)
def test_contradicting_stack_trace_keys_are_a_config_error(table: str) -> None:
    """Go v0.19.0's and Go main's keys saying opposite things: an error naming both, not a guess."""
    with pytest.raises(ConfigError) as caught:
        parse_definition(UNIT + f"[log]\n{table}\n", environ={})
    text = str(caught.value)
    assert "error_stacktrace" in text
    assert "error_stack_trace" in text


@pytest.mark.parametrize(
    ("table", "zone", "offset"),
    [
        ("local_timestamp = true", "MKT+3", "-03:00"),
        ("local_timestamp = true", "IST-5:30", "+05:30"),
        ("local_timestamp = true", "UTC0", "+00:00"),
        ("", "MKT+3", "Z"),  # the default: the process' time zone does not show
    ],
)
def test_local_timestamp_writes_local_time_and_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, zone: str, offset: str
) -> None:
    """``[log] local_timestamp = true`` (Rust): local time with its offset; UTC otherwise."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        pipeline, _ = built(tmp_path, f"[log]\n{table}\n")
        before = time.time()
        pipeline.log(logging.INFO, "a line")
        pipeline.close()
    finally:
        monkeypatch.undo()
        time.tzset()
    [line] = read_lines(log_path(tmp_path, "unit"))
    stamp = line["timestamp"]
    assert stamp.endswith(offset), stamp
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)", stamp)
    moment = datetime.fromisoformat(stamp).timestamp()
    assert before - 1e-3 <= moment <= before + BOUND


@pytest.mark.parametrize("display", [True, False])
def test_display_errors_decides_whether_the_access_line_shows_the_error(
    tmp_path: Path, display: bool
) -> None:
    """``[log] display_errors = false`` (Rust): the access line shows no error kind nor text."""
    pipeline, telemetry = built(tmp_path, f"[log]\ndisplay_errors = {str(display).lower()}\n")
    call = telemetry.begin("grpc", "server", "/pkg.Svc/Do", target="/pkg.Svc/Do")
    call.error_kind = ErrorKind.INTERNAL
    telemetry.end(call, "INTERNAL", failed=True, error=KeyError("missing"))
    pipeline.close()
    [line] = read_lines(log_path(tmp_path, "unit"))
    assert (line["level"], line["status"]) == ("error", "INTERNAL")
    shown = {key: line[key] for key in ("error", "error_kind") if key in line}
    if display:
        assert shown == {"error": "KeyError: 'missing'", "error_kind": str(ErrorKind.INTERNAL)}
    else:
        assert shown == {}


async def test_tracker_header_names_the_request_id_header(
    mikros_service: ServiceStarter, tmp_path: Path
) -> None:
    """MIKROS_TRACKER_HEADER_NAME: the request id is read from, and echoed in, that header."""
    running = await start(mikros_service, tmp_path, environ=TRACKER)
    kept = await get(running, "/work", headers={"X-Correlation-ID": "corr-1"})
    other = await get(running, "/work", headers={"x-request-id": "ignored-1"})
    await running.stop()
    assert kept.headers["x-correlation-id"] == "corr-1"
    assert "x-request-id" not in kept.headers
    # x-request-id is just another header now: a fresh id, in the configured header.
    assert NEW_ID.match(other.headers["x-correlation-id"])
    lines = read_lines(log_path(tmp_path))
    access = [line for line in lines if line["logger"] == "mikros_trio.access"]
    assert [line["request_id"] for line in access] == ["corr-1", other.headers["x-correlation-id"]]
    handler = [line for line in lines if line.get("event") == "stdlib line 7"]
    assert [line["request_id"] for line in handler] == ["corr-1", access[1]["request_id"]]


def test_tracker_header_defaults_to_x_request_id_when_empty(tmp_path: Path) -> None:
    """An empty MIKROS_TRACKER_HEADER_NAME is unset: Mikros' X-Request-ID."""
    pipeline, telemetry = built(tmp_path, environ={"MIKROS_TRACKER_HEADER_NAME": ""})
    call = telemetry.begin("http", "server", "", headers=[(b"x-request-id", b"r-1")])
    pipeline.close()
    assert call.outgoing == {"x-request-id": "r-1"}


@pytest.mark.parametrize(
    "name",
    ["X Request", "x-id\r\nset-cookie", "grpc-status", "x-trace-bin", ":path", "x" * 65, "ünï"],
)
def test_a_tracker_header_that_cannot_be_a_header_is_a_config_error(
    tmp_path: Path, name: str
) -> None:
    """A name HTTP or gRPC cannot carry (space, CR LF, grpc- prefix, -bin) is refused, named."""
    with pytest.raises(ConfigError) as caught:
        built(tmp_path, environ={"MIKROS_TRACKER_HEADER_NAME": name})
    text = str(caught.value)
    assert "MIKROS_TRACKER_HEADER_NAME" in text
    assert repr(name) in text
