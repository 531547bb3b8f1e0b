"""Running the examples and the CLI as real processes: bounded waits, no leaked pipes."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import pytest

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
