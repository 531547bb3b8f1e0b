"""``mikros-trio run --reload``: real parent and child processes, real file edits."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from helpers import MIKROS_TRIO, Spawn, write_worker_toml

#: A worker service whose printed lines name the code that runs; ``{version}``
#: is replaced per edit, ``{extra}`` adds code (a hang for the kill test).
SERVICE = """
from dependency_injector import providers

from mikros_trio import Lifetime, ServiceContainer

VERSION = "{version}"
{extra}

class Resource:
    async def on_shutdown(self) -> None:
        print(f"on_shutdown {{VERSION}}", flush=True)


class Job:
    def __init__(self, resource: Resource) -> None:
        self.resource = resource

    async def run(self, lifetime: Lifetime) -> None:
        print(f"serving {{VERSION}}", flush=True)
        await lifetime.wait_stopping()


class Container(ServiceContainer):
    resource = providers.Singleton(Resource)
    worker = providers.Factory(Job, resource=resource)
"""


def write_service(folder: Path, version: str, extra: str = "") -> Path:
    path = folder / "main.py"
    path.write_text(SERVICE.format(version=version, extra=extra))
    return path


def test_reload_restarts_on_edits_drains_and_survives_broken_config(
    spawn: Spawn, tmp_path: Path
) -> None:
    main = write_service(tmp_path, "one")
    config = write_worker_toml(tmp_path)
    good = config.read_text()
    parent = spawn(MIKROS_TRIO, "run", "--reload", main, cwd=tmp_path)
    parent.wait_for("serving one")

    write_service(tmp_path, "two")
    parent.wait_for("serving two")
    out = parent.stdout
    # The old child drained (its shutdown hook ran) before the new one served.
    assert out.index("serving one") < out.index("on_shutdown one") < out.index("serving two")
    parent.wait_for("changed: main.py; restarting", stream="stderr")

    # A broken service.toml: the new child exits 2 with the error, the parent stays.
    config.write_text(good.replace("shutdown_timeout = 3.0", "shutdown_timeout = 99"))
    parent.wait_for("exited with code 2; waiting for a change", stream="stderr")
    assert "on_shutdown two" in parent.stdout
    assert "lifecycle.shutdown_timeout" in parent.stderr
    assert "Traceback" not in parent.stderr
    assert parent.proc.poll() is None

    config.write_text(good)
    write_service(tmp_path, "three")
    parent.wait_for("serving three")
    assert parent.proc.poll() is None

    parent.send(signal.SIGTERM)
    assert parent.wait() == 0, parent.report()
    assert "on_shutdown three" in parent.stdout
    # One child per version: nothing served twice, nothing left behind.
    assert parent.stdout.count("serving three") == 1


def test_reload_ignores_files_it_does_not_watch(spawn: Spawn, tmp_path: Path) -> None:
    main = write_service(tmp_path, "one")
    write_worker_toml(tmp_path)
    parent = spawn(MIKROS_TRIO, "run", "--reload", main, cwd=tmp_path)
    parent.wait_for("serving one")
    for ignored in (".venv", "__pycache__", ".git"):
        (tmp_path / ignored).mkdir()
        (tmp_path / ignored / "x.py").write_text("X = 1\n")
    (tmp_path / "notes.txt").write_text("not source\n")
    # A watched edit afterwards is the first restart: the others did not count.
    write_service(tmp_path, "two")
    parent.wait_for("serving two")
    assert parent.stderr.count("restarting") == 1, parent.report()
    assert "changed: main.py;" in parent.stderr
    parent.send(signal.SIGINT)
    assert parent.wait() == 0, parent.report()


def test_a_child_that_ignores_sigterm_is_killed_after_its_shutdown_bound(
    spawn: Spawn, tmp_path: Path
) -> None:
    # Stuck at import with SIGTERM ignored: the child's own watchdog is not armed yet.
    hang = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    hang += "print('hanging', flush=True)\ntime.sleep(60)\n"
    main = write_service(tmp_path, "one", hang)
    write_worker_toml(tmp_path)  # shutdown_timeout = 3.0: killed 5 s after SIGTERM
    parent = spawn(MIKROS_TRIO, "run", "--reload", main, cwd=tmp_path)
    parent.wait_for("hanging")
    write_service(tmp_path, "two")
    parent.wait_for("serving two", timeout=15)
    assert "after SIGTERM: killed" in parent.stderr
    parent.send(signal.SIGTERM)
    assert parent.wait() == 0, parent.report()


def test_a_second_signal_kills_a_draining_child(spawn: Spawn, tmp_path: Path) -> None:
    # on_shutdown never finishes in time (the watchdog would end it at 3 s).
    main = write_service(tmp_path, "one")
    main.write_text(
        main.read_text().replace(
            'print(f"on_shutdown {VERSION}", flush=True)',
            'print(f"on_shutdown {VERSION}", flush=True)\n'
            "        import trio\n        await trio.sleep(60)",
        )
    )
    write_worker_toml(tmp_path)
    parent = spawn(MIKROS_TRIO, "run", "--reload", main, cwd=tmp_path)
    parent.wait_for("serving one")
    parent.send(signal.SIGINT)
    parent.wait_for("on_shutdown one")
    parent.send(signal.SIGINT)
    assert parent.wait(timeout=2) == 128 + signal.SIGKILL, parent.report()
    assert "SIGINT again: killing the service" in parent.stderr


def test_reload_refuses_workers(spawn: Spawn, tmp_path: Path) -> None:
    main = write_service(tmp_path, "one")
    write_worker_toml(tmp_path)
    parent = spawn(MIKROS_TRIO, "run", "--reload", "--workers", "2", main, cwd=tmp_path)
    assert parent.wait() == 2
    assert "cannot be combined with --workers" in parent.stderr
    assert "Traceback" not in parent.stderr


def test_a_syntax_error_waits_for_the_fix(spawn: Spawn, tmp_path: Path) -> None:
    main = write_service(tmp_path, "one")
    write_worker_toml(tmp_path)
    parent = spawn(MIKROS_TRIO, "run", "--reload", main, cwd=tmp_path)
    parent.wait_for("serving one")
    main.write_text(main.read_text() + "\ndef broken(:\n")
    parent.wait_for("exited with code 2; waiting for a change", stream="stderr")
    assert "SyntaxError" in parent.stderr
    assert "Traceback" not in parent.stderr
    write_service(tmp_path, "two")
    parent.wait_for("serving two")
    # Stopped while a fixed child runs: that child's graceful exit code.
    parent.send(signal.SIGTERM)
    assert parent.wait() == 0, parent.report()
    assert "on_shutdown two" in parent.stdout


def test_a_signal_while_waiting_for_a_fix_exits_with_the_last_code(
    spawn: Spawn, tmp_path: Path
) -> None:
    main = write_service(tmp_path, "one")
    config = write_worker_toml(tmp_path)
    config.write_text(config.read_text().replace("drain_timeout = 1.0", "drain_timeout = -1"))
    parent = spawn(MIKROS_TRIO, "run", "--reload", main, cwd=tmp_path)
    parent.wait_for("exited with code 2; waiting for a change", stream="stderr")
    assert "lifecycle.drain_timeout" in parent.stderr
    parent.send(signal.SIGINT)
    assert parent.wait() == 2, parent.report()


def test_ctrl_c_to_the_terminal_group_drains_the_child_once(spawn: Spawn, tmp_path: Path) -> None:
    # A terminal's Ctrl-C signals its whole foreground group. setsid gives
    # the parent a group of its own so the test can do the same to it alone.
    main = write_service(tmp_path, "one")
    write_worker_toml(tmp_path)
    parent = spawn("setsid", MIKROS_TRIO, "run", "--reload", main, cwd=tmp_path)
    parent.wait_for("serving one")
    os.killpg(parent.proc.pid, signal.SIGINT)
    # Had the child received it twice (from the terminal and the parent), it
    # would have been forced (130) instead of draining to 0.
    assert parent.wait() == 0, parent.report()
    assert "on_shutdown one" in parent.stdout
