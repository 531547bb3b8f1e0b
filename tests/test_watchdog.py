"""The watchdog: deadline logic on an injected clock, last words bounded, the real thread."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import NoReturn

import pytest
from dependency_injector import providers

from mikros_trio import Service, ServiceContainer
from mikros_trio._service import _flush_logs
from mikros_trio._watchdog import LAST_WORDS_LIMIT, Alarm, Watchdog
from mikros_trio.ext import Telemetry


class Exited(Exception):
    """What the injected exit raises instead of ending the test process."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def raise_exited(code: int) -> NoReturn:
    raise Exited(code)


def park() -> NoReturn:
    """What a fake exit does on the watchdog's thread: stop there for good (a daemon thread).

    Raising would end the thread with an exception, which pytest reports.
    """
    threading.Event().wait()
    raise AssertionError("unreachable")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_due_only_after_deadline_plus_margin() -> None:
    """An alarm armed for 5 s with a 1 s margin is due at 6 s, not before; disarm forgets it."""
    clock = FakeClock()
    watchdog = Watchdog(clock=clock, exit=raise_exited, margin=1.0)
    assert watchdog.due() is None
    watchdog.arm(5.0, 124, "start_timeout")
    clock.now += 5.9
    assert watchdog.due() is None
    clock.now += 0.1
    assert watchdog.due() == Alarm(106.0, 124, "start_timeout")
    watchdog.disarm()
    assert watchdog.due() is None


def test_sooner_keeps_an_earlier_alarm() -> None:
    """arm(sooner=True) never postpones: an earlier alarm stays, a later one is replaced."""
    clock = FakeClock()
    watchdog = Watchdog(clock=clock, exit=raise_exited, margin=1.0)
    watchdog.arm(2.0, 124, "start")
    watchdog.arm(9.0, 124, "shutdown", sooner=True)
    assert watchdog.alarm == Alarm(103.0, 124, "start")
    watchdog.arm(0.0, 143, "forced exit by SIGTERM", sooner=True)
    assert watchdog.alarm == Alarm(101.0, 143, "forced exit by SIGTERM")
    watchdog.arm(9.0, 124, "shutdown")  # without sooner: replaced
    assert watchdog.alarm == Alarm(110.0, 124, "shutdown")


def test_fire_logs_report_flushes_and_exits_with_the_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """fire() logs why and each stuck line, flushes, then exits with the alarm's code."""
    watchdog = Watchdog(exit=raise_exited)
    flushed: list[bool] = []
    watchdog.report = lambda: ["db (stopping) at main.py:3 in on_shutdown"]
    watchdog.flush = lambda: flushed.append(True)
    with caplog.at_level(logging.CRITICAL, "mikros_trio"), pytest.raises(Exited) as exited:
        watchdog.fire(Alarm(0.0, 124, "shutdown_timeout (2 s) passed since SIGTERM"))
    assert exited.value.code == 124
    assert flushed == [True]
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("watchdog: shutdown_timeout (2 s) passed since SIGTERM;")
    assert messages[0].endswith("exit code 124")
    assert messages[1] == "watchdog: still running: db (stopping) at main.py:3 in on_shutdown"


def test_fire_exits_even_if_last_words_hang_or_raise() -> None:
    """A report that raises and a flush that hangs cannot hold the exit past LAST_WORDS_LIMIT."""
    hang = threading.Event()
    watchdog = Watchdog(exit=raise_exited)

    def broken() -> list[str]:
        raise RuntimeError("report broke")

    watchdog.report = broken
    watchdog.flush = hang.wait
    began = time.monotonic()
    try:
        with pytest.raises(Exited):
            watchdog.fire(Alarm(0.0, 124, "stuck"))
        assert time.monotonic() - began < LAST_WORDS_LIMIT + 0.5
    finally:
        hang.set()


def test_thread_acts_on_its_own() -> None:
    """Started and armed, the thread ends the 'process' after delay + margin with no help."""
    exited: list[int] = []
    done = threading.Event()

    def record(code: int) -> NoReturn:
        exited.append(code)
        done.set()
        park()

    watchdog = Watchdog(exit=record, margin=0.05)
    watchdog.report = list
    watchdog.flush = lambda: None
    watchdog.start()
    watchdog.start()  # idempotent
    began = time.monotonic()
    watchdog.arm(0.05, 124, "test")
    assert done.wait(5.0)
    assert exited == [124]
    assert time.monotonic() - began >= 0.1


def test_disarmed_thread_stays_quiet() -> None:
    """Re-armed then disarmed before its deadline, the thread never acts."""
    exited: list[int] = []

    def record(code: int) -> NoReturn:
        exited.append(code)
        park()

    watchdog = Watchdog(exit=record, margin=0.05)
    watchdog.flush = lambda: None
    watchdog.start()
    watchdog.arm(0.05, 124, "test")
    watchdog.disarm()
    time.sleep(0.3)
    assert exited == []


class Buffered:
    """A feature's object holding lines until flushed (as the logger's pipeline does)."""

    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


class Handler(logging.Handler):
    """A root logging handler that counts its flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def emit(self, record: logging.LogRecord) -> None:
        pass

    def flush(self) -> None:
        self.flushes += 1


def test_last_flush_reaches_published_objects_and_logging_handlers() -> None:
    """The watchdog's flush empties what the hub's objects and the root handlers buffer."""
    telemetry = Telemetry("svc")
    buffered = Buffered()
    telemetry.publish(buffered)
    telemetry.publish("an object without flush")
    handler = Handler()
    logging.getLogger().addHandler(handler)
    try:
        _flush_logs(telemetry)
    finally:
        logging.getLogger().removeHandler(handler)
    assert buffered.flushes == 1
    assert handler.flushes == 1


def test_only_a_process_owning_service_has_a_watchdog(tmp_path: Path) -> None:
    """Service(handle_signals=True) gives its supervisor a watchdog; an in-process one has none."""
    config = tmp_path / "service.toml"
    config.write_text('name = "svc"\ntypes = ["worker"]\nversion = "v1.0.0"\n')

    class Container(ServiceContainer):
        worker = providers.Object(lambda: None)

    owned = Service(Container, config, handle_signals=True).supervisor
    assert isinstance(owned._watchdog, Watchdog)
    assert Service(Container, config).supervisor._watchdog is None
