"""A throwaway PostgreSQL cluster for tests and benchmarks (standard library only).

The test suite and ``bench/postgres.py`` both need a real server they can
start and remove, so the code lives in one importable place: here, beside
the pool it exercises, rather than in the test helpers (which the bench must
not import) or in ``bench/`` (which the tests must not import).

The binaries are Debian's (``/usr/lib/postgresql/<version>/bin``, the newest
version wins). ``initdb`` and ``postgres`` refuse to run as root, so under
root they run as the ``postgres`` system user, in a temporary directory
chowned to it. The cluster listens on 127.0.0.1 only, with trust
authentication and its unix sockets in that directory; durability is off
(``fsync``, ``synchronous_commit``, ``full_page_writes``): it is thrown away.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["MISSING", "Cluster", "binaries"]

#: What to do when no server binaries are found (the tests fail with it, never skip).
MISSING = "install PostgreSQL (Debian package postgresql): no /usr/lib/postgresql/*/bin/initdb"

#: The cluster's superuser, whoever runs it.
SUPERUSER = "postgres"

#: Bounds, in seconds: start (initdb is not counted), stop, one admin statement.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
STATEMENT_TIMEOUT = 30.0


def binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``, or None."""
    found: list[tuple[int, Path]] = []
    for directory in Path("/usr/lib/postgresql").glob("*/bin"):
        version = directory.parent.name
        if version.isdigit() and (directory / "initdb").exists():
            found.append((int(version), directory))
    return max(found)[1] if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Cluster:
    """One throwaway cluster: ``start()`` initialises and starts it, ``remove()`` undoes both.

    ``host``/``port``/``user`` say where it listens and who the superuser
    is; :meth:`dsn` builds a libpq URL for a database in it. :meth:`stop`
    and :meth:`start` may be called again to take the server away and bring
    it back on the same port and data (what a pool's reconnect test needs).
    Also a context manager: the cluster is removed on exit, whatever
    happened.
    """

    host = "127.0.0.1"
    user = SUPERUSER

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir or binaries()
        if found is None:
            raise FileNotFoundError(MISSING)
        self.bindir = found
        self.directory = Path(tempfile.mkdtemp(prefix="mikros-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        self.port = 0
        # initdb and postgres refuse root: run them as the system user then.
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            owner = pwd.getpwnam(SUPERUSER)
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self._as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        self._initialised = False

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def dsn(self, dbname: str = "postgres", **params: str) -> str:
        """A libpq URL for ``dbname`` on this cluster; ``params`` become query parameters."""
        query = "&".join(f"{key}={value}" for key, value in params.items())
        url = f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"
        return f"{url}?{query}" if query else url

    def _run(self, program: str, *args: str, timeout: float) -> str:
        done = subprocess.run(
            [str(self.bindir / program), *args],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"},
            **self._as,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}{self._log_tail()}"
            )
        output: str = done.stdout
        return output

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\nserver log:\n" + self.log.read_text(errors="replace")[-4000:]
        return ""

    def start(self) -> None:
        """Initialise the data directory (first time) and start the server; returns when ready."""
        if not self._initialised:
            self._run(
                "initdb",
                "--pgdata",
                str(self.data),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-sync",
                timeout=START_TIMEOUT,
            )
            self._initialised = True
        # A free port can be taken between probing and binding: try a few.
        for attempt in range(5):
            port = self.port or _free_port()
            options = " ".join(
                [
                    f"-p {port}",
                    f"-k {self.directory}",
                    "-c listen_addresses=127.0.0.1",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                ]
            )
            try:
                self._run(
                    "pg_ctl",
                    "start",
                    "--pgdata",
                    str(self.data),
                    "--wait",
                    "--timeout",
                    str(int(START_TIMEOUT)),
                    "--log",
                    str(self.log),
                    "-o",
                    options,
                    timeout=START_TIMEOUT + 5,
                )
            except RuntimeError:
                if self.port or attempt == 4:
                    raise
                continue
            self.port = port
            return

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate); the data directory stays."""
        if self.running():
            self._run(
                "pg_ctl",
                "stop",
                "--pgdata",
                str(self.data),
                "--mode",
                mode,
                "--wait",
                "--timeout",
                str(int(STOP_TIMEOUT)),
                timeout=STOP_TIMEOUT + 5,
            )

    def running(self) -> bool:
        """Whether a postmaster runs on this data directory (its pid file names a live process)."""
        pid = self._postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    def remove(self) -> None:
        """Stop the server however it takes (kill as a last resort) and delete its directory."""
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pid = self._postmaster_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + STOP_TIMEOUT
                while self.running() and time.monotonic() < deadline:
                    time.sleep(0.05)
        shutil.rmtree(self.directory, ignore_errors=True)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with psql as the superuser; returns the unaligned, tuples-only output."""
        return self._run(
            "psql",
            "--no-psqlrc",
            "--quiet",
            "--tuples-only",
            "--no-align",
            "--set",
            "ON_ERROR_STOP=1",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--username",
            self.user,
            "--dbname",
            dbname,
            "--command",
            sql,
            timeout=STATEMENT_TIMEOUT,
        ).strip()

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name`` (a plain identifier); returns its DSN."""
        if not name.isidentifier():
            raise ValueError(f"database name must be a plain identifier, got {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE IF EXISTS name WITH (FORCE)``: its sessions are terminated first."""
        if not name.isidentifier():
            raise ValueError(f"database name must be a plain identifier, got {name!r}")
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
