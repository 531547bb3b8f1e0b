"""Redis as a resource: coredis's client, run under Trio, observed, health-checked, closed in order.

Declare it in a container with dependency-injector's ``providers.Resource``::

    from dependency_injector import providers
    from mikros_trio import ServiceContainer, redis

    class Container(ServiceContainer):
        cache = providers.Resource(
            redis.client,
            url=ServiceContainer.env.provided.secret.call("REDIS_URL"),
            max_connections=10,
        )

and use what dependents receive as coredis's client, for it is one (a
:class:`Client` is a ``coredis.Redis``): ``await cache.set("k", "v")``,
``async with cache.pipeline() as pipe: ...``, locks, scripts, streams,
pub/sub. The resource enters the client's connection pool; do not
``async with`` it again in a handler.

Why coredis: it is written on anyio, so it runs on Trio as it is, where
redis-py's asyncio client needs an asyncio loop. What this module adds:

- **Calls.** Every command and every pipeline (named ``MULTI`` or
  ``PIPELINE``) is a client :class:`~mikros_trio._telemetry.Call` of kind
  ``"redis"`` named by the command (``GET``; never a key or a value), its
  target the database index, ``state["peer"]`` the server's
  ``(host, port)``: metrics and spans see it like any database call. A
  failed call carries the error with the server's message cut to its
  error code, because Redis quotes keys and arguments in some replies.
- **Health.** ``health()`` is ``{"ok": ...}`` plus the pool's figures; a
  PING every ``health_interval`` seconds decides ``ok``. ``warmup()`` PINGs
  once before the service is ready and fails loudly when it cannot.
- **Bounded waits.** Getting a connection gives up after ``pool_timeout``
  with a message naming the limit; connecting after ``connect_timeout``.
  Retries are off: a command that failed is not sent again behind your
  back (coredis retries twice by default, which runs a non-idempotent
  ``INCR`` twice after a timeout).
- **Shutdown.** Closing waits for the commands in flight until the
  supervisor's stop deadline cancels it, then closes every connection;
  commands issued after that fail at once with a clear error.

coredis multiplexes: an ordinary command gives its connection back as soon
as it is written and waits for its reply in the connection's queue, so
``max_connections`` bounds the sockets, and a connection is held for the
whole command only by blocking ones (``BLPOP``, ``XREAD BLOCK``, ``WAIT``)
and pipelines. A cancelled blocking command closes its connection (its
reply would come later, out of turn); a cancelled ordinary command leaves
its connection in use, its late reply consumed in order.

Passwords: the URL may be a :class:`~mikros_trio.features.env.Secret`; its
password never appears in a repr, a health report, a call or an error this
module writes, and a plain-text URL's password is registered with the
running service's secrets so its logs mask it too.
"""

from __future__ import annotations

import contextlib
import math
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, AnyStr, TypeVar, cast

import coredis
import trio
from coredis.connection import TCPLocation
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.patterns.pipeline import Pipeline
from coredis.retry import NoRetryPolicy

from ._redis_pool import Pool
from ._telemetry import Telemetry, current_telemetry

if TYPE_CHECKING:
    from coredis.commands import CommandRequest

    from .features.env import Secret

__all__ = ["Client", "client"]

R = TypeVar("R")

#: Set in the health probe's task: its PINGs are neither calls nor in flight.
_QUIET: ContextVar[bool] = ContextVar("mikros_trio_redis_quiet", default=False)

_SCHEMES = frozenset({"redis", "rediss", "unix"})
_URL_SHAPE = "redis://[[user]:password@]host[:port][/db], rediss://… or unix:///path?db=N"


def _safe_url(url: str) -> str:
    """``url`` with its password (and user) replaced by ``***``, for error messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "(an unparsable URL)"
    netloc = f"***@{host}" if "@" in parts.netloc else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_url(url: str, name: str) -> str:
    """The password in ``url`` ("" if none); ValueError naming the problem and the URL shape."""
    try:
        parts = urllib.parse.urlsplit(url)
        problem = ""
        if parts.scheme not in _SCHEMES:
            problem = f"scheme {parts.scheme or '(none)'!r} is not redis, rediss or unix"
        elif parts.scheme != "unix" and not parts.hostname:
            problem = "no host"
        else:
            port = parts.port  # ValueError when not a number in 0-65535
            db = urllib.parse.parse_qs(parts.query).get("db", [parts.path.strip("/") or "0"])[0]
            if port == 0 or (parts.scheme != "unix" and not db.isdigit()):
                problem = "the port must be 1-65535 and the db index a number"
        password = urllib.parse.unquote(parts.password or "")
    except ValueError:
        problem = "the port must be 1-65535 and the db index a number"
    if problem:
        message = f"redis {name!r}: invalid URL {_safe_url(url)} ({problem}); expected {_URL_SHAPE}"
        raise ValueError(message)
    return password


def _reported(error: BaseException) -> BaseException:
    """The error a call carries: ``error`` itself when its text is ours or coredis's, else a copy
    holding only the server's error code (``WRONGTYPE``, ``ERR``…).

    Connection errors and timeouts name the server's address and the
    command; the server's own replies may quote keys and arguments
    (``ERR unknown command 'x', with args beginning with: 'secret'``).
    """
    if isinstance(error, (RedisConnectionError, TimeoutError)):
        return error
    code = str(error).split(" ", 1)[0]
    text = code if code.isalpha() and code.isupper() else ""
    try:
        copy = type(error).__new__(type(error))
    except TypeError:  # an exception class with a __new__ of its own
        copy = Exception()
    copy.args = (f"{text} (server message withheld)".lstrip(),)
    return copy


class _Pipeline(Pipeline[AnyStr]):
    """coredis's pipeline, observed as one call; its errors name commands, never their arguments."""

    client: Client[AnyStr]

    async def _execute(self) -> None:
        if not self.command_stack:
            return
        name = "MULTI" if self._transaction or self._watching else "PIPELINE"
        await self.client._run(name, super()._execute)

    def _annotate_exception(
        self,
        exception: Exception | None,
        number: int,
        command: bytes,
        args: Any,
    ) -> None:
        # coredis writes every argument (values included) into the message.
        if exception is None or not exception.args:
            return
        error: BaseException = exception
        head = f"Command # {number} ({command.decode('latin-1')}) of pipeline caused error"
        error.args = (f"{head}: {error.args[0]!s}", *error.args[1:])


class Client(coredis.Redis[AnyStr]):
    """A ``coredis.Redis`` whose commands are calls, with ``health()`` and ``warmup()``.

    Built and closed by :func:`client`; use it as coredis's client. Failure
    contract: a command that cannot get a connection within
    ``pool_timeout`` raises ``TimeoutError``; one whose server is
    unreachable raises coredis's ``ConnectionError`` naming the address;
    once closed, every command raises ``ConnectionError`` at once.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        name: str,
        decode_responses: bool,
        health_interval: float,
    ) -> None:
        super().__init__(
            connection_pool=pool,
            decode_responses=decode_responses,
            retry_policy=NoRetryPolicy(),
        )
        self.name = name
        location = pool.location
        db = int(pool.connection_kwargs.get("db") or 0)
        self._namespace = str(db)
        self._peer = (location.host, location.port) if isinstance(location, TCPLocation) else None
        scheme = "rediss" if pool.connection_kwargs.get("ssl_context") else "redis"
        self._url = f"{scheme}://{location}/{db}" if self._peer else f"unix://{location}?db={db}"
        self._health_interval = health_interval
        self._in_flight = 0
        self._idle: trio.Event | None = None
        self._closed = False
        self._ok = False
        self._error = "not checked yet"
        #: The metrics feature's gauges of this pool, when it is on (see client()).
        self._gauges: Any = None

    def __repr__(self) -> str:
        return f"<mikros_trio.redis.Client {self.name!r} {self._url}>"

    # -- commands ---------------------------------------------------------

    async def execute_command(self, command: CommandRequest[R]) -> R:
        """Run ``command`` through coredis, as a call when a service's telemetry is on."""
        return await self._run(command.name, super().execute_command, command)

    async def _run(
        self, name: bytes | str, function: Callable[..., Awaitable[R]], *arguments: Any
    ) -> R:
        """``await function(*arguments)``, counted in flight and observed as call ``name``."""
        if _QUIET.get():
            return await function(*arguments)
        if self._closed:
            raise RedisConnectionError(f"redis {self.name!r} is closed (the service is stopping)")
        self._in_flight += 1
        try:
            telemetry = current_telemetry()
            if telemetry is None:
                return await function(*arguments)
            return await self._observe(telemetry, name, function(*arguments))
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()

    async def _observe(self, telemetry: Telemetry, name: bytes | str, work: Awaitable[R]) -> R:
        label = name.decode("latin-1") if isinstance(name, bytes) else name
        call = telemetry.begin("redis", "client", label.upper(), target=self._namespace)
        if self._peer is not None:
            call.state["peer"] = self._peer
        try:
            result = await work
        except trio.Cancelled:
            telemetry.end(call, "cancelled")
            raise
        except BaseException as exc:
            telemetry.end(call, "error", failed=True, error=_reported(exc))
            raise
        telemetry.end(call, "ok")
        return result

    def pipeline(
        self,
        transaction: bool = True,
        *,
        raise_on_error: bool = True,
        timeout: float | None = None,
    ) -> Pipeline[AnyStr]:
        """coredis's pipeline (a transaction by default), observed as one call."""
        return _Pipeline[AnyStr](self, transaction, raise_on_error, timeout)

    # -- health -----------------------------------------------------------

    def health(self) -> Mapping[str, Any]:
        """``ok`` (the last PING answered), the pool's figures, and why not ok if it is not."""
        pool = self.connection_pool
        assert isinstance(pool, Pool)
        report: dict[str, Any] = {
            "ok": self._ok and not self._closed,
            **pool.figures(),
            "in_flight": self._in_flight,
        }
        if not report["ok"]:
            report["error"] = "closed" if self._closed else self._error
        return report

    async def warmup(self) -> None:
        """Connect and PING; raise coredis's ``ConnectionError`` saying why if that fails."""
        token = _QUIET.set(True)
        try:
            await self._ping()
        except Exception as exc:
            self._error = _describe(exc)
            message = f"redis {self.name!r} at {self._url} did not answer PING: {self._error}"
            raise RedisConnectionError(message) from exc
        finally:
            _QUIET.reset(token)

    async def _ping(self) -> None:
        pool = self.connection_pool
        with trio.fail_after((pool.connect_timeout or 5.0) + (pool.timeout or 5.0)):
            await self.ping()
        self._ok = True
        self._error = ""

    async def _probe(self, scope: trio.CancelScope) -> None:
        _QUIET.set(True)  # this task only
        with scope:
            while True:
                try:
                    await self._ping()
                except Exception as exc:
                    self._ok = False
                    self._error = f"{self._url}: {_describe(exc)}"
                self._measure()
                await trio.sleep(self._health_interval)

    def _measure(self) -> None:
        """Set the pool gauges, if any: once per probe, not per command (a hot path)."""
        if self._gauges is not None:
            pool = self.connection_pool
            assert isinstance(pool, Pool)
            figures = pool.figures()
            self._gauges.set(
                figures["idle"],
                figures["in_use"],
                figures["waiting"],
                figures["max_connections"],
            )

    # -- lifetime ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        """The pool entered and the probe running; on exit, drain (until cancelled) and close."""
        try:
            async with self.connection_pool, trio.open_nursery() as nursery:
                probing = trio.CancelScope()
                nursery.start_soon(self._probe, probing)
                try:
                    yield
                finally:
                    self._closed = True
                    probing.cancel()  # not the nursery's scope: that would cut the wait below
                    if self._in_flight:
                        self._idle = trio.Event()
                        # Until done, or until the stop deadline cancels us;
                        # then leaving the pool closes every connection,
                        # failing what still waits with a ConnectionError.
                        await self._idle.wait()
        finally:
            self._measure()  # the pool has closed its connections: all zero


def _pool_gauges(telemetry: Telemetry, name: str) -> Any:
    """The connection gauges the metrics feature keeps for pool ``name``, or None when it is off.

    Found by what the feature publishes (an object with ``pool_gauges``),
    so this module imports no feature.
    """
    for published in telemetry.published():
        gauges = getattr(published, "pool_gauges", None)
        if callable(gauges):
            return gauges("redis", name)
    return None


def _describe(error: BaseException) -> str:
    """``Type: message`` of ``error``, with its cause's message when coredis wrapped one."""
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return text


async def client(
    url: str | Secret,
    *,
    max_connections: int = 10,
    connect_timeout: float = 5.0,
    command_timeout: float | None = None,
    pool_timeout: float = 5.0,
    health_interval: float = 1.0,
    decode_responses: bool = False,
    name: str = "redis",
) -> AsyncIterator[Client[Any]]:
    """A Redis client for ``providers.Resource``: yields it, closes it when the service stops.

    ``url`` is ``redis://[[user]:password@]host[:port][/db]`` (``rediss://``
    for TLS, ``unix:///path?db=N``), a ``Secret`` or text. At most
    ``max_connections`` sockets; ``connect_timeout`` bounds opening one,
    ``pool_timeout`` waiting for a free one, and ``command_timeout`` (none
    by default: use Trio's cancel scopes) each reply, blocking commands
    included, so keep it above their own timeouts. ``health_interval`` is
    the seconds between health PINGs. ``decode_responses`` returns text
    instead of bytes. ``name`` is the client's name in messages and in the
    server's ``CLIENT LIST``. Example::

        cache = providers.Resource(redis.client, url="redis://127.0.0.1:6379/0")

    Failure contract: a malformed URL or setting raises ``ValueError``
    before anything connects; an unreachable server fails ``warmup()``.
    """
    for setting, value, bounds in (
        ("max_connections", max_connections, (1, 10_000)),
        ("connect_timeout", connect_timeout, (0.001, 3600)),
        ("pool_timeout", pool_timeout, (0.001, 3600)),
        ("health_interval", health_interval, (0.001, 3600)),
        (
            "command_timeout",
            math.inf if command_timeout is None else command_timeout,
            (0.001, math.inf),
        ),
    ):
        if not bounds[0] <= value <= bounds[1]:
            raise ValueError(f"redis {name!r}: {setting} must be within {bounds}, not {value!r}")
    if not name or not name.isprintable() or " " in name:
        raise ValueError(f"redis: name must be printable text without spaces, not {name!r}")
    reveal: Callable[[], str] | None = getattr(url, "reveal", None)
    text = reveal() if reveal is not None else str(url)
    password = _check_url(text, name)
    telemetry = current_telemetry()
    if password and reveal is None and telemetry is not None:
        telemetry.add_secrets([password], name=f"the password of redis {name!r}")
    pool = cast(
        Pool,
        Pool.from_url(
            text,
            decode_components=True,
            max_connections=max_connections,
            timeout=pool_timeout,
            connect_timeout=connect_timeout,
            stream_timeout=command_timeout,
            decode_responses=decode_responses,
            client_name=name,
        ),
    )
    pool.name = name
    redis = Client[Any](
        pool, name=name, decode_responses=decode_responses, health_interval=health_interval
    )
    if telemetry is not None:
        redis._gauges = _pool_gauges(telemetry, name)
    async with redis._serving():
        try:
            yield redis
        except GeneratorExit:
            # Being closed (aclose): leave normally, so the close runs; a
            # GeneratorExit crossing the nurseries would come out as a group.
            return
