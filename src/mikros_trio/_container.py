"""The container layer: dependency-injector wiring, turned into components.

Sync only, by design: dependency-injector's async resources are bound to
asyncio and do not run under Trio, so lifecycle belongs to the supervisor
(a ``providers.Resource`` becomes a component that the supervisor runs:
see :mod:`._resources`). What this module does:

- wires the :class:`~mikros_trio.ext.Definition` and its values into a
  :class:`ServiceContainer` (``container.definition``, ``container.config``);
- asks each kind in ``types`` and each enabled feature for its components,
  importing their modules only now;
- finds the user's lifecycle components: every ``Singleton`` or ``Object``
  provider whose value is a :class:`~mikros_trio.ext.Component` (run as
  itself: its ``run`` and ``warmup``), or has ``on_start`` /
  ``on_shutdown`` / ``warmup`` hooks, or is an async context manager
  (entered at start, exited at stop, even on a forced exit, when hooks no
  longer run), and every ``Resource`` provider. A ``Factory`` of a
  Component is a configuration error: it
  would make a new one per call, none of them run. Discovery looks at
  classes, not instances, so nothing is constructed before its turn in the
  start order; the edges between them
  come from the container's own wiring (a provider injected into another
  must be started first), from ``depends_on`` / ``enhanced_by`` attributes,
  and from ``[components.<name>]`` in service.toml.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from ._component import Component, Lifetime, Role
from ._definition import Definition
from ._graph import NodeSpec
from ._injector import containers, providers
from ._registry import Registry
from ._resources import ResourceComponent, check_resource, is_resource
from ._telemetry import Telemetry
from .errors import ConfigError, ConfigIssue

__all__ = [
    "BuildContext",
    "EntryComponent",
    "HookComponent",
    "ProvidedComponent",
    "ServiceContainer",
    "build_components",
    "container_class",
    "plain",
    "provided_type",
]

_HOOKS = ("on_start", "on_shutdown", "warmup")


class ServiceContainer(containers.DeclarativeContainer):
    """Base container of a service; subclass it and add providers.

    ``definition`` gives the loaded :class:`~mikros_trio.ext.Definition`;
    ``config`` holds service.toml as a strict ``Configuration``, so
    ``ServiceContainer.config.service.dsn`` reads ``[service] dsn``. Set
    :attr:`service_model` to a dataclass to have ``[service]`` decoded and
    validated into it, and inject :attr:`settings`. Example::

        class Container(ServiceContainer):
            repo = providers.Singleton(Repo, dsn=ServiceContainer.config.service.dsn)
            worker = providers.Factory(Poller, repo=repo)

    Any ``Singleton`` whose class defines ``on_start`` / ``on_shutdown``
    (sync or async), or is a :class:`~mikros_trio.ext.Component`, becomes a
    lifecycle component named after its attribute; override providers before the service starts
    (``container.repo.override(fake)``) and the service uses the override.
    """

    definition: providers.Object[Any] = providers.Object(None)
    config = providers.Configuration(strict=True)
    #: The service's :class:`~mikros_trio.ext.Telemetry` (features' objects, secrets).
    telemetry: providers.Object[Any] = providers.Object(None)
    #: Typed access to the environment (:class:`~mikros_trio.Env`); secrets masked.
    env: providers.Object[Any] = providers.Object(None)

    #: The decoded ``[service]`` table: an instance of :attr:`service_model`
    #: when one is set, else the table as a dict. Inject it where settings
    #: are needed: ``providers.Factory(Poller, settings=ServiceContainer.settings)``.
    settings: providers.Provider[Any] = definition.provided.service

    #: Optional dataclass that ``[service]`` is decoded into.
    service_model: ClassVar[type[Any] | None] = None


#: Providers of the base container itself: never lifecycle components.
_RESERVED = frozenset({"definition", "config", "telemetry", "env", "settings"})


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a kind's or feature's builder receives.

    ``name`` is the kind or feature, ``settings`` its decoded
    ``[runtime.<kind>]`` or ``[features.<name>]`` table, ``telemetry`` the
    service's hub (features register observers there, kinds report calls).
    """

    name: str
    settings: Any
    definition: Definition
    container: ServiceContainer
    telemetry: Telemetry

    def provider(self, attribute: str, key_path: str) -> providers.Provider[Any]:
        """The container provider called ``attribute``, or a ``ConfigError`` at ``key_path``."""
        found = self.container.providers.get(attribute)
        if found is None:
            raise ConfigError(
                [
                    ConfigIssue(
                        self.definition.source,
                        key_path,
                        f"the {self.name} kind needs a container provider named "
                        f"{attribute!r}; {container_class(self.container).__name__} has none",
                    )
                ]
            )
        return found


class _Provided(Component):
    """A component whose object comes from a container provider when it starts.

    So the object is built in start order and any override in place is
    honoured; ``instance`` holds it from then on.
    """

    def __init__(
        self,
        name: str,
        provider: Callable[[], Any],
        *,
        depends_on: Sequence[str] = (),
        enhanced_by: Sequence[str] = (),
        role: Role = Role.PROCESSING,
    ) -> None:
        self.name = name
        self.role = role
        self.depends_on = tuple(depends_on)
        self.enhanced_by = tuple(enhanced_by)
        self._provider = provider
        self.instance: Any = None


class HookComponent(_Provided):
    """A user object with ``on_start`` / ``on_shutdown`` hooks, as a component.

    ``on_shutdown`` runs only if ``on_start`` completed, and at most once;
    a forced exit skips it. An object that is an async context manager is
    entered before ``on_start`` and always exited.
    """

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.instance = instance = self._provider()
        async with AsyncExitStack() as stack:
            if _is_async_context_manager(type(instance)):
                # Exited whatever happens, forced exit included: what it
                # opened (a nursery, a pool) must be closed by this task.
                await stack.enter_async_context(instance)
            await _call_hook(instance, "on_start")
            task_status.started()
            await lifetime.wait_stopping()
            await _call_hook(instance, "on_shutdown")


class ProvidedComponent(_Provided):
    """A :class:`~mikros_trio.ext.Component` the container provides, run as itself.

    Its name is the provider's attribute; ``role``, ``depends_on`` and
    ``enhanced_by`` are read from its class (the graph is planned before
    anything is built). Its own ``run`` gets the lifetime and the
    ``task_status``, under the same contract as any component: what it
    does on failure, the supervisor does with it.
    """

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.instance = instance = self._provider()
        await instance.run(lifetime, task_status=task_status)


class _Warm(_Provided):
    """Mixed in when the object has a ``warmup``: calls it.

    A separate class so the supervisor, which skips components that do not
    override ``warmup``, sees only the ones that do.
    """

    async def warmup(self) -> None:
        await _call_hook(self.instance, "warmup")


class _WarmHookComponent(_Warm, HookComponent):
    """A :class:`HookComponent` whose object also has a ``warmup`` hook."""


class _WarmProvidedComponent(_Warm, ProvidedComponent):
    """A :class:`ProvidedComponent` that overrides ``warmup``."""


def _is_async_context_manager(cls: type[Any]) -> bool:
    return callable(getattr(cls, "__aenter__", None)) and callable(getattr(cls, "__aexit__", None))


async def _call_hook(obj: Any, hook: str) -> None:
    method = getattr(obj, hook, None)
    if method is None:
        return
    result = method()
    if inspect.isawaitable(result):
        await result


def provided_type(provider: providers.Provider[Any]) -> type[Any] | None:
    """The class a provider's value has, found without calling it (or None)."""
    effective = provider.last_overriding or provider
    if isinstance(effective, providers.Object):
        return type(effective.provides)
    if isinstance(effective, providers.BaseSingleton):
        provides = effective.provides
        return provides if isinstance(provides, type) else None
    return None  # factories make a new object per call: nothing to start or stop


def discover(
    container: ServiceContainer, definition: Definition, reserved: Iterable[str]
) -> list[tuple[Component, NodeSpec]]:
    """The user's lifecycle components in ``container``, with graph declarations."""
    skip = _RESERVED | set(reserved)
    found: dict[str, tuple[providers.Provider[Any], type[Any]]] = {}
    container_name = container_class(container).__name__
    issues: list[ConfigIssue] = []
    resources: dict[str, providers.Provider[Any]] = {}
    for name, provider in container.providers.items():
        if name in skip:
            if name not in _RESERVED and is_resource(provider):
                issues.append(
                    ConfigIssue(
                        "<container>",
                        f"{container_name}.{name}",
                        "is what a service kind serves, so it cannot be a providers.Resource: "
                        "make it a Singleton and inject the resource into it",
                    )
                )
            continue
        if is_resource(provider):
            issue = check_resource(name, provider, f"{container_name}.{name}")
            if issue is not None:
                issues.append(issue)
            resources[name] = provider
            continue
        cls = provided_type(provider)
        if cls is not None and (
            _is_async_context_manager(cls)
            or issubclass(cls, Component)
            or any(callable(getattr(cls, h, None)) for h in _HOOKS)
        ):
            found[name] = (provider, cls)
        elif _factory_of_component(provider):
            issues.append(
                ConfigIssue(
                    "<container>",
                    f"{container_name}.{name}",
                    "is a Factory of a Component, which would make a new one per call and run "
                    "none: use providers.Singleton to run it as a component",
                )
            )
    issues += _inline_resources(container, container_name)
    by_identity = {id(provider): name for name, (provider, _) in found.items()}
    by_identity.update((id(provider), name) for name, provider in resources.items())
    out: list[tuple[Component, NodeSpec]] = []
    for name, provider in resources.items():
        declared = definition.components.get(name)
        depends = _unique(
            [
                *_wired(provider, name, by_identity),
                *(declared.depends_on if declared else ()),
            ]
        )
        enhanced = _unique(declared.enhanced_by if declared else ())
        resource = ResourceComponent(name, provider, depends_on=depends, enhanced_by=enhanced)
        source, path = _declared_at(definition, container_name, name, declared is not None)
        out.append((resource, NodeSpec(name, Role.PROCESSING, depends, enhanced, source, path)))
    for name, (provider, cls) in found.items():
        declared = definition.components.get(name)
        depends = _unique(
            [
                *_wired(provider, name, by_identity),
                *getattr(cls, "depends_on", ()),
                *(declared.depends_on if declared else ()),
            ]
        )
        enhanced = _unique(
            [*getattr(cls, "enhanced_by", ()), *(declared.enhanced_by if declared else ())]
        )
        role = getattr(cls, "role", Role.PROCESSING)
        kind: type[_Provided]
        if issubclass(cls, Component):
            warm = cls.warmup is not Component.warmup
            kind = _WarmProvidedComponent if warm else ProvidedComponent
        else:
            warm = callable(getattr(cls, "warmup", None))
            kind = _WarmHookComponent if warm else HookComponent
        component = kind(name, provider, depends_on=depends, enhanced_by=enhanced, role=role)
        source, path = _declared_at(definition, container_name, name, declared is not None)
        out.append((component, NodeSpec(name, role, depends, enhanced, source, path)))
    issues += [
        ConfigIssue(
            definition.source,
            f"components.{name}",
            f"names a lifecycle component, but {container_name} "
            + (
                "gives no Component nor object with on_start/on_shutdown hooks there"
                if name in container.providers
                else "has no such provider"
            ),
        )
        for name in definition.components
        if name not in found and name not in resources
    ]
    if issues:
        raise ConfigError(issues)
    return out


def _wired(provider: providers.Provider[Any], name: str, by_identity: dict[int, str]) -> list[str]:
    """The lifecycle components injected into ``provider``: it must start after them.

    The container's wiring is a dependency declaration: whatever is injected
    into a provider must be running before it starts.
    """
    related: list[providers.Provider[Any]] = list(provider.traverse())
    return [
        by_identity[id(sub)]
        for sub in related
        if id(sub) in by_identity and by_identity[id(sub)] != name
    ]


def _declared_at(
    definition: Definition, container_name: str, name: str, in_file: bool
) -> tuple[str, str]:
    """Where a component is declared: its ``[components.<name>]`` table, or the container."""
    if in_file:
        return definition.source, f"components.{name}"
    return "<container>", f"{container_name}.{name}"


def _inline_resources(container: ServiceContainer, container_name: str) -> list[ConfigIssue]:
    """A ``Resource`` that is not a container attribute has no component to run it."""
    attributes = {id(provider) for provider in container.providers.values()}
    return [
        ConfigIssue(
            "<container>",
            f"{container_name}.{name}",
            f"uses an inline providers.Resource({sub.provides!r}), which nothing would "
            "start or shut down: declare it as an attribute of the container and inject "
            "that attribute",
        )
        for name, provider in container.providers.items()
        if name not in _RESERVED
        for sub in provider.traverse(types=[providers.Resource])
        if id(sub) not in attributes
    ]


def _factory_of_component(provider: providers.Provider[Any]) -> bool:
    effective = provider.last_overriding or provider
    if not isinstance(effective, providers.Factory):
        return False
    provides = effective.provides
    return isinstance(provides, type) and issubclass(provides, Component)


def container_class(container: ServiceContainer) -> type[ServiceContainer]:
    """The declarative class an instance came from (instances are DynamicContainers)."""
    parent: type[ServiceContainer] | None = getattr(container, "declarative_parent", None)
    return parent if parent is not None else type(container)


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _load_factory(spec_factory: str) -> Callable[[BuildContext], Sequence[Component]]:
    module_name, _, attribute = spec_factory.partition(":")
    module = importlib.import_module(module_name)
    factory: Callable[[BuildContext], Sequence[Component]] = getattr(module, attribute)
    return factory


def build_components(
    container: ServiceContainer,
    definition: Definition,
    registry: Registry,
    telemetry: Telemetry | None = None,
) -> tuple[list[Component], list[NodeSpec]]:
    """Every component of the service and its graph node, in declaration order.

    Kinds' and features' components first (features, then kinds, as
    declared), then the user's. Features start one after another in
    :meth:`~mikros_trio.ext.Definition.enabled_features` order (each depends
    on the one before), so their order never varies between runs. Raises
    ``ConfigError`` with every problem found across all of them.
    """
    telemetry = telemetry or Telemetry(definition.name, definition.version)
    wire(container, definition, telemetry)
    issues: list[ConfigIssue] = []
    components: list[Component] = []
    nodes: list[NodeSpec] = []
    reserved: list[str] = []

    # Feature components, in start order: each starts after the one before,
    # and every other component after the last (logs, metrics and traces
    # are up before any user code runs, and down after it).
    previous: list[str] = []

    def add(built: Iterable[Component], source: str, path: str, *, chain: bool) -> None:
        for component in built:
            components.append(component)
            depends_on = (*previous[-1:], *component.depends_on)
            if chain:
                previous.append(component.name)
            nodes.append(
                NodeSpec(
                    component.name,
                    component.role,
                    depends_on,
                    component.enhanced_by,
                    source,
                    path,
                )
            )

    builders: list[tuple[str, Any, str, str, str]] = []
    for feature in definition.enabled_features(registry):
        fspec = registry.features[feature]
        settings = definition.features[feature].settings
        builders.append((feature, settings, fspec.factory, "features", fspec.extra))
    for entry in definition.types:
        kspec = registry.kind(entry.kind)
        assert kspec is not None  # the definition layer validated the kinds
        settings = definition.runtime[entry.kind]
        provider_name = getattr(settings, "provider", None)
        if isinstance(provider_name, str):
            reserved.append(provider_name)
        builders.append((entry.kind, settings, kspec.factory, "runtime", kspec.extra))
    for name, settings, factory, table, extra in builders:
        context = BuildContext(name, settings, definition, container, telemetry)
        try:
            built = _load_factory(factory)(context)
            add(built, definition.source, f"{table}.{name}", chain=table == "features")
        except ConfigError as exc:
            issues.extend(exc.issues)
        except ModuleNotFoundError as exc:
            # A missing optional dependency is an installation mistake, not a crash.
            install = f"pip install 'mikros-trio[{extra}]'" if extra else "install it"
            issues.append(
                ConfigIssue(
                    definition.source,
                    "types" if table == "runtime" else f"features.{name}",
                    f"{name} needs the {exc.name!r} package, which is not installed ({install})",
                )
            )
    try:
        for component, node in discover(container, definition, reserved):
            components.append(component)
            nodes.append(dataclasses.replace(node, depends_on=(*previous[-1:], *node.depends_on)))
    except ConfigError as exc:
        issues.extend(exc.issues)
    if issues:
        raise ConfigError(issues)
    return components, nodes


def wire(container: ServiceContainer, definition: Definition, telemetry: Telemetry) -> None:
    """Give ``container`` the definition, its values as ``config``, and the telemetry hub."""
    container.definition.set_provides(definition)
    container.telemetry.set_provides(telemetry)
    container.config.from_dict(plain(definition))


def plain(value: Any) -> Any:
    """``value`` as plain dicts, lists and scalars (for ``Configuration``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name != "environ"  # secrets must not leak into config
        }
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    return value


class EntryComponent(Component):
    """Base of kinds that run one user entry point (worker, script).

    The entry object comes from a container provider when the component
    starts, so it is built after everything it depends on is running.
    """

    role = Role.GENERATING

    def __init__(self, provider: Callable[[], Any], name: str) -> None:
        self.name = name
        self._provider = provider

    def entry(self) -> Callable[[Lifetime], Awaitable[Any]]:
        """Build the user's object and return its normalised entry point."""
        return entry_point(self._provider(), self.name)


def entry_point(obj: Any, what: str) -> Callable[[Lifetime], Awaitable[Any]]:
    """Normalise a user's worker or script into ``async f(lifetime)``.

    Accepts an async callable taking the :class:`Lifetime` or nothing, or an
    object whose ``run`` method is one.
    """
    target = getattr(obj, "run", obj)
    if not callable(target):
        raise TypeError(f"the {what} provider gave {obj!r}, which is not callable")
    try:
        takes_lifetime = len(inspect.signature(target).parameters) >= 1
    except (TypeError, ValueError):
        takes_lifetime = True

    async def call(lifetime: Lifetime) -> Any:
        result = target(lifetime) if takes_lifetime else target()
        if not inspect.isawaitable(result):
            raise TypeError(f"the {what} {target!r} must be async (it returned {result!r})")
        return await result

    return call
