"""``mikros-trio run --reload``: restart the service whenever its source changes.

The parent process never imports the service. It runs ``mikros-trio run``
(the same command without ``--reload``) as a child, watches the target's
folder and its service.toml with watchfiles (on Trio through anyio), and on
a change stops the child the way Kubernetes would (SIGTERM, so it drains)
before starting a new one. A fresh process per change, rather than
re-importing in place, means no module state survives a reload and a
broken edit can only break the child: its error (a config error exits 2)
is printed and the parent waits for the next change.

The child runs in its own process group, so Ctrl-C in a terminal reaches
only the parent, which passes it on once; a second SIGINT or SIGTERM to the
parent kills the child at once. A child that outlives its own
``shutdown_timeout`` plus :data:`KILL_MARGIN` (its watchdog should have
ended it by then) is killed.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tomllib
from collections.abc import AsyncIterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ._definition import LifecycleSettings

if TYPE_CHECKING:  # watchfiles brings anyio; both load only with --reload
    import anyio

__all__ = ["run_reloading"]

#: Seconds past the child's shutdown_timeout before it is killed: its own
#: watchdog exits at shutdown_timeout, this only catches a wedged process.
KILL_MARGIN = 2.0
#: The schema's default and bounds, used to read the value without validating the file.
_SHUTDOWN = next(f for f in fields(LifecycleSettings) if f.name == "shutdown_timeout")
_WATCHED_SUFFIXES = (".py", ".toml")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_reloading(args: argparse.Namespace) -> int:
    """The ``--reload`` branch of ``mikros-trio run``; returns the exit code."""
    try:
        import watchfiles  # noqa: F401 (checked here, used by the watcher task)
    except ImportError:
        print(
            "mikros-trio: --reload needs watchfiles: pip install 'mikros-trio[dev]'",
            file=sys.stderr,
        )
        return 2
    if args.workers is not None:
        print(
            "mikros-trio: --reload runs one process; it cannot be combined with --workers",
            file=sys.stderr,
        )
        return 2
    spec = args.target.partition(":")[0]
    folder = Path(spec).parent if spec.endswith(".py") or Path(spec).is_file() else Path()
    config = args.config if args.config is not None else folder / "service.toml"
    command = [sys.executable, "-m", "mikros_trio.cli", "run", args.target, "--config", str(config)]
    if args.verbose:
        command.append("--verbose")
    return trio.run(_supervise, command, folder.resolve(), config.resolve())


def _shutdown_bound(config: Path) -> float:
    """The child's ``[lifecycle] shutdown_timeout`` plus the margin, read now."""
    try:
        with open(config, "rb") as file:
            value = tomllib.load(file).get("lifecycle", {}).get("shutdown_timeout")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        value = None
    # The child validates the value; here anything odd falls back to the default.
    bounds = _SHUTDOWN.metadata
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not bounds["gt"] < value < bounds["lt"]
    ):
        value = _SHUTDOWN.default
    return float(value) + KILL_MARGIN


def _exit_code(process: trio.Process) -> int:
    code = process.returncode
    assert code is not None
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says


def _say(message: str) -> None:
    print(f"mikros-trio: reload: {message}", file=sys.stderr, flush=True)


async def _watch(
    folder: Path, config: Path, send: trio.MemorySendChannel[tuple[str, object]], stop: anyio.Event
) -> None:
    import watchfiles

    ignored = watchfiles.DefaultFilter()  # .git, __pycache__, .venv and the like

    def relevant(change: watchfiles.Change, path: str) -> bool:
        return Path(path) == config or (path.endswith(_WATCHED_SUFFIXES) and ignored(change, path))

    roots = {folder, config.parent}
    async for changes in watchfiles.awatch(
        *roots, watch_filter=relevant, debounce=400, stop_event=stop
    ):
        names = sorted({Path(path).name for _, path in changes})
        send.send_nowait(("change", ", ".join(names)))


async def _supervise(command: Sequence[str], folder: Path, config: Path) -> int:
    # One channel for everything the loop reacts to; unbounded because the
    # watcher and the signal task must never block on a busy loop.
    send, events = trio.open_memory_channel[tuple[str, object]](math.inf)
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            # The watcher's thread is not cancellable; this event ends its wait.
            import anyio

            stop = anyio.Event()
            nursery.start_soon(_watch, folder, config, send, stop)
            nursery.start_soon(_forward_signals, signals, send)
            _say(f"watching {folder} and {config.name} (.py, .toml); Ctrl-C stops")
            code = await _loop(command, config, nursery, send, events)
            stop.set()
            nursery.cancel_scope.cancel()
    return code


async def _forward_signals(
    signals: AsyncIterator[int], send: trio.MemorySendChannel[tuple[str, object]]
) -> None:
    async for signum in signals:
        send.send_nowait(("signal", signum))


async def _loop(
    command: Sequence[str],
    config: Path,
    nursery: trio.Nursery,
    send: trio.MemorySendChannel[tuple[str, object]],
    events: trio.MemoryReceiveChannel[tuple[str, object]],
) -> int:
    child: trio.Process | None = await _start(command, nursery, send)
    last = 0
    async for kind, value in events:
        if kind == "signal":
            if child is None:
                return last
            return (await _stop(child, config, events, value))[0]  # type: ignore[arg-type]
        if kind == "change":
            _say(f"changed: {value}; restarting")
            if child is not None:
                code, interrupted = await _stop(child, config, events, signal.SIGTERM)
                if interrupted:  # stopped by the user while it drained: no restart
                    return code
            child = await _start(command, nursery, send)
        elif kind == "exit" and value is child:
            assert child is not None
            last = _exit_code(child)
            _say(f"service exited with code {last}; waiting for a change")
            child = None
    raise AssertionError("the event channel closed")


async def _start(
    command: Sequence[str], nursery: trio.Nursery, send: trio.MemorySendChannel[tuple[str, object]]
) -> trio.Process:
    # Its own process group: a terminal's Ctrl-C reaches the parent alone,
    # which passes it on once (twice would force the child's exit).
    # No .pyc from the child: an edit in the same second that keeps the
    # file's size would otherwise load the stale bytecode on restart.
    environ = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    process = await trio.lowlevel.open_process(list(command), process_group=0, env=environ)

    async def report_exit() -> None:
        await process.wait()
        send.send_nowait(("exit", process))

    nursery.start_soon(report_exit)
    return process


async def _stop(
    child: trio.Process,
    config: Path,
    events: trio.MemoryReceiveChannel[tuple[str, object]],
    signum: signal.Signals,
) -> tuple[int, bool]:
    """Drain ``child`` with ``signum``, bounded; a user signal meanwhile kills it.

    Returns the exit code and whether a user signal came while it drained.
    """
    child.send_signal(signum)
    with trio.move_on_after(_shutdown_bound(config)) as bound:
        async for kind, value in events:
            if kind == "exit" and value is child:
                return _exit_code(child), False
            if kind == "signal":
                _say(f"{signal.Signals(value).name} again: killing the service")  # type: ignore[arg-type]
                child.kill()
                await child.wait()
                return _exit_code(child), True
            # Changes while it drains: the restart that follows picks them up.
    if bound.cancelled_caught:
        _say(f"service still running {_shutdown_bound(config):g} s after {signum.name}: killed")
    child.kill()
    await child.wait()
    return _exit_code(child), False
