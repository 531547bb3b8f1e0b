"""The worker kind: a loop cut at the drain deadline; a periodic job's idle, backoff, health."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from dependency_injector import providers

from helpers import BOUND, HttpContainer, RedisServer, toml_text
from mikros_trio import ConfigError, Lifetime, Service, ServiceContainer, redis
from mikros_trio._runtime_settings import _WEEK
from mikros_trio.features.tracing import Tracing
from mikros_trio.testing import RunningService, ServiceStarter
from mikros_trio.worker import WorkerComponent

TOML = """
name = "w"
types = ["{kind}"]
version = "v1.0.0"
[lifecycle]
drain_timeout = 2.0
shutdown_timeout = 5.0
"""


def write(tmp_path: Path, kind: str = "worker") -> Path:
    path = tmp_path / "service.toml"
    path.write_text(TOML.format(kind=kind))
    return path


class Polite:
    """Finishes its iteration and returns once shutdown starts."""

    def __init__(self) -> None:
        self.saw_stopping = False
        self.iterations = 0

    async def run(self, lifetime: Lifetime) -> None:
        while not lifetime.stopping:
            self.iterations += 1
            await trio.sleep(0.1)
        self.saw_stopping = lifetime.trigger is not None


class Stubborn:
    """Ignores shutdown: only cancellation ends it."""

    def __init__(self) -> None:
        self.cancelled_at: float | None = None

    async def run(self, lifetime: Lifetime) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled_at = trio.current_time()
            raise


class PoliteContainer(ServiceContainer):
    worker = providers.Singleton(Polite)


class StubbornContainer(ServiceContainer):
    worker = providers.Singleton(Stubborn)


@pytest.mark.parametrize("kind", ["worker", "native"])
async def test_worker_sees_shutdown_and_returns(
    mikros_service: ServiceStarter, tmp_path: Path, kind: str, autojump_clock: trio.abc.Clock
) -> None:
    """The loop sees lifetime.stopping, returns, and the service exits 0 ('native' is an alias)."""
    running = await mikros_service.start(PoliteContainer, write(tmp_path, kind))
    await trio.sleep(1)
    assert await running.stop() == 0
    worker = running.container.worker()
    assert worker.saw_stopping
    assert worker.iterations >= 9
    assert running.phases("worker") == ["starting", "started", "stopping", "stopped"]


async def test_stubborn_worker_is_cancelled_at_the_drain_deadline(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A loop that ignores shutdown is cancelled exactly drain_timeout after stopping began."""
    running = await mikros_service.start(StubbornContainer, write(tmp_path))
    running.service.stop()
    stopping_at = trio.current_time()
    assert await running.wait() == 0
    worker = running.container.worker()
    assert worker.cancelled_at == pytest.approx(stopping_at + 2.0)
    assert "cut" in running.phases("worker")


async def test_worker_returning_ends_the_service(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A worker that returns on its own shuts the service down with exit 0."""

    async def once() -> None:
        await trio.sleep(1)

    class Once(ServiceContainer):
        worker = providers.Object(once)

    running = await mikros_service.start(Once, write(tmp_path))
    assert await running.wait() == 0
    assert running.service.supervisor.trigger is not None
    assert running.service.supervisor.trigger.reason == "worker finished"


async def test_worker_crash_exits_1(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A worker raising while serving fails the service (exit 1) with the error recorded."""

    async def boom(lifetime: Lifetime) -> None:
        await trio.sleep(1)
        raise RuntimeError("queue lost")

    class Boom(ServiceContainer):
        worker = providers.Object(boom)

    running = await mikros_service.start(Boom, write(tmp_path))
    assert await running.wait() == 1
    failure = running.service.supervisor.failures[0]
    assert failure.component == "worker"
    assert "queue lost" in str(failure)


async def test_sync_worker_is_rejected(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A worker that is not async fails to start with a message saying so."""

    def not_async(lifetime: Lifetime) -> None:
        return None

    class Sync(ServiceContainer):
        worker = providers.Object(not_async)

    running = await mikros_service.start(Sync, write(tmp_path))
    assert await running.wait() == 1
    assert "must be async" in str(running.service.supervisor.failures[0])


def test_worker_provider_name_comes_from_runtime(tmp_path: Path) -> None:
    """[runtime.worker] provider names the container provider the worker kind uses."""
    path = write(tmp_path)
    path.write_text(path.read_text() + '[runtime.worker]\nprovider = "poller"\n')

    class Named(ServiceContainer):
        poller = providers.Singleton(Polite)

    assert [c.name for c in Service(Named, path).supervisor.components] == ["logger", "worker"]
    with pytest.raises(ConfigError):
        Service(PoliteContainer, path).build()


# -- periodic workers: idle ticks, backoff, health ---------------------------------------


class Scripted:
    """A periodic job whose outcomes follow a script: "idle", "ok" or "fail", then "ok".

    Records the Trio time each iteration started; ``failing`` (when set)
    overrides the script, for tests that flip it from outside.
    """

    def __init__(self, script: Sequence[str] = ()) -> None:
        self.script = list(script)
        self.starts: list[float] = []
        self.failing: bool | None = None

    async def run_once(self) -> bool | None:
        self.starts.append(trio.current_time())
        outcome = self.script.pop(0) if self.script else "ok"
        if self.failing is not None:
            outcome = "fail" if self.failing else "ok"
        if outcome == "fail":
            raise ValueError(f"iteration {len(self.starts)} failed")
        return False if outcome == "idle" else None


class ScriptedContainer(ServiceContainer):
    worker = providers.Singleton(Scripted)


def periodic_toml(tmp_path: Path, types: Sequence[str] = ("worker",), **worker: Any) -> Path:
    """A periodic worker's service.toml: JSON lines in ``<tmp>/w.log``, spans in memory."""
    tables: dict[str, Mapping[str, Any]] = {
        "runtime.worker": worker,
        "features.logger": {"output": str(tmp_path / "w.log"), "flush_interval": 0},
        "features.tracing": {"enabled": True, "exporter": "memory"},
        "lifecycle": {"drain_timeout": 2.0, "shutdown_timeout": 5.0},
    }
    if "http" in types:
        tables["runtime.http"] = {"host": "127.0.0.1"}
    path = tmp_path / "service.toml"
    path.write_text(toml_text({"name": "w", "types": list(types), "version": "1.0.0"}, tables))
    return path


def log_lines(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "w.log").read_text().splitlines()]


async def run_script(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    script: Sequence[str],
    seconds: float,
    **worker: Any,
) -> tuple[RunningService, Scripted]:
    """Run a :class:`Scripted` worker for ``seconds`` of Trio time, then stop the service."""
    path = periodic_toml(tmp_path, **worker)
    job = Scripted(script)
    running = await mikros_service.start(
        ScriptedContainer, path, overrides={"worker": providers.Object(job)}
    )
    await trio.sleep(seconds)
    assert await running.stop() == 0
    return running, job


@pytest.mark.parametrize("report_idle", [False, True])
async def test_idle_ticks_log_at_info_and_make_spans_only_when_configured(
    mikros_service: ServiceStarter,
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    report_idle: bool,
) -> None:
    """run_once returning False is idle: no info line, no span, unless report_idle is set."""
    script = ["idle", "idle", "ok", "idle"]
    running, _ = await run_script(
        mikros_service, tmp_path, script, 3.5, interval=1.0, report_idle=report_idle
    )
    access = [line for line in log_lines(tmp_path) if line["logger"] == "mikros_trio.access"]
    spans = running.service.telemetry.get(Tracing).spans()
    if report_idle:
        assert [line["status"] for line in access] == ["idle", "idle", "ok", "idle"]
        assert {line["level"] for line in access} == {"info"}
        assert len(spans) == 4
    else:
        assert [line["status"] for line in access] == ["ok"]
        assert [span.name for span in spans] == ["worker"]


async def test_idle_ticks_log_at_debug(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """At [log] level debug an idle tick's access line is there, at debug."""
    path = periodic_toml(tmp_path, interval=1.0)
    path.write_text(path.read_text() + '[log]\nlevel = "debug"\n')
    running = await mikros_service.start(
        ScriptedContainer, path, overrides={"worker": providers.Object(Scripted(["idle"]))}
    )
    await trio.sleep(0.5)
    await running.stop()
    access = [line for line in log_lines(tmp_path) if line["logger"] == "mikros_trio.access"]
    assert [(line["status"], line["level"]) for line in access] == [("idle", "debug")]


async def test_failures_back_off_doubling_up_to_max_backoff(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """k failures in a row wait interval*2**(k-1), capped at max_backoff; success resets it."""
    script = ["fail"] * 6 + ["ok", "ok", "fail", "ok"]
    _, worker = await run_script(
        mikros_service, tmp_path, script, 40.0, interval=1.0, max_backoff=5.0
    )
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(worker.starts)]
    # six failures → 1, 2, 4, 5, 5, 5; ok → 1; ok → 1; fail → 1; ok → 1 ...
    assert gaps[:10] == [1, 2, 4, 5, 5, 5, 1, 1, 1, 1]


async def test_failure_logs_are_bounded_and_recovery_is_said(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A streak logs one traceback, one warning per later failure, then one recovery line."""
    script = ["fail"] * 50 + ["ok"]
    await run_script(
        mikros_service,
        tmp_path,
        script,
        45.0,
        interval=0.01,
        max_backoff=1.0,
        unhealthy_after=10,
    )
    lines = [line for line in log_lines(tmp_path) if line["logger"] == "mikros_trio.worker"]
    events = [line["event"] for line in lines]
    assert sum("exception" in line for line in lines) == 1
    assert events[0] == "worker 'worker': an iteration failed; next try in 0.01 s"
    assert events[1] == (
        "worker 'worker': 2 failed iterations in a row (ValueError: iteration 2 failed); "
        "next try in 0.02 s"
    )
    assert events.count("worker 'worker': not ok after 10 failed iterations in a row") == 1
    assert events[-1] == "worker 'worker': recovered after 50 failed iterations"
    assert len(lines) == 52  # one per failure, the threshold's, the recovery's


async def test_unhealthy_after_consecutive_failures_and_recovery_clears_it(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """From unhealthy_after failures in a row: not ok in checks, not ready; a success clears it."""
    worker = Scripted(["fail", "fail", "ok", "fail", "fail", "fail", "idle"])
    path = periodic_toml(tmp_path, interval=1.0, max_backoff=1.0, unhealthy_after=3)
    running = await mikros_service.start(
        ScriptedContainer, path, overrides={"worker": providers.Object(worker)}
    )
    health = running.health
    seen: list[tuple[bool, Any]] = []
    await trio.sleep(0.5)  # read halfway between iterations (at 0, 1, 2 ...)
    for _ in range(7):
        seen.append((health.ready, health.snapshot()["checks"]["worker"]))
        await trio.sleep(1.0)
    assert await running.stop() == 0
    ok = {"ok": True, "consecutive_failures": 0}
    assert seen == [
        (True, {"ok": True, "consecutive_failures": 1, "last_error": "ValueError"}),
        (True, {"ok": True, "consecutive_failures": 2, "last_error": "ValueError"}),
        (True, ok),
        (True, {"ok": True, "consecutive_failures": 1, "last_error": "ValueError"}),
        (True, {"ok": True, "consecutive_failures": 2, "last_error": "ValueError"}),
        (False, {"ok": False, "consecutive_failures": 3, "last_error": "ValueError"}),
        (True, ok),  # an idle tick is not a failure
    ]
    assert "worker" not in health.snapshot().get("checks", {})


async def test_unhealthy_after_zero_never_turns_readiness_off(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """unhealthy_after = 0: failures back off but add no health check."""
    path = periodic_toml(tmp_path, interval=1.0, unhealthy_after=0)
    running = await mikros_service.start(
        ScriptedContainer, path, overrides={"worker": providers.Object(Scripted(["fail"] * 20))}
    )
    await trio.sleep(600)
    assert running.health.ready
    assert "checks" not in running.health.snapshot()
    assert await running.stop() == 0


async def test_shutdown_during_a_backoff_wait_is_prompt(
    mikros_service: ServiceStarter, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A stop while the worker waits out a long backoff ends the wait at once."""
    worker = Scripted(["fail"] * 10)
    path = periodic_toml(tmp_path, interval=100.0, max_backoff=_WEEK)
    running = await mikros_service.start(
        ScriptedContainer, path, overrides={"worker": providers.Object(worker)}
    )
    await trio.sleep(1000)  # failed at 0, 100, 300, 700: waiting 800 s now
    assert len(worker.starts) == 4
    stopping_at = trio.current_time()
    assert await running.stop() == 0
    assert trio.current_time() == pytest.approx(stopping_at)
    assert "cut" not in running.phases("worker")
    assert len(worker.starts) == 4


def test_backoff_never_overflows_and_stays_within_bounds() -> None:
    """Thousands of failures in a row wait max_backoff, never an overflow or less than interval."""
    worker = WorkerComponent(Scripted, "worker", interval=2.0, max_backoff=1.0)
    assert worker.delay() == 2.0
    worker = WorkerComponent(Scripted, "worker", interval=0.5, max_backoff=_WEEK)
    for failures, expected in [(1, 0.5), (2, 1.0), (3, 2.0), (5000, _WEEK), (10**9, _WEEK)]:
        worker.failures = failures
        assert worker.delay() == expected


async def readyz_becomes(client: httpx.AsyncClient, status: int) -> None:
    """Poll GET /readyz until it answers ``status`` (bounded in count and time)."""
    with trio.fail_after(BOUND):
        for _ in range(1000):
            if (await client.get("/readyz")).status_code == status:
                return
            await trio.sleep(0.01)
    pytest.fail(f"/readyz never answered {status}")


async def test_readiness_of_an_http_service_follows_its_worker(tmp_path: Path) -> None:
    """Over real HTTP: /readyz 503 and /healthz not ok once the worker fails enough; 200 again."""
    job = Scripted()
    job.failing = True

    class Both(HttpContainer):  # type: ignore[misc, valid-type]  # helpers' lazy name
        worker = providers.Object(job)

    path = periodic_toml(tmp_path, types=("http", "worker"), interval=0.01, max_backoff=0.05)
    async with trio.open_nursery() as nursery:
        starter = ServiceStarter(nursery)
        with trio.fail_after(BOUND):
            running = await starter.start(Both, path)
        base = f"http://127.0.0.1:{running.ports['http']}"
        async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
            await readyz_becomes(client, 503)
            body = (await client.get("/healthz")).json()
            assert body["checks"]["worker"]["ok"] is False
            assert body["checks"]["worker"]["consecutive_failures"] >= 3
            job.failing = False
            await readyz_becomes(client, 200)
            body = (await client.get("/healthz")).json()
            assert body["checks"]["worker"] == {"ok": True, "consecutive_failures": 0}
        with trio.fail_after(BOUND):
            assert await running.stop() == 0


class Poll:
    """Takes a job from Redis when there is one; an idle tick otherwise."""

    def __init__(self, cache: redis.Client[Any]) -> None:
        self.cache = cache
        self.jobs: list[Any] = []
        self.ticks = 0

    async def run_once(self) -> bool:
        self.ticks += 1
        job = await self.cache.get("job")
        if job is None:
            return False
        await self.cache.delete(["job"])
        self.jobs.append(job)
        return True


async def until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds, polled every 10 ms (at most 1000 times)."""
    for _ in range(1000):
        if condition():
            return
        await trio.sleep(0.01)
    pytest.fail("the condition never held")


@pytest.mark.redis
@pytest.mark.parametrize("report_idle", [False, True])
async def test_an_idle_ticks_database_poll_makes_no_span_either(
    mikros_service: ServiceStarter, tmp_path: Path, redis_server: RedisServer, report_idle: bool
) -> None:
    """The Redis GET of an idle tick is not exported (no orphan); a busy tick's is, with it."""

    class Polling(ServiceContainer):
        cache = providers.Resource(redis.client, url=redis_server.url(3), decode_responses=True)
        worker = providers.Singleton(Poll, cache=cache)

    path = periodic_toml(tmp_path, interval=0.01, report_idle=report_idle)
    with trio.fail_after(BOUND):
        running = await mikros_service.start(Polling, path)
        worker = running.container.worker()
        await until(lambda: worker.ticks >= 5)
        await worker.cache.set("job", "j1")
        await until(lambda: bool(worker.jobs))
        assert await running.stop() == 0
    spans = running.service.telemetry.get(Tracing).spans()
    roots = [span for span in spans if span.parent is None]
    if report_idle:
        assert len(roots) == worker.ticks
        assert len(spans) == 2 * worker.ticks + 1  # a GET each, the busy one's DEL
        return
    (root,) = roots
    assert root.name == "worker"
    children = [span for span in spans if span.parent is not None]
    assert [span.name for span in children] == ["GET 3", "DEL 3"]
    assert {span.parent.span_id for span in children if span.parent} == {root.context.span_id}


class Burst:
    """One busy tick making 300 Redis calls (past the 256 spans a tick holds), then idle."""

    def __init__(self, cache: redis.Client[Any]) -> None:
        self.cache = cache
        self.ticks = 0

    async def run_once(self) -> bool:
        self.ticks += 1
        if self.ticks > 1:
            return False
        for _ in range(300):
            await self.cache.get("nothing")
        return True


@pytest.mark.redis
async def test_a_tick_past_the_hold_limit_loses_no_span(
    mikros_service: ServiceStarter, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A busy tick with more child spans than are held exports every one of them."""

    class Bursting(ServiceContainer):
        cache = providers.Resource(redis.client, url=redis_server.url(3))
        worker = providers.Singleton(Burst, cache=cache)

    path = periodic_toml(tmp_path, interval=0.01)
    with trio.fail_after(BOUND):
        running = await mikros_service.start(Bursting, path)
        worker = running.container.worker()
        await until(lambda: worker.ticks >= 3)
        assert await running.stop() == 0
    spans = running.service.telemetry.get(Tracing).spans()
    (root,) = [span for span in spans if span.parent is None]
    children = [span for span in spans if span.parent is not None]
    assert len(children) == 300
    assert {span.parent.span_id for span in children if span.parent} == {root.context.span_id}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_backoff", "1e9"),
        ("max_backoff", "0"),
        ("unhealthy_after", "-1"),
        ("unhealthy_after", "10000000"),
        ("report_idle", '"yes"'),
    ],
)
def test_out_of_bounds_worker_settings_are_config_errors(
    tmp_path: Path, key: str, value: str
) -> None:
    """Backoff and threshold settings are bounded; a bad one names its key path."""
    path = write(tmp_path)
    path.write_text(path.read_text() + f"[runtime.worker]\ninterval = 1.0\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=f"runtime.worker.{key}"):
        Service(PoliteContainer, path).build()
