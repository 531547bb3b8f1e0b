"""Hostile lifecycle: stuck, shielded and blocking hooks, repeated signals, bad numbers.

Each test starts a real service the way users do (``python main.py`` with a
service.toml beside it, in ``tmp_path``), attacks it with real signals or
hostile hooks, and bounds every wait: a process that outlives its deadline
fails the test instead of the run. The hostile hooks are chosen by the
``HOOK`` environment variable of one shared program, :data:`PROGRAM`.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from helpers import Child, Spawn, log_lines
from mikros_trio._watchdog import EXIT_CODE as WATCHDOG_EXIT
from mikros_trio._watchdog import MARGIN as WATCHDOG_MARGIN

PROGRAM = '''\
"""A worker with one resource whose hooks misbehave as $HOOK says."""

import os
import threading
import time
from pathlib import Path

import trio
from dependency_injector import providers

import mikros_trio
from mikros_trio import Lifetime, ServiceContainer
from mikros_trio.ext import Component, Role

HOOK = os.environ.get("HOOK", "")


async def misbehave(phase: str) -> None:
    if HOOK == f"shielded_{phase}":
        with trio.CancelScope(shield=True):
            await trio.sleep(20)
    elif HOOK == f"blocking_{phase}":
        time.sleep(20)
    elif HOOK == f"slow_{phase}":
        await trio.sleep(20)
    elif HOOK == f"raise_{phase}":
        raise ValueError(f"resource broke in {phase}")
    elif HOOK == f"thread_{phase}":
        threading.Thread(target=time.sleep, args=(20,), name="user-thread").start()


class Resource:
    async def on_start(self) -> None:
        print("resource: on_start", flush=True)
        await misbehave("start")

    async def on_shutdown(self) -> None:
        print("resource: on_shutdown", flush=True)
        await misbehave("stop")


class Twin:
    """Fails in the same tick as Resource when HOOK is raise_start."""

    async def on_start(self) -> None:
        if HOOK == "raise_start":
            raise KeyError("twin broke too")


class Group:
    """Fails with an exception group of two errors when HOOK is group_start."""

    async def on_start(self) -> None:
        if HOOK == "group_start":
            async def fail(error: Exception) -> None:
                raise error

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail, LookupError("first of two"))
                nursery.start_soon(fail, OSError("second of two"))


class Ticker(Component):
    """A Component subclass placed in the container: it must run as itself."""

    role = Role.PROCESSING

    async def run(self, lifetime: Lifetime, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        print("ticker: run", flush=True)
        task_status.started()
        await lifetime.wait_stopping()
        print("ticker: stopped", flush=True)


async def work(lifetime: Lifetime) -> None:
    print("worker: running", flush=True)
    await lifetime.wait_stopping()


class Container(ServiceContainer):
    resource = providers.Singleton(Resource)
    twin = providers.Singleton(Twin)
    group = providers.Singleton(Group)
    ticker = providers.Singleton(Ticker)
    worker = providers.Object(work)


async def main() -> None:
    await mikros_trio.run(Container, Path(__file__).with_name("service.toml"))


if __name__ == "__main__":
    trio.run(main)
'''

#: Deadlines of the service under attack, in seconds.
START_TIMEOUT = 1.0
SHUTDOWN_TIMEOUT = 2.0

SERVICE_TOML = f"""\
name = "hostile"
types = ["worker"]
version = "v0.1.0"

[lifecycle]
start_timeout = {START_TIMEOUT}
drain_timeout = 1.0
shutdown_timeout = {SHUTDOWN_TIMEOUT}
"""

#: Slack for a loaded 2-core machine on top of each deadline.
SLACK = 1.5


def start(spawn: Spawn, tmp_path: Path, hook: str, env: Mapping[str, str] | None = None) -> Child:
    """Write the program and its service.toml into ``tmp_path``; run it with ``HOOK=hook``."""
    (tmp_path / "main.py").write_text(PROGRAM)
    if not (tmp_path / "service.toml").exists():
        (tmp_path / "service.toml").write_text(SERVICE_TOML)
    return spawn(sys.executable, tmp_path / "main.py", env={"HOOK": hook, **(env or {})})


def watchdog_lines(child: Child) -> list[str]:
    """The events of the watchdog's log lines, in order.

    On stdout while the logger runs; on stderr once the shutdown deadline
    has cut the logger too (lines outside any service go there).
    """
    lines = log_lines(child.stdout) + log_lines(child.stderr)
    return [line["event"] for line in lines if "watchdog" in line["event"]]


# -- deadlines are hard -----------------------------------------------------------------


def assert_ended_by_watchdog(child: Child, since: float, limit: float, *words: str) -> None:
    """``child`` exits 124 within ``limit`` s of ``since``; its watchdog lines say ``words``."""
    code = child.wait(timeout=limit + 2)
    elapsed = time.perf_counter() - since
    assert code == WATCHDOG_EXIT, child.report()
    assert elapsed < limit, child.report()
    said = "\n".join(watchdog_lines(child))
    for word in words:
        assert word in said, child.report()


@pytest.mark.parametrize("hook", ["shielded_start", "blocking_start"])
def test_stuck_start_is_ended_by_the_watchdog(spawn: Spawn, tmp_path: Path, hook: str) -> None:
    """A start hook stuck past start_timeout (shielded or blocking) ends the process: exit 124.

    The log names the deadline, the component, its phase and where it is
    stuck: the hook's own line in main.py.
    """
    child = start(spawn, tmp_path, hook)
    child.wait_for("resource: on_start")
    began = time.perf_counter()
    limit = START_TIMEOUT + WATCHDOG_MARGIN + SLACK
    words = ("start_timeout", "resource (starting)", "main.py", "misbehave")
    assert_ended_by_watchdog(child, began, limit, *words)
    assert "worker: running" not in child.stdout, child.report()  # never reported ready


@pytest.mark.parametrize("hook", ["shielded_stop", "blocking_stop"])
def test_stuck_shutdown_is_ended_by_the_watchdog(spawn: Spawn, tmp_path: Path, hook: str) -> None:
    """A stop hook stuck past shutdown_timeout (shielded or blocking) ends the process: exit 124."""
    child = start(spawn, tmp_path, hook)
    child.wait_for("worker: running")
    sent = child.send(signal.SIGTERM)
    limit = SHUTDOWN_TIMEOUT + WATCHDOG_MARGIN + SLACK
    words = ("shutdown_timeout", "resource (stopping)", "main.py", "misbehave")
    assert_ended_by_watchdog(child, sent, limit, *words)


def test_non_daemon_thread_holding_the_exit_is_ended(spawn: Spawn, tmp_path: Path) -> None:
    """A user's non-daemon thread that outlives the shutdown cannot hold the exit past the limit."""
    child = start(spawn, tmp_path, "thread_stop")
    child.wait_for("worker: running")
    sent = child.send(signal.SIGTERM)
    limit = SHUTDOWN_TIMEOUT + WATCHDOG_MARGIN + SLACK
    assert_ended_by_watchdog(child, sent, limit, "non-daemon threads: user-thread")


# -- signals ----------------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["slow_stop", "shielded_stop", "blocking_stop"])
def test_second_sigterm_forces_exit_at_once(spawn: Spawn, tmp_path: Path, hook: str) -> None:
    """A second SIGTERM during a stuck shutdown exits 143 within the margin, saying why."""
    child = start(spawn, tmp_path, hook)
    child.wait_for("worker: running")
    child.send(signal.SIGTERM)
    child.wait_for("resource: on_shutdown")
    sent = child.send(signal.SIGTERM)
    code = child.wait(timeout=WATCHDOG_MARGIN + SLACK + 2)
    elapsed = time.perf_counter() - sent
    # Not killed by the signal (-15): the framework chose the code.
    assert code == 128 + signal.SIGTERM, child.report()
    assert elapsed < WATCHDOG_MARGIN + SLACK, child.report()
    assert "forced exit by SIGTERM" in child.stdout + child.stderr, child.report()


def test_sighup_drains_like_sigterm(spawn: Spawn, tmp_path: Path) -> None:
    """SIGHUP is not fatal: the service drains, runs its stop hooks and exits 0."""
    child = start(spawn, tmp_path, "")
    child.wait_for("worker: running")
    child.send(signal.SIGHUP)
    assert child.wait() == 0, child.report()
    assert "resource: on_shutdown" in child.stdout, child.report()
    assert "ticker: stopped" in child.stdout, child.report()


# -- the root cause is the first error line --------------------------------------------


@pytest.mark.parametrize(
    ("hook", "causes"),
    [
        ("raise_start", ["ValueError: resource broke in start", "KeyError: 'twin broke too'"]),
        ("group_start", ["LookupError: first of two", "OSError: second of two"]),
    ],
)
def test_first_error_line_names_the_users_exception(
    spawn: Spawn, tmp_path: Path, hook: str, causes: list[str]
) -> None:
    """Several failures at once (two components, an exception group): the first error names one.

    Which one comes first is the scheduler's choice; that it is the user's
    own exception, type and message, is the promise.
    """
    child = start(spawn, tmp_path, hook)
    assert child.wait() == 1, child.report()
    errors = [line["event"] for line in log_lines(child.stdout) if line["level"] == "error"]
    assert errors, child.report()
    assert any(cause in errors[0] for cause in causes), child.report()
    assert "ExceptionGroup" not in errors[0], child.report()
    assert "Traceback" not in child.stderr, child.report()


# -- a Component in the container -------------------------------------------------------


def test_component_in_the_container_runs(spawn: Spawn, tmp_path: Path) -> None:
    """A Component subclass provided by the container runs its own run() and stops with SIGTERM."""
    child = start(spawn, tmp_path, "")
    child.wait_for("worker: running")
    assert "ticker: run" in child.stdout, child.report()
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.report()
    assert "ticker: stopped" in child.stdout, child.report()


# -- numbers from the file and the environment ------------------------------------------


@pytest.mark.parametrize(
    ("toml", "env", "named"),
    [
        ("[lifecycle]\ngc_threshold = 9223372036854775808\n", {}, "lifecycle.gc_threshold"),
        ("[lifecycle]\nstart_timeout = 1e300\n", {}, "lifecycle.start_timeout"),
        ("", {"MIKROS_HTTP_PORT": "9" * 5000}, "MIKROS_HTTP_PORT"),
        ("", {"MIKROS_METRICS_PORT": "1" * 5000}, "MIKROS_METRICS_PORT"),
    ],
    ids=["gc_threshold", "start_timeout", "http_port_env", "metrics_port_env"],
)
def test_absurd_numbers_exit_2_without_traceback(
    spawn: Spawn, tmp_path: Path, toml: str, env: dict[str, str], named: str
) -> None:
    """A huge number in service.toml or a port variable: exit 2, a message naming it, no trace."""
    kinds = '["http:0"]' if "HTTP" in named else '["worker"]'
    metrics = "[features.metrics]\nenabled = true\n" if "METRICS" in named else ""
    (tmp_path / "service.toml").write_text(
        f'name = "hostile"\ntypes = {kinds}\nversion = "v0.1.0"\n{metrics}{toml}'
    )
    child = start(spawn, tmp_path, "", env)
    assert child.wait() == 2, child.report()
    assert named in child.stderr, child.report()
    assert "Traceback" not in child.stderr + child.stdout, child.report()
