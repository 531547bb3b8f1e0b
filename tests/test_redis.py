"""mikros_trio.redis on a real redis-server: commands, cancellation, pool bounds, health, calls.

Every test drives :func:`mikros_trio.redis.client` the way
``providers.Resource`` does: one task takes the client from the generator
and closes it (``aclose``) at the end.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import ResponseError, WrongTypeError
from dependency_injector import providers

from helpers import (
    LOCAL_METRICS,
    MEMORY,
    TIMEOUTS,
    RedisServer,
    free_port,
    metrics_of,
    parse,
    redis_server_process,
    spans_of,
    toml_text,
    value,
)
from mikros_trio import Lifetime, Secret, ServiceContainer, redis
from mikros_trio.ext import Call, Observer, Telemetry
from mikros_trio.testing import ServiceStarter

pytestmark = pytest.mark.redis

#: Bound of every wait in these tests; none is a blind sleep.
BOUND = 10.0

PASSWORD = "s3cret-Pa55word"


@asynccontextmanager
async def opened(url: str | Secret, **options: Any) -> AsyncIterator[redis.Client[Any]]:
    """The client :func:`redis.client` yields, closed as the supervisor closes a resource."""
    async with aclosing(redis.client(url, **options)) as resource:
        yield await anext(resource)


class Recorder(Observer):
    """Keeps every finished call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def finished(self, call: Call) -> None:
        self.calls.append(call)


@pytest.fixture(name="recorder")
def fixture_recorder() -> Iterator[Recorder]:
    """A service telemetry hub, active for the test's task, with a :class:`Recorder` on it."""
    telemetry = Telemetry("svc")
    recorder = Recorder()
    telemetry.add_observer(recorder)
    token = telemetry.activate()
    yield recorder
    Telemetry.deactivate(token)


def our_connections(server: RedisServer, name: str) -> list[str]:
    """The server's CLIENT LIST lines of connections named ``name``."""
    listing = server.command("CLIENT", "LIST").decode()
    return [line for line in listing.splitlines() if f" name={name} " in line]


async def incr(client: redis.Client[Any], key: str) -> None:
    """INCR ``key`` (a task body: coredis commands are awaitables, not coroutine functions)."""
    await client.incr(key)


async def push_when_blocked(client: redis.Client[Any], server: RedisServer) -> None:
    """Once ``client`` has a command in flight, RPUSH "job" onto "queue" from another connection."""
    await until(lambda: client.health()["in_flight"] == 1, "a command in flight")
    await trio.to_thread.run_sync(server.command, "RPUSH", "queue", "job")


async def blpop(client: redis.Client[Any], seconds: float) -> None:
    """BLPOP an empty list for ``seconds`` (holds a connection that long)."""
    await client.blpop(["empty"], timeout=seconds)


async def until(predicate: Any, what: str) -> None:
    """Poll ``predicate()`` until true; fail after BOUND seconds naming ``what``."""
    with trio.move_on_after(BOUND):
        while not predicate():  # noqa: ASYNC110 - state of another library, no event to wait on
            await trio.sleep(0.01)
        return
    pytest.fail(f"never happened within {BOUND} s: {what}")


async def test_commands_run_under_trio(redis_url: str) -> None:
    """Commands, 200 of them concurrent on 2 connections, return what the server holds."""
    async with opened(redis_url, max_connections=2, decode_responses=True) as client:
        assert await client.set("greeting", "hello")
        assert await client.get("greeting") == "hello"
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(incr, client, "counter")
        assert await client.get("counter") == "200"
        assert client.health()["connections"] <= 2
    async with opened(redis_url) as raw:
        assert await raw.get("greeting") == b"hello"


async def failing_pipeline(client: redis.Client[Any]) -> None:
    """A pipeline whose second command fails (LPUSH onto a string)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.set("k", "value-that-must-not-leak")
        pipe.lpush("k", ["element-that-must-not-leak"])


async def test_pipeline_and_transaction(redis_url: str) -> None:
    """Pipelines and MULTI/EXEC transactions run; a failing command is named, its values not."""
    async with opened(redis_url, decode_responses=True) as client:
        async with client.pipeline(transaction=True) as multi:
            multi.set("n", "1")
            multi.incrby("n", 41)
        assert multi.results == (True, 42)
        async with client.pipeline(transaction=False) as pipe:
            pipe.get("n")
            pipe.exists(["n", "missing"])
        assert pipe.results == ("42", 1)
        with pytest.raises(WrongTypeError) as failed:
            await failing_pipeline(client)
        text = str(failed.value)
        assert "LPUSH" in text
        assert "must-not-leak" not in text


async def test_cancelled_blocking_command_discards_its_connection(
    redis_url: str, redis_server: RedisServer
) -> None:
    """A BLPOP cancelled by Trio ends on the server too; the one-connection pool serves again."""
    async with opened(redis_url, max_connections=1, name="blocker") as client:
        with trio.move_on_after(0.2) as scope:
            await client.blpop(["queue"], timeout=30)
        assert scope.cancelled_caught

        def blocked() -> list[str]:
            return [c for c in our_connections(redis_server, "blocker") if "cmd=blpop" in c]

        await until(lambda: not blocked(), "the cancelled BLPOP's connection closes")
        assert await client.ping() == b"PONG"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(push_when_blocked, client, redis_server)
            assert await client.blpop(["queue"], timeout=5) == [b"queue", b"job"]


async def test_cancelled_command_keeps_replies_in_order(
    redis_url: str, redis_server: RedisServer
) -> None:
    """A GET cancelled while the server is busy keeps its connection; later replies stay matched."""
    async with opened(redis_url, max_connections=1, decode_responses=True) as client:
        await client.mset({"a": "A", "b": "B"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, redis_server.command, "DEBUG", "SLEEP", "1")
            await trio.sleep(0.2)  # the server is now asleep for a second
            with trio.move_on_after(0.1) as scope:
                await client.get("a")
            assert scope.cancelled_caught
            assert await client.get("b") == "B"
        assert await client.get("a") == "A"
        assert client.health()["connections"] == 1


async def test_cancelled_pipeline_leaves_the_pool_usable(
    redis_url: str, redis_server: RedisServer
) -> None:
    """A pipeline cancelled while the server is busy gives its connection back; commands go on."""
    async with opened(redis_url, max_connections=1, decode_responses=True) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, redis_server.command, "DEBUG", "SLEEP", "1")
            await trio.sleep(0.2)  # the server is now asleep for a second
            with trio.move_on_after(0.1) as scope:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.set("p", "1")
                    pipe.incr("p")
            assert scope.cancelled_caught
        assert await client.set("after", "yes")
        assert await client.get("after") == "yes"
        assert client.health()["waiting"] == 0


async def test_pubsub_runs_under_trio_and_a_cancelled_listener_frees_its_connection(
    redis_url: str,
) -> None:
    """Subscribe, publish, receive; a listener cancelled by Trio leaves the pool serving."""
    async with opened(redis_url, max_connections=2, decode_responses=True) as client:
        async with client.pubsub(channels=["news"], ignore_subscribe_messages=True) as pubsub:
            await client.publish("news", "hello")
            with trio.fail_after(BOUND):
                message = await anext(aiter(pubsub))
            assert (message["channel"], message["data"]) == ("news", "hello")
        with trio.move_on_after(0.2) as scope:
            async with client.pubsub(channels=["quiet"]) as pubsub:
                async for _ in pubsub:
                    pass
        assert scope.cancelled_caught
        for _ in range(3):  # more than the two connections, had either been kept
            with trio.fail_after(BOUND):
                assert await client.blpop(["none"], timeout=0.05) is None


async def test_pool_exhaustion_is_bounded(redis_url: str, redis_server: RedisServer) -> None:
    """20 blocking commands on a 2-connection pool: never more than 2 sockets; the rest time out."""
    outcomes: list[object] = []
    peak = 0

    async def pop() -> None:
        try:
            outcomes.append(await client.blpop(["never"], timeout=1))
        except TimeoutError as exc:
            outcomes.append(exc)

    async with opened(redis_url, max_connections=2, pool_timeout=0.3, name="bounded") as client:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(pop)
            while len(outcomes) < 20:
                peak = max(peak, len(our_connections(redis_server, "bounded")))
                await trio.sleep(0.02)
        elapsed = trio.current_time() - start
    assert peak <= 2
    timeouts = [o for o in outcomes if isinstance(o, TimeoutError)]
    assert outcomes.count(None) == 2  # the two that got a connection waited their 1 s out
    assert len(timeouts) == 18
    assert "no connection free within 0.3 s (max_connections=2, all in use)" in str(timeouts[0])
    assert elapsed < BOUND


async def test_cancelled_waiters_take_no_wakeup(redis_url: str) -> None:
    """Waiters cancelled while the only connection is busy do not swallow the next one's turn.

    coredis's own pool leaves each cancelled waiter's wake-up in its queue;
    the next release then wakes nobody, and a live waiter sits out its
    pool_timeout beside an idle connection.
    """
    async with opened(
        redis_url, max_connections=1, pool_timeout=5, decode_responses=True
    ) as client:
        await client.set("x", "X")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blpop, client, 0.5)
            await until(lambda: client.health()["in_flight"] == 1, "the BLPOP holds the connection")
            for _ in range(3):
                with trio.move_on_after(0.05) as scope:
                    await client.get("x")
                assert scope.cancelled_caught
            start = trio.current_time()
            assert await client.get("x") == "X"
            assert trio.current_time() - start < 4.0  # the BLPOP's 0.5 s, not the 5 s timeout
        assert client.health()["waiting"] == 0


async def test_waiters_are_served_in_the_order_they_came(redis_url: str) -> None:
    """Tasks waiting for the one connection get it in turn, newcomers queueing behind them."""
    served: list[int] = []

    async def wait_then_use(index: int) -> None:
        await client.blpop(["empty"], timeout=0.2)
        served.append(index)

    def accounted() -> int:
        """Waiters served, being served and waiting (each is one of these once it has run)."""
        health = client.health()
        return len(served) + health["in_use"] + health["waiting"]

    # One health PING at the start, then none to queue among the waiters.
    options = {"max_connections": 1, "pool_timeout": BOUND, "health_interval": 3600}
    async with opened(redis_url, **options) as client:
        await until(lambda: client.health()["ok"], "the first health PING is done")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blpop, client, 0.3)
            await until(lambda: client.health()["in_use"] == 1, "the BLPOP holds the connection")
            for index in range(4):
                nursery.start_soon(wait_then_use, index)
                await until(lambda i=index: client.health()["waiting"] == i + 1, "one more waiter")
            await until(lambda: len(served) == 1, "the first waiter is served")
            for index in range(4, 6):  # arriving while the others still wait
                nursery.start_soon(wait_then_use, index)
                await until(lambda i=index: accounted() == i + 1, "a newcomer waits")
        assert served == [0, 1, 2, 3, 4, 5]


async def test_server_that_never_answers_is_bounded_by_connect_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that accepts but never answers: a command fails after connect_timeout, saying so.

    A caller's own deadline hitting first cancels it (no ConnectionError in
    its place), and each gives its slot back: the next fails the same way,
    not on an exhausted pool.
    """
    accepted: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, hold, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        url = f"redis://127.0.0.1:{port}/0"
        async with opened(url, max_connections=1, connect_timeout=0.2, pool_timeout=5) as client:
            with trio.move_on_after(0.05) as scope:  # a caller's deadline, mid-handshake
                await client.ping()
            assert scope.cancelled_caught  # its Cancelled, not a ConnectionError
            for _ in range(2):
                with pytest.raises(TimeoutError, match=r"took longer than 0\.2 s"):
                    await client.ping()
            assert client.health()["connections"] == 0
        assert len(accepted) >= 2
        # coredis logs each cancelled handshake as an ERROR traceback; not here.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        nursery.cancel_scope.cancel()


async def test_recovers_when_the_server_kills_its_connections(
    redis_url: str, redis_server: RedisServer
) -> None:
    """After CLIENT KILL of every connection, the next command reconnects by itself."""
    async with opened(redis_url, name="victim", decode_responses=True) as client:
        await client.set("k", "v")
        assert our_connections(redis_server, "victim")
        killed = await trio.to_thread.run_sync(
            redis_server.command, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
        )
        assert killed.startswith(b":")
        assert killed != b":0\r\n"
        await until(lambda: client.health()["connections"] == 0, "the client sees the kill")
        assert await client.get("k") == "v"
        assert len(our_connections(redis_server, "victim")) >= 1


async def test_server_restart_health_and_recovery(tmp_path: Path) -> None:
    """Server down: a clear ConnectionError, health not ok; back on its port: ok again by itself."""
    with redis_server_process(tmp_path) as server:
        async with opened(server.url(), health_interval=0.05) as client:
            await client.warmup()
            assert client.health()["ok"] is True
            server.stop()
            await until(lambda: not client.health()["ok"], "health turns not ok")
            report = client.health()
            assert f"127.0.0.1:{server.port}" in report["error"]
            with pytest.raises(RedisConnectionError, match=f"127.0.0.1:{server.port}"):
                await client.ping()
            await trio.to_thread.run_sync(server.start)
            await until(lambda: client.health()["ok"], "health turns ok again")
            assert await client.ping() == b"PONG"


async def test_unix_socket(tmp_path: Path, recorder: Recorder) -> None:
    """A ``unix://`` URL connects over the socket; its calls carry no TCP peer."""
    socket_path = tmp_path / "redis.sock"
    with redis_server_process(tmp_path, "--unixsocket", str(socket_path)):
        async with opened(f"unix://{socket_path}?db=2", decode_responses=True) as client:
            await client.warmup()
            assert await client.set("k", "v")
            assert repr(client) == f"<mikros_trio.redis.Client 'redis' unix://{socket_path}?db=2>"
            assert client.health()["ok"] is True
    assert [(call.name, call.target) for call in recorder.calls] == [("SET", "2")]
    assert "peer" not in recorder.calls[0].state


async def test_warmup_fails_loud_when_nothing_listens() -> None:
    """warmup() raises a ConnectionError naming the client, the address and the cause."""
    port = free_port()
    async with opened(f"redis://127.0.0.1:{port}/2", name="cache", connect_timeout=1) as client:
        with pytest.raises(RedisConnectionError) as failed:
            await client.warmup()
        text = str(failed.value)
        assert f"redis 'cache' at redis://127.0.0.1:{port}/2 did not answer PING" in text
        assert f"127.0.0.1:{port}" in text
        report = client.health()
        assert report["ok"] is False
        assert f"127.0.0.1:{port}" in report["error"]


async def test_password_never_shown(
    tmp_path: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the right nor a wrong password shows in a repr, health, error, call or log line."""
    caplog.set_level(logging.DEBUG)
    wrong = "Wr0ng-pa55word-x"
    with redis_server_process(tmp_path, "--requirepass", PASSWORD) as server:
        url = server.url(password=PASSWORD)
        seen: list[str] = []
        async with opened(Secret("REDIS_URL", url), decode_responses=True) as client:
            await client.warmup()
            await client.set("k", "v")
            seen += [repr(client), str(client), repr(client.health())]
        async with opened(server.url(password=wrong)) as client:
            with pytest.raises(RedisConnectionError) as failed:
                await client.warmup()
            seen += [str(failed.value), repr(failed.value.__cause__), repr(client.health())]
        async with opened(url.replace(f":{server.port}", ":1")) as client:
            with pytest.raises(RedisConnectionError) as unreachable:
                await client.warmup()
            seen.append(str(unreachable.value))
        for bad in (url.replace("redis://", "http://"), url.replace(f":{server.port}", ":port")):
            with pytest.raises(ValueError, match="invalid URL") as invalid:
                await anext(redis.client(bad))
            seen.append(str(invalid.value))
    seen += [repr(vars_of(call)) for call in recorder.calls]
    seen += [logging.Formatter().format(record) for record in caplog.records]
    assert seen
    for text in seen:
        assert PASSWORD not in text
        assert wrong not in text


def vars_of(call: Call) -> dict[str, Any]:
    """Every field of ``call``, its error as text."""
    return {name: getattr(call, name) for name in Call.__slots__ if name != "_headers"} | {
        "error": f"{call.error!r} {call.error}"
    }


async def test_plain_text_password_is_registered_as_a_secret(redis_server: RedisServer) -> None:
    """A password given in a plain URL is masked in the service's output from then on."""
    telemetry = Telemetry("svc")
    token = telemetry.activate()
    try:
        async with opened(redis_server.url().replace("//", f"//:{PASSWORD}@")):
            pass
    finally:
        Telemetry.deactivate(token)
    assert telemetry.redact(f"password {PASSWORD}!") == "password ***!"


async def test_every_command_is_a_call(redis_url: str, redis_server: RedisServer) -> None:
    """Commands and pipelines are redis client calls named by command, without keys or values."""
    recorder = Recorder()
    telemetry = Telemetry("svc")
    telemetry.add_observer(recorder)
    async with opened(redis_server.url(3), decode_responses=True) as client:
        await client.warmup()
        await client.ping()  # before the hub is active: no call
        token = telemetry.activate()
        try:
            await client.set("the-key", "the-value")
            await client.get("the-key")
            with pytest.raises(ResponseError):
                await client.eval("return redis.error_reply('ERR bad ' .. ARGV[1])", [], ["ARG"])
            async with client.pipeline() as multi:
                multi.incr("n")
            with trio.move_on_after(0.1):
                await client.blpop(["the-queue"], timeout=5)
        finally:
            Telemetry.deactivate(token)
    calls = [(c.kind, c.side, c.name, c.target, c.status, c.failed) for c in recorder.calls]
    assert calls == [
        ("redis", "client", "SET", "3", "ok", False),
        ("redis", "client", "GET", "3", "ok", False),
        ("redis", "client", "EVAL", "3", "error", True),
        ("redis", "client", "MULTI", "3", "ok", False),
        ("redis", "client", "BLPOP", "3", "cancelled", False),
    ]
    assert {c.state["peer"] for c in recorder.calls} == {("127.0.0.1", redis_server.port)}
    failed = recorder.calls[2]
    assert isinstance(failed.error, ResponseError)
    assert str(failed.error) == "(server message withheld)"
    for call in recorder.calls:
        text = repr(vars_of(call))
        for secret in ("the-key", "the-value", "the-queue", "ARG"):
            assert secret not in text


async def test_close_waits_for_commands_in_flight(redis_url: str) -> None:
    """Closing waits for a command in flight to finish, then closes; later commands fail at once."""
    results: list[object] = []
    async with trio.open_nursery() as nursery:
        resource = redis.client(redis_url)
        client = await anext(resource)

        async def pop() -> None:
            results.append(await client.blpop(["empty"], timeout=0.5))

        nursery.start_soon(pop)
        await until(lambda: client.health()["in_flight"] == 1, "the BLPOP is in flight")
        await resource.aclose()
        assert results == [None]
    with pytest.raises(RedisConnectionError, match="'redis' is closed"):
        await client.get("k")
    assert client.health()["ok"] is False


async def test_close_is_cut_by_cancellation(redis_url: str) -> None:
    """Cancelled while it waits (the stop deadline), closing ends at once and fails what waits.

    The deadline is set on a scope entered before the client was taken, as
    the supervisor's is: the generator holds nurseries across its ``yield``.
    """
    results: list[object] = []
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as stopping:
            resource = redis.client(redis_url)
            client = await anext(resource)

            async def pop() -> None:
                try:
                    results.append(await client.blpop(["empty"], timeout=30))
                except RedisConnectionError as exc:
                    results.append(exc)

            nursery.start_soon(pop)
            await until(lambda: client.health()["in_flight"] == 1, "the BLPOP is in flight")
            start = trio.current_time()
            stopping.deadline = start + 0.3
            await resource.aclose()
        assert stopping.cancelled_caught
    assert trio.current_time() - start < BOUND
    assert len(results) == 1
    assert isinstance(results[0], RedisConnectionError)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:6379/0", "scheme 'http' is not redis"),
        ("127.0.0.1:6379", "is not redis"),
        ("redis:///0", "no host"),
        ("redis://127.0.0.1:99999/0", "the port must be 1-65535"),
        ("redis://127.0.0.1:6379/zero", "db index a number"),
    ],
)
async def test_bad_url_is_a_clear_error(url: str, problem: str) -> None:
    """A malformed URL fails before anything connects, saying what is wrong and what is expected."""
    with pytest.raises(ValueError, match=re.escape(problem)) as failed:
        await anext(redis.client(url))
    assert "expected redis://[[user]:password@]host[:port][/db]" in str(failed.value)


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_connections", 0), ("pool_timeout", -1.0), ("connect_timeout", 1e9), ("name", "a b")],
)
async def test_bad_setting_is_a_clear_error(option: str, value: object) -> None:
    """An out-of-range setting fails before anything connects, naming it."""
    with pytest.raises(ValueError, match=option.split("_")[0]):
        await anext(redis.client("redis://127.0.0.1:6379/0", **{option: value}))


class Writer:
    """A worker using the resource: a few commands and a transaction, then waits to be stopped."""

    def __init__(self, cache: redis.Client[Any]) -> None:
        self.cache = cache

    async def run(self, lifetime: Lifetime) -> None:
        await self.cache.set("order:1", "secret-order-value")
        assert await self.cache.get("order:1") == b"secret-order-value"
        async with self.cache.pipeline() as multi:
            multi.incr("orders")
            multi.expire("orders", 60)
        await lifetime.wait_stopping()
        await self.cache.set("last-words", "drained")  # still open while the worker drains


class RedisService(ServiceContainer):
    cache = providers.Resource(
        redis.client,
        url=ServiceContainer.env.provided.secret.call("REDIS_URL"),
        max_connections=4,
        name="cache",
        health_interval=0.05,
    )
    worker = providers.Factory(Writer, cache=cache)


async def test_a_service_declares_it_with_providers_resource(
    mikros_service: ServiceStarter, tmp_path: Path, redis_server: RedisServer, redis_url: str
) -> None:
    """A real service: the resource opens before its worker, is healthy, its commands are
    metrics and spans without keys or values, and it closes after the worker drained."""
    path = tmp_path / "service.toml"
    path.write_text(
        toml_text(
            {"name": "svc", "types": ["worker"], "version": "1.0.0", "envs": ["REDIS_URL"]},
            {
                "lifecycle": TIMEOUTS,
                "features.env": {"secrets": ["REDIS_URL"]},
                "features.metrics": {"enabled": True, **LOCAL_METRICS},
                "features.tracing": {"enabled": True},
            },
        )
    )
    url = redis_url.replace("//", f"//:{PASSWORD}@")
    redis_server.command("CONFIG", "SET", "requirepass", PASSWORD)
    try:
        running = await mikros_service.start(
            RedisService, path, environ={**MEMORY, "REDIS_URL": url}
        )
        cache: redis.Client[Any] = running.container.cache()
        assert isinstance(cache, redis.Client)
        await until(
            lambda: redis_server.command("EXISTS", "orders", password=PASSWORD) == b":1\r\n",
            "the worker wrote",
        )
        assert running.health.snapshot()["checks"]["cache"]["ok"] is True
        spans = await spans_of(running, 3)
        samples = parse(metrics_of(running).render().decode())
        assert await running.stop() == 0
    finally:
        redis_server.command("CONFIG", "SET", "requirepass", "", password=PASSWORD)
    assert redis_server.command("GET", "last-words") == b"$7\r\ndrained\r\n"
    assert cache.health()["ok"] is False  # closed with the service, after its worker
    for operation in ("SET", "GET", "MULTI"):
        labels = {"system": "redis", "operation": operation, "outcome": "ok"}
        assert (value(samples, "db_client_operations_total", **labels) or 0) >= 1
    assert value(samples, "db_client_connections_max", system="redis", pool="cache") == 4
    db_spans = [span for span in spans if (span.attributes or {}).get("db.system") == "redis"]
    assert [span.name for span in db_spans][:3] == ["SET 0", "GET 0", "MULTI 0"]
    attributes = dict(db_spans[0].attributes or {})
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == redis_server.port
    for span in db_spans:
        text = repr(span.to_json())
        for secret in ("order:1", "secret-order-value", PASSWORD):
            assert secret not in text
