"""``workers = N``: a parent process and N workers, started as users start them.

Every test runs ``mikros-trio run`` of ``tests/assets/workers`` (an HTTP
service whose answers name their process) with real HTTP clients; waits
are bounded by ``PATIENCE``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    GRPC,
    MIKROS_TRIO,
    PATIENCE,
    REPO,
    Child,
    Spawn,
    free_port,
    wait_until_ok,
    wait_until_serving,
)

ASSET = REPO / "tests" / "assets" / "workers"
MAIN = ASSET / "main.py"

#: The asset's shutdown_timeout, and the parent's kill margin past it.
SHUTDOWN_TIMEOUT = 5.0
BOUND = SHUTDOWN_TIMEOUT + 2.0 + 1.0


def start(spawn: Spawn, *args: str, env: dict[str, str] | None = None) -> tuple[Child, int]:
    port = free_port()
    child = spawn(
        MIKROS_TRIO,
        "run",
        MAIN,
        *args,
        env={"MIKROS_HTTP_PORT": str(port), **(env or {})},
    )
    return child, port


def get(port: int, path: str, timeout: float = PATIENCE) -> tuple[int, dict[str, object]]:
    """One request on a connection of its own: the status and the JSON body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def first_answer(port: int, path: str, within: float) -> int:
    """The status of the first request on ``path`` that gets an answer (bounded)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            return get(port, path, timeout=0.5)[0]
        except OSError:
            time.sleep(0.05)  # not listening yet, or queued on a held worker
    pytest.fail(f"no answer on {path} within {within} s")


def workers_of(parent: int) -> set[int]:
    """Pids of the live processes whose parent is ``parent`` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def pids_serving(port: int, want: int, tries: int = 400) -> set[int]:
    """Pids answering ``/pid`` over fresh connections, until ``want`` differ (bounded)."""
    seen: set[int] = set()
    deadline = time.monotonic() + PATIENCE
    for _ in range(tries):
        if len(seen) >= want or time.monotonic() > deadline:
            break
        try:
            status, body = get(port, "/pid", timeout=2.0)
        except OSError:
            continue
        if status == 200:
            seen.add(int(str(body["pid"])))
    return seen


def connection_to(port: int, pid: int) -> http.client.HTTPConnection:
    """A keep-alive connection served by worker ``pid`` (tries fresh ones, bounded)."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=PATIENCE)
        connection.request("GET", "/pid")
        response = connection.getresponse()
        if json.loads(response.read())["pid"] == pid:
            return connection
        connection.close()
    pytest.fail(f"no connection reached worker {pid}")


def ask(connection: http.client.HTTPConnection, path: str) -> tuple[int, dict[str, object]]:
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@pytest.fixture(name="stack")
def fixture_stack() -> Iterator[contextlib.ExitStack]:
    """What a test opens (client connections) is closed at teardown, pass or fail."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture(name="held")
def fixture_held(tmp_path: Path) -> Iterator[Path]:
    """A folder for ``WORKERS_TEST_HOLD``; ``go`` is created at teardown so no worker waits."""
    yield tmp_path
    (tmp_path / "go").touch()


def gone(pids: set[int], timeout: float = PATIENCE) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.02)
    return False


def test_workers_serve_from_their_own_processes(spawn: Spawn) -> None:
    """workers = 2: two children of the parent answer, each from its own pid."""
    child, port = start(spawn)
    wait_until_ok(child, port)
    pids = pids_serving(port, 2)
    assert len(pids) == 2, child.report()
    assert pids == workers_of(child.proc.pid)
    child.wait_for("all 2 workers ready", stream="stderr")


def test_programmatic_run_starts_workers_from_the_script(spawn: Spawn) -> None:
    """``python main.py`` calling mikros_trio.run: workers are started from that file."""
    port = free_port()
    child = spawn(sys.executable, MAIN, env={"MIKROS_HTTP_PORT": str(port)})
    wait_until_ok(child, port)
    assert len(pids_serving(port, 2)) == 2
    child.send(signal.SIGTERM)
    assert child.wait(BOUND) == 0


def test_grpc_service_under_workers(spawn: Spawn) -> None:
    """The gRPC example with --workers 2: health SERVING from both, drained by SIGTERM."""
    port = free_port()
    env = {"MIKROS_GRPC_PORT": str(port), "MIKROS_METRICS_PORT": "0"}
    child = spawn(MIKROS_TRIO, "run", GRPC / "main.py", "--workers", "2", env=env)
    wait_until_serving(child, port)
    child.wait_for("all 2 workers ready", stream="stderr")
    pids = workers_of(child.proc.pid)
    assert len(pids) == 2
    child.send(signal.SIGTERM)
    assert child.wait(PATIENCE + 3.0) == 0
    assert gone(pids)


def test_cli_flag_overrides_the_file(spawn: Spawn) -> None:
    """--workers 1 runs one process (no parent), --workers 3 three workers."""
    one, port = start(spawn, "--workers", "1")
    wait_until_ok(one, port)
    assert pids_serving(port, 2, tries=30) == {one.proc.pid}
    three, port = start(spawn, "--workers", "3")
    wait_until_ok(three, port)
    assert len(workers_of(three.proc.pid)) == 3


def test_zero_is_one_worker_per_cpu(spawn: Spawn) -> None:
    """--workers 0 starts as many workers as CPUs this process may use (a parent if over 1)."""
    cpus = len(os.sched_getaffinity(0))
    child, port = start(spawn, "--workers", "0")
    wait_until_ok(child, port)
    if cpus > 1:
        assert len(workers_of(child.proc.pid)) == cpus
    else:
        assert pids_serving(port, 2, tries=10) == {child.proc.pid}


def test_workers_above_the_bound_is_a_config_error(spawn: Spawn, tmp_path: Path) -> None:
    """[lifecycle] workers = 257 in service.toml: exit 2 naming the key, before anything starts."""
    config = tmp_path / "service.toml"
    text = (ASSET / "service.toml").read_text().replace("workers = 2", "workers = 257")
    config.write_text(text)
    child = spawn(MIKROS_TRIO, "run", MAIN, "--config", config)
    assert child.wait() == 2
    assert "lifecycle.workers" in child.stderr
    assert "Traceback" not in child.stderr


def test_bad_workers_flag_is_a_usage_error(spawn: Spawn) -> None:
    """--workers above the bound exits 2, no traceback."""
    child = spawn(MIKROS_TRIO, "run", MAIN, "--workers", "257")
    assert child.wait() == 2
    assert "expected a number of processes 0-256" in child.stderr
    assert "Traceback" not in child.stderr


def test_ready_only_when_every_worker_is_ready(spawn: Spawn, held: Path) -> None:
    """One worker serves while the other holds its start: /readyz says 503 until both serve."""
    child, port = start(spawn, env={"WORKERS_TEST_HOLD": str(held)})
    # Starting takes its own time on a loaded machine, so answers are
    # counted in a window that opens at the first one.
    statuses = [first_answer(port, "/readyz", PATIENCE)]
    deadline = time.monotonic() + PATIENCE
    while len(statuses) < 5 and time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # queued on the held worker's socket
            statuses.append(get(port, "/readyz", timeout=0.5)[0])
    assert statuses == [503] * 5, child.report()
    assert "workers ready" not in child.stderr
    (held / "go").touch()
    wait_until_ok(child, port)
    child.wait_for("all 2 workers ready", stream="stderr")


def test_killed_worker_is_restarted_and_service_keeps_serving(
    spawn: Spawn, stack: contextlib.ExitStack
) -> None:
    """kill -9 of a worker in the middle of a request: it is replaced, the service serves on."""
    child, port = start(spawn)
    wait_until_ok(child, port)
    first = workers_of(child.proc.pid)
    victim = min(first)
    connection = stack.enter_context(contextlib.closing(connection_to(port, victim)))
    connection.request("GET", "/slow?seconds=5")
    time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)
    with pytest.raises((OSError, http.client.HTTPException)):
        connection.getresponse().read()
    child.wait_for("was killed by SIGKILL; restarting it", stream="stderr")
    wait_until_ok(child, port)
    now = workers_of(child.proc.pid)
    assert len(now) == 2
    assert victim not in now
    assert pids_serving(port, 2) == now
    child.send(signal.SIGTERM)
    assert child.wait(BOUND) == 0


def test_sigterm_drains_every_worker_and_exits_0(spawn: Spawn, stack: contextlib.ExitStack) -> None:
    """SIGTERM: a request in flight on each worker finishes, then the parent exits 0 in time."""
    child, port = start(spawn)
    wait_until_ok(child, port)
    pids = workers_of(child.proc.pid)
    connections = [stack.enter_context(contextlib.closing(connection_to(port, p))) for p in pids]
    for connection in connections:
        connection.request("GET", "/slow?seconds=1")
    time.sleep(0.2)
    sent = child.send(signal.SIGTERM)
    for connection, pid in zip(connections, pids, strict=True):
        response = connection.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["pid"] == pid
        connection.close()
    assert child.wait(BOUND) == 0
    assert time.perf_counter() - sent < BOUND
    assert gone(pids)


def test_worker_that_cannot_stop_is_killed_at_the_bound(spawn: Spawn) -> None:
    """A frozen worker (SIGSTOP: its watchdog cannot run) is killed; exit 124 within the bound."""
    child, port = start(spawn)
    wait_until_ok(child, port)
    frozen, other = sorted(workers_of(child.proc.pid))
    os.kill(frozen, signal.SIGSTOP)
    sent = child.send(signal.SIGTERM)
    assert child.wait(BOUND + 1.0) == 124
    assert SHUTDOWN_TIMEOUT < time.perf_counter() - sent < BOUND
    assert "still running" in child.stderr
    assert gone({frozen, other})


def test_worker_that_cannot_start_ends_the_parent(spawn: Spawn) -> None:
    """A start that fails in every worker: exit 1 with the cause, no restart loop."""
    child, _ = start(spawn, env={"WORKERS_TEST_FAIL_START": "1"})
    assert child.wait(PATIENCE + BOUND) == 1  # the workers' start, their failure, the stop
    giving_up = [line for line in child.stderr.splitlines() if "giving up" in line]
    assert len(giving_up) == 1, child.report()
    assert "the test app refuses to start" in giving_up[0]
    assert "restarting" not in child.stderr


def test_port_in_use_fails_before_any_worker(spawn: Spawn) -> None:
    """An address that cannot be bound: the parent's first line names it, exit 1, no worker."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        child = spawn(MIKROS_TRIO, "run", MAIN, env={"MIKROS_HTTP_PORT": str(port)})
        assert child.wait() == 1
    first = child.stderr.splitlines()[0]
    assert f"cannot listen on 127.0.0.1:{port}" in first, child.report()
    assert "starting 2 workers" not in child.stderr


def test_second_signal_forces_the_exit(spawn: Spawn) -> None:
    """A second SIGTERM while a slow request drains: every worker exits at once, 143."""
    child, port = start(spawn)
    wait_until_ok(child, port)
    pids = workers_of(child.proc.pid)
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=PATIENCE)) as c:
        c.request("GET", "/slow?seconds=30")
        time.sleep(0.2)
        child.send(signal.SIGTERM)
        child.wait_for("shutting down", stream="stderr")
        sent = child.send(signal.SIGTERM)
        assert child.wait(BOUND) == 128 + signal.SIGTERM
        assert time.perf_counter() - sent < 2.0
        assert gone(pids)


def test_metrics_add_up_every_worker(spawn: Spawn) -> None:
    """/metrics on any worker counts the requests of all of them."""
    child, port = start(spawn)
    wait_until_ok(child, port)
    served: dict[int, int] = {}
    for _ in range(40):
        status, body = get(port, "/pid")
        assert status == 200
        pid = int(str(body["pid"]))
        served[pid] = served.get(pid, 0) + 1
    assert len(served) == 2, served  # both took some of the 40
    line = 'http_requests_total{method="GET",route="/pid",status="200"}'
    total = sum(served.values())
    for pid in served:
        # A keep-alive connection on that worker (each try is one more /pid), then its scrape.
        for _ in range(200):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=PATIENCE)
            _, body = ask(connection, "/pid")
            total += 1
            if body["pid"] == pid:
                break
            connection.close()
        # The /pid just answered is counted once its task finishes, which
        # may be after the next request on the connection is read: scrapes
        # (never counted themselves) until it is, bounded.
        for _ in range(50):
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
            counts = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)]
            if counts == [total]:
                break
            time.sleep(0.01)
        connection.close()
        assert counts == [total], text


def test_readiness_turns_off_in_every_worker_when_one_begins_shutdown(
    spawn: Spawn, stack: contextlib.ExitStack
) -> None:
    """SIGTERM to one worker with a request in flight: the other's /readyz says 503 at once."""
    child, port = start(spawn)
    wait_until_ok(child, port)
    stopping, other = sorted(workers_of(child.proc.pid))
    busy = stack.enter_context(contextlib.closing(connection_to(port, stopping)))
    watcher = stack.enter_context(contextlib.closing(connection_to(port, other)))
    assert ask(watcher, "/readyz")[0] == 200
    busy.request("GET", "/slow?seconds=2")
    time.sleep(0.2)
    os.kill(stopping, signal.SIGTERM)
    deadline = time.monotonic() + 1.0
    status, body = 200, {}
    while status == 200 and time.monotonic() < deadline:
        status, body = ask(watcher, "/readyz")
    assert (status, body) == (503, {"status": "waiting for other workers"})
    health = ask(watcher, "/healthz")[1]
    assert health["status"] == "serving"  # the other worker itself still serves
    assert busy.getresponse().status == 200  # the drain finished the request
    # A worker that stopped cleanly ends the service: everything exits 0.
    assert child.wait(BOUND) == 0


def test_sigterm_during_start_exits_cleanly(spawn: Spawn) -> None:
    """SIGTERM while the workers are still starting: exit 0 within the bound, no worker left."""
    child, _ = start(spawn)
    child.wait_for("starting 2 workers", stream="stderr")
    pids = workers_of(child.proc.pid)
    child.send(signal.SIGTERM)
    assert child.wait(BOUND) == 0, child.report()
    assert gone(pids)


def test_signal_storm_ends_in_bounded_time(spawn: Spawn) -> None:
    """Fifty signals of every kind at a starting parent: it exits within the bound, no orphan."""
    child, _ = start(spawn)
    child.wait_for("starting 2 workers", stream="stderr")
    pids = workers_of(child.proc.pid)
    storm = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP] * 17

    def blow() -> None:
        for signum in storm:
            try:
                os.kill(child.proc.pid, signum)
            except ProcessLookupError:
                return
            time.sleep(0.002)

    thread = threading.Thread(target=blow)
    thread.start()
    code = child.wait(BOUND)
    thread.join(PATIENCE)
    assert code in (0, 128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGHUP), (
        child.report()
    )
    assert gone(pids | workers_of(child.proc.pid))
    assert "Traceback" not in child.stderr


def test_workers_stop_when_the_parent_is_killed(spawn: Spawn) -> None:
    """kill -9 of the parent: its workers see their channel close and stop on their own."""
    child, port = start(spawn)
    wait_until_ok(child, port)
    pids = workers_of(child.proc.pid)
    child.proc.kill()
    child.wait()
    assert gone(pids, BOUND)
