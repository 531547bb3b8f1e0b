"""dependency-injector's ``providers.Resource``, run by the supervisor under Trio.

dependency-injector initialises a resource when it is first called and
shuts it down from ``shutdown_resources()``; its async path hands back
asyncio futures, which Trio cannot await. Here each ``Resource`` provider of
a service's container is a lifecycle component instead:

- its initialiser is called in graph order, before anything that uses it
  (the container's wiring says what does), with its arguments resolved the
  way dependency-injector resolves them;
- while it runs, the provider is overridden with the value it gave, so
  whatever is built from the container receives that value;
- it is shut down after everything that uses it has stopped, under the
  same stop deadline as any component. A cut deadline or a forced exit
  cancels the shutdown in progress, which still runs the initialiser's
  ``finally`` blocks: what it opened is closed by the task that opened it.

The value may offer ``async warmup()`` (awaited before the service reports
ready) and ``health() -> Mapping`` with a boolean ``"ok"`` (shown on
``/healthz``; readiness is off while it is false).

Sync initialisers (generators, context managers, ``resources.Resource``)
run on the Trio thread, as dependency-injector runs them: what they block
on blocks the service, so prefer the async forms for anything doing I/O.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from ._component import Component, Lifetime
from ._injector import providers
from .errors import ConfigIssue

__all__ = ["ResourceComponent", "check_resource", "is_resource"]

#: How often a resource's ``health()`` is read for readiness.
HEALTH_POLL: Final = 1.0

#: What the resource gives back, and how to shut it down (``None``: nothing to do).
_Opened = tuple[Any, Callable[[], Awaitable[None]] | None]


def is_resource(provider: providers.Provider[Any]) -> bool:
    """Whether ``provider`` (or its override) is a ``providers.Resource``."""
    return isinstance(provider.last_overriding or provider, providers.Resource)


def _form(init: Any) -> str | None:
    """Which supported shape ``init`` has, or ``None``."""
    from dependency_injector import resources

    if isinstance(init, type):
        if issubclass(init, resources.AsyncResource):
            return "async resource class"
        if issubclass(init, resources.Resource):
            return "resource class"
        if callable(getattr(init, "__aenter__", None)) and callable(
            getattr(init, "__aexit__", None)
        ):
            return "async context manager"
        if callable(getattr(init, "__enter__", None)) and callable(getattr(init, "__exit__", None)):
            return "context manager"
        return "callable"
    if inspect.isasyncgenfunction(_generator(init)):
        return "async generator"
    if inspect.isgeneratorfunction(_generator(init)):
        return "generator"
    if inspect.iscoroutinefunction(init):
        return "coroutine function"
    return "callable" if callable(init) else None


def _generator(init: Any) -> Any:
    """The generator function behind ``init``.

    dependency-injector wraps a generator initialiser into a context manager
    factory when the provider is made; the original is its ``__wrapped__``.
    """
    wrapped = getattr(init, "__wrapped__", None)
    if inspect.isasyncgenfunction(wrapped) or inspect.isgeneratorfunction(wrapped):
        return wrapped
    return init


def check_resource(name: str, provider: providers.Provider[Any], where: str) -> ConfigIssue | None:
    """A configuration issue if ``provider``'s initialiser has no supported shape."""
    effective: Any = provider.last_overriding or provider
    init = effective.provides
    if _form(init) is None:
        return ConfigIssue(
            "<container>",
            where,
            f"providers.Resource({init!r}) cannot start: its initialiser must be a generator "
            "or async generator function, a function, a context manager class, or a "
            "dependency_injector.resources.Resource / AsyncResource subclass",
        )
    return None


async def _open(name: str, init: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Opened:
    form = _form(init)
    if form == "async generator":
        agen = _generator(init)(*args, **kwargs)
        try:
            value = await agen.__anext__()
        except StopAsyncIteration:
            raise RuntimeError(f"resource {name!r}: its generator ended without yielding") from None

        async def finish_agen() -> None:
            try:
                await agen.__anext__()
            except StopAsyncIteration:
                return
            await agen.aclose()
            raise RuntimeError(f"resource {name!r}: its generator yielded more than once")

        return value, finish_agen
    if form == "generator":
        gen = _generator(init)(*args, **kwargs)
        try:
            value = next(gen)
        except StopIteration:
            raise RuntimeError(f"resource {name!r}: its generator ended without yielding") from None

        async def finish_gen() -> None:
            try:
                next(gen)
            except StopIteration:
                return
            gen.close()
            raise RuntimeError(f"resource {name!r}: its generator yielded more than once")

        return value, finish_gen
    if form == "async resource class":
        owner = init()
        value = await owner.init(*args, **kwargs)

        async def finish_async_resource() -> None:
            await owner.shutdown(value)

        return value, finish_async_resource
    if form == "resource class":
        owner = init()
        value = owner.init(*args, **kwargs)

        async def finish_resource() -> None:
            owner.shutdown(value)

        return value, finish_resource
    if form == "async context manager":
        manager = init(*args, **kwargs)
        value = await manager.__aenter__()

        async def finish_async_cm() -> None:
            await manager.__aexit__(None, None, None)

        return value, finish_async_cm
    if form == "context manager":
        manager = init(*args, **kwargs)
        value = manager.__enter__()

        async def finish_cm() -> None:
            manager.__exit__(None, None, None)

        return value, finish_cm
    value = init(*args, **kwargs)
    if inspect.isawaitable(value):
        value = await value
    return value, None


def _collect(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


class ResourceComponent(Component):
    """A container's ``providers.Resource``, as a lifecycle component.

    Its shutdown runs only if its initialiser returned, at most once, and
    also on a forced exit (cancelled then, so only its ``finally`` blocks
    and what they do without waiting take effect).
    """

    def __init__(
        self,
        name: str,
        provider: providers.Provider[Any],
        *,
        depends_on: tuple[str, ...] = (),
        enhanced_by: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.depends_on = depends_on
        self.enhanced_by = enhanced_by
        self._provider = provider
        self.instance: Any = None
        #: Whether the value has a ``warmup`` (known once it exists).
        self.wants_warmup = False

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        provider = self._provider
        effective: Any = provider.last_overriding or provider
        # dependency-injector resolves the arguments, with its own rules for
        # providers, markers and configuration values.
        args, kwargs = providers.Callable(_collect, *effective.args, **effective.kwargs)()
        value, finish = await _open(self.name, effective.provides, args, kwargs)
        self.instance = value
        self.wants_warmup = callable(getattr(value, "warmup", None))
        provider.override(providers.Object(value))
        health = lifetime.health
        check = getattr(value, "health", None)
        try:
            if callable(check):
                health._add_check(self.name, check)
            task_status.started()
            while not lifetime.stopping:
                if callable(check):
                    health._poll_check(self.name)
                with trio.move_on_after(HEALTH_POLL):
                    await lifetime.wait_stopping()
        finally:
            health._remove_check(self.name)
            provider.reset_last_overriding()
            if finish is not None:
                await finish()

    async def warmup(self) -> None:
        method = getattr(self.instance, "warmup", None)
        if callable(method):
            result = method()
            if inspect.isawaitable(result):
                await result
