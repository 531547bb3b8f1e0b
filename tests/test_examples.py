"""The examples, started for real the way users start them, and stopped by signals.

Each test runs a child process from the repository root, waits for the
line that says the service is up (never a blind sleep), then signals it and
checks the exit code and the order of what it printed. Every wait is
bounded, so a service that hangs fails its test instead of the run.
"""

from __future__ import annotations

import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import MIKROS_TRIO, REPO, Spawn, event_names, events_of

WORKER = REPO / "examples" / "worker"
SCRIPT = REPO / "examples" / "script"


def _edited(source: Path, target: Path, **values: str) -> Path:
    """Write ``source`` to ``target`` with each ``key = ...`` line set to ``values[key]``."""
    text = source.read_text()
    for key, value in values.items():
        text, count = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
        assert count == 1, f"{source} has no single {key!r} line to edit"
    target.write_text(text)
    return target


# -- worker -------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_worker_stops_cleanly_on_signal(spawn: Spawn, signum: signal.Signals) -> None:
    """A signal drains the worker, then runs the counter's stop hook once, and exits 0."""
    child = spawn(sys.executable, WORKER / "main.py")
    child.wait_for('"event":"ticker running"')
    child.send(signum)
    assert child.wait() == 0, child.report()
    # The example logs through the logger feature: JSON lines, nothing printed beside them.
    assert event_names(child.stdout, "ticker") == [
        "counter started",
        "ticker running",
        "ticker drained",
        "counter stopped",
    ], child.report()
    stopped = events_of(child.stdout, "ticker")[-1]
    assert stopped["jobs"] >= 1, child.report()
    assert stopped["service"] == "ticker", child.report()  # the logger feature's fields
    assert all(line.startswith("{") for line in child.stdout.splitlines()), child.report()
    assert "Traceback" not in child.stderr


def test_worker_hanging_stop_hook_is_cut(spawn: Spawn, tmp_path: Path) -> None:
    """A stop hook that never returns is cut at its deadline; the process exits 0 by itself."""
    main = tmp_path / "hanging.py"
    main.write_text(
        textwrap.dedent(
            f"""\
            import sys

            sys.path.insert(0, {str(WORKER)!r})

            import trio
            from dependency_injector import providers

            import mikros_trio
            from main import Container, Counter


            class HangingCounter(Counter):
                async def on_shutdown(self) -> None:
                    print("counter: hanging", flush=True)
                    await trio.sleep_forever()


            async def main() -> None:
                container = Container()
                container.counter.override(providers.Singleton(HangingCounter))
                await mikros_trio.run(container, {str(WORKER / "service.toml")!r})


            trio.run(main)
            """
        )
    )
    child = spawn(sys.executable, main, env={"MIKROS_TRIO_VERBOSE": "1"})
    child.wait_for('"event":"ticker running"')
    sent = child.send(signal.SIGTERM)
    child.wait_for("counter: hanging")
    # service.toml: drain_timeout 2 s, shutdown_timeout 5 s. The bound is
    # generous on purpose: it pins "exits by itself", not a speed.
    code = child.wait(timeout=8.0)
    elapsed = time.perf_counter() - sent
    assert elapsed < 8.0
    # Timeouts are warnings, not failures: only an exception earns exit 1.
    assert code == 0, child.report()
    assert re.search(r"^\[.*\] counter: cut \(", child.stderr, re.MULTILINE), child.report()
    assert "counter did not finish" in child.stdout, child.report()  # a JSON log line


def test_worker_second_sigint_forces_exit(spawn: Spawn, tmp_path: Path) -> None:
    """A second SIGINT during a slow drain exits at once with 128 + SIGINT and no more hooks."""
    config = _edited(
        WORKER / "service.toml",
        tmp_path / "service.toml",
        job_seconds="30",
        drain_timeout="20",
        shutdown_timeout="25",
    )
    child = spawn(MIKROS_TRIO, "run", "examples/worker/main.py", "--config", config, "--verbose")
    child.wait_for('"event":"ticker running"')
    child.send(signal.SIGINT)
    # The first signal has been handled once the shutdown is logged.
    child.wait_for("service: shutdown (SIGINT)", stream="stderr")
    sent = child.send(signal.SIGINT)
    code = child.wait(timeout=5.0)
    assert time.perf_counter() - sent < 5.0  # the drain timeout is 20 s
    assert code == 128 + signal.SIGINT, child.report()
    assert "service: forced (SIGINT)" in child.stderr, child.report()
    assert event_names(child.stdout, "ticker") == ["counter started", "ticker running"]


# -- a start that fails ---------------------------------------------------------

FAILING_START = '''\
"""cache <- database <- reporter <- worker; the database cannot start."""

from pathlib import Path

import trio
from dependency_injector import providers

import mikros_trio
from mikros_trio import ServiceContainer


class Cache:
    async def on_start(self) -> None:
        print("cache: on_start", flush=True)

    async def on_shutdown(self) -> None:
        print("cache: on_shutdown", flush=True)


class Database:
    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    async def on_start(self) -> None:
        raise RuntimeError("db down")

    async def on_shutdown(self) -> None:
        print("database: on_shutdown", flush=True)


class Reporter:
    depends_on = ("database",)  # declared, not wired

    async def on_start(self) -> None:
        print("reporter: on_start", flush=True)

    async def on_shutdown(self) -> None:
        print("reporter: on_shutdown", flush=True)


class Loop:
    async def run(self, lifetime: mikros_trio.Lifetime) -> None:
        print("worker: running", flush=True)
        await lifetime.wait_stopping()


class Container(ServiceContainer):
    cache = providers.Singleton(Cache)
    database = providers.Singleton(Database, cache=cache)
    reporter = providers.Singleton(Reporter)
    worker = providers.Factory(Loop)


async def main() -> None:
    await mikros_trio.run(Container, Path(__file__).with_name("service.toml"))


if __name__ == "__main__":
    trio.run(main)
'''


def test_failed_start_stops_what_started(spawn: Spawn, tmp_path: Path) -> None:
    """A failing start hook: what started stops, the rest never starts, exit 1, cause first."""
    (tmp_path / "main.py").write_text(FAILING_START)
    (tmp_path / "service.toml").write_text(
        'name = "failing-start"\ntypes = ["worker"]\nversion = "v0.1.0"\n'
    )
    child = spawn(sys.executable, tmp_path / "main.py")
    assert child.wait() == 1, child.report()
    printed = [line for line in child.stdout.splitlines() if not line.startswith("{")]
    assert printed == ["cache: on_start", "cache: on_shutdown"], child.report()
    first_error = next(
        (line for line in child.stdout.splitlines() if '"level":"error"' in line), None
    )
    assert first_error is not None, child.report()
    assert "database" in first_error, child.report()
    assert "db down" in first_error, child.report()


# -- script -------------------------------------------------------------------


def test_script_within_limit_exits_0(spawn: Spawn) -> None:
    """The script example with its own service.toml logs its verdict and exits 0."""
    child = spawn(sys.executable, SCRIPT / "main.py")
    assert child.wait() == 0, child.report()
    [verdict] = events_of(child.stdout, "budget")
    assert verdict["event"] == "budget checked", child.report()
    assert (verdict["total"], verdict["limit"], verdict["verdict"]) == (242.75, 500.0, "within")
    assert all(line.startswith("{") for line in child.stdout.splitlines()), child.report()


def test_script_over_limit_exits_3(spawn: Spawn, tmp_path: Path) -> None:
    """A limit below the total makes the script return 3, which becomes the exit code."""
    config = _edited(SCRIPT / "service.toml", tmp_path / "service.toml", limit="100.0")
    child = spawn(MIKROS_TRIO, "run", "examples/script/main.py", "--config", config)
    assert child.wait() == 3, child.report()
    [verdict] = events_of(child.stdout, "budget")
    assert (verdict["limit"], verdict["verdict"]) == (100.0, "over"), child.report()


def test_script_error_exits_1_and_logs_it(spawn: Spawn, tmp_path: Path) -> None:
    """A script that raises exits 1 with the error in a JSON log line and no bare traceback."""
    config = _edited(SCRIPT / "service.toml", tmp_path / "service.toml", expenses="[]")
    child = spawn(MIKROS_TRIO, "run", "examples/script/main.py", "--config", config)
    assert child.wait() == 1, child.report()
    logged = [line for line in child.stdout.splitlines() if line.startswith("{")]
    assert any("ValueError: no expenses to check" in line for line in logged), child.report()
    printed = [line for line in child.stdout.splitlines() if not line.startswith("{")]
    assert not any("Traceback" in line for line in printed), child.report()
    assert "Traceback" not in child.stderr, child.report()


def test_script_cut_by_sigterm_exits_143(spawn: Spawn, tmp_path: Path) -> None:
    """SIGTERM cancels a script mid-run at once; the exit code is 128 + SIGTERM."""
    source = SCRIPT / "service.toml"
    config = tmp_path / "service.toml"
    text, count = re.subn(r"(?m)^\[service\]$", "[service]\npause = 30", source.read_text())
    assert count == 1
    config.write_text(text)
    child = spawn(MIKROS_TRIO, "run", "examples/script/main.py", "--config", config, "--verbose")
    child.wait_for("service: ready", stream="stderr")
    sent = child.send(signal.SIGTERM)
    code = child.wait(timeout=5.0)
    assert time.perf_counter() - sent < 5.0  # the pause is 30 s
    assert code == 128 + signal.SIGTERM, child.report()
    assert events_of(child.stdout, "budget") == [], child.report()  # it never got to answer
