"""A service: definition + container + supervisor, and the ``run`` entry point.

``Service`` is what tests and the CLI drive; :func:`run` is what a
service's ``main.py`` awaits: it owns the process (signals, logging, exit
code) and never returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import trio

from ._container import ServiceContainer, build_components, container_class
from ._definition import Definition, env_forms, load_definition
from ._gc import GcTuning
from ._health import Health
from ._listen import WORKER_ENV
from ._registry import Registry, default_registry
from ._supervisor import LifecycleEvent, Supervisor
from ._telemetry import Telemetry, redact_current
from ._watchdog import MARGIN, Watchdog
from .errors import ConfigError, ConfigIssue

__all__ = [
    "Service",
    "event_printer",
    "find_config",
    "report_config_error",
    "run",
    "validate_with_envs",
]

T = TypeVar("T")

log = logging.getLogger("mikros_trio")

#: Environment switch for ``--verbose`` when a service is run as ``python main.py``.
VERBOSE_ENV = "MIKROS_TRIO_VERBOSE"

#: Seconds features always get to flush, even when the shutdown used all of
#: shutdown_timeout: half the watchdog's margin, so the flush ends first.
FLUSH_FLOOR = MARGIN / 2


class Service:
    """One service, built from a container and a service.toml.

    ``config`` is the service.toml (a path, or a parsed
    :class:`~mikros_trio.ext.Definition`); by default the one
    :func:`find_config` finds for the container.

    ``build()`` validates everything (config, environment, container,
    graph) without constructing or starting any component, raising
    :class:`~mikros_trio.ConfigError` with every problem found. ``run()``
    builds if needed, then runs the lifecycle and returns the exit code;
    under ``nursery.start`` it resumes the caller once the service is ready.

    ``handle_signals=True`` means the service owns the process, as
    :func:`run` does: SIGTERM, SIGINT and SIGHUP drain it, and a watchdog
    thread ends the process (exit 124) when a hook holds it past
    ``start_timeout`` or ``shutdown_timeout``. Never in-process (tests).

    Example::

        service = Service(Container, "service.toml")
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            ...                      # the service is serving
            service.stop()
    """

    def __init__(
        self,
        container: ServiceContainer | type[ServiceContainer],
        config: str | os.PathLike[str] | Definition | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        registry: Registry | None = None,
        handle_signals: bool = False,
        on_event: Callable[[LifecycleEvent], None] | None = None,
        verbose: bool = False,
    ) -> None:
        self.container: ServiceContainer = container() if isinstance(container, type) else container
        self._config = find_config(self.container) if config is None else config
        self._environ = environ
        self._registry = registry or default_registry()
        self._handle_signals = handle_signals
        self._on_event = on_event
        self._verbose = verbose
        self._definition: Definition | None = None
        self._supervisor: Supervisor | None = None
        self._telemetry: Telemetry | None = None

    def build(self) -> Supervisor:
        """Validate and wire everything; idempotent. Raises ``ConfigError``."""
        if self._supervisor is not None:
            return self._supervisor
        definition = self._config
        if not isinstance(definition, Definition):
            definition = load_definition(
                definition,
                environ=self._environ,
                registry=self._registry,
                service_model=container_class(self.container).service_model,
            )
        self._supervisor = validate_with_envs(definition, lambda: self._supervise(definition))
        self._definition = definition
        return self._supervisor

    def _supervise(self, definition: Definition) -> Supervisor:
        telemetry = Telemetry(definition.name, definition.version, verbose=self._verbose)
        components, nodes = build_components(self.container, definition, self._registry, telemetry)
        self._telemetry = telemetry
        lifecycle = definition.lifecycle
        on_event = telemetry.event
        if self._on_event is not None:
            user_sink, hub_sink = self._on_event, telemetry.event

            def on_event(event: LifecycleEvent) -> None:
                hub_sink(event)
                user_sink(event)

        watchdog = None
        if self._handle_signals:
            watchdog = Watchdog()
            watchdog.flush = functools.partial(_flush_logs, telemetry)
        return Supervisor(
            components,
            nodes=nodes,
            lifecycle=lifecycle,
            handle_signals=self._handle_signals,
            on_event=on_event,
            watchdog=watchdog,
        )

    @property
    def definition(self) -> Definition:
        """The loaded definition (after :meth:`build`)."""
        self.build()
        assert self._definition is not None
        return self._definition

    @property
    def supervisor(self) -> Supervisor:
        """The supervisor running the components (after :meth:`build`)."""
        return self.build()

    @property
    def telemetry(self) -> Telemetry:
        """The service's telemetry hub: features' observers and objects (after :meth:`build`)."""
        self.build()
        assert self._telemetry is not None
        return self._telemetry

    @property
    def health(self) -> Health:
        """The service's health state."""
        return self.build().health

    @property
    def events(self) -> list[LifecycleEvent]:
        """The lifecycle event log, in order."""
        return self.build().events

    @property
    def exit_code(self) -> int:
        """The exit code the run earned (after ``run`` returned)."""
        return self.build().exit_code

    def stop(self, reason: str = "stop requested", *, exit_code: int | None = None) -> None:
        """Begin graceful shutdown. Idempotent."""
        self.build().stop(reason, exit_code=exit_code)

    async def run(self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED) -> int:
        """Run the whole lifecycle; return the exit code."""
        supervisor = self.build()
        # Every task of the service inherits the hub: log lines find their
        # service (name, version, sink) through it, even with several
        # services in one process.
        token = self.telemetry.activate()
        ready = False

        lifecycle = self.definition.lifecycle
        gc_tuning: GcTuning | None = None

        def on_ready(value: Any) -> None:
            nonlocal ready, gc_tuning
            ready = True
            # What start built lives as long as the service (see _gc).
            gc_tuning = GcTuning(freeze=lifecycle.gc_freeze, threshold=lifecycle.gc_threshold)
            task_status.started(self)

        try:
            code = await supervisor.run(task_status=_Relay(on_ready))
            # Features flush last (logs, spans), within what is left of the
            # shutdown deadline but never less than FLUSH_FLOOR, which still
            # ends before the watchdog acts; a cut here is a lost flush, not
            # a hang.
            trigger = supervisor.trigger
            now = trio.current_time()
            began = trigger.time if trigger is not None else now
            deadline = max(began + supervisor.lifecycle.shutdown_timeout, now + FLUSH_FLOOR)
            with trio.move_on_at(deadline) as flush:
                await self.telemetry.close()
            if flush.cancelled_caught:
                log.warning("flushing features was cut after %.1f s", trio.current_time() - now)
        finally:
            if gc_tuning is not None:
                gc_tuning.release()
            self.telemetry.deactivate(token)
        if not ready:
            task_status.started(self)  # never got ready: the caller still resumes
        return code


def _flush_logs(telemetry: Telemetry) -> None:
    """Flush what holds log lines: the features' objects that flush, logging, stdio.

    The watchdog's last step before it ends the process. The logger
    feature publishes its pipeline on the hub; it is found there by what
    it does (a ``flush()``), since core never imports a feature.
    """
    flushers = [getattr(obj, "flush", None) for obj in telemetry.published()]
    flushers += [handler.flush for handler in logging.getLogger().handlers]
    flushers += [stream.flush for stream in (sys.stdout, sys.stderr) if stream is not None]
    for flush in flushers:
        if callable(flush):
            with contextlib.suppress(Exception):
                flush()


def validate_with_envs(definition: Definition, step: Callable[[], T]) -> T:
    """Run a validation ``step``; report its issues and missing envs in one ``ConfigError``.

    Required environment variables are checked alongside the container and
    graph, so a user sees every problem in one pass.
    """
    issues = [
        ConfigIssue(
            definition.source,
            "envs",
            f"required environment variable {name} is "
            + ("empty" if definition.env_value(name) == "" else "not set")
            + " (nor its per-service override "
            f"{' or '.join(env_forms(definition.full_name or definition.name, name)[:-1])})",
        )
        for name in definition.missing_envs()
    ]
    try:
        result = step()
    except ConfigError as error:
        raise ConfigError([*issues, *error.issues]) from None
    if issues:
        raise ConfigError(issues)
    return result


class _Relay:
    """A ``task_status`` that calls back instead of moving a task."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[Any], None]) -> None:
        self._callback = callback

    def started(self, value: Any = None) -> None:
        self._callback(value)


# Whether this module paused the collector, and so resumes it: a collector
# the user turned off stays off.
_paused_collector = False


def pause_collection() -> None:
    """Pause the garbage collector until :func:`run` has built its service.

    Everything imported and built before a service serves lives as long as
    the process, so collections during start-up only rescan it: a young
    collection every 700 allocations, a full one as the heap passes 100 000
    objects. :func:`run` pauses it for its build and resumes it once what
    was built is frozen (``[lifecycle] gc_freeze``); a caller that owns the
    process from its first line (the command line) may pause it sooner.
    """
    global _paused_collector
    if gc.isenabled():
        gc.disable()
        _paused_collector = True


def _resume_collection() -> None:
    global _paused_collector
    if _paused_collector:
        _paused_collector = False
        gc.enable()


def report_config_error(error: ConfigError) -> None:
    """Print a configuration error the way users should see it: no traceback."""
    print(f"mikros-trio: {error.render()}", file=sys.stderr)


def event_printer() -> Callable[[LifecycleEvent], None]:
    """An ``on_event`` sink for ``--verbose``: one line per event, times from the first."""
    origin: list[float] = []

    def emit(event: LifecycleEvent) -> None:
        if not origin:
            origin.append(event.time)
        shifted = dataclasses.replace(event, time=event.time - origin[0])
        # A component's stop reason may quote anything, secrets included.
        print(redact_current(str(shifted)), file=sys.stderr, flush=True)

    return emit


def find_config(container: ServiceContainer | type[ServiceContainer]) -> Path:
    """The service.toml of ``container`` when none is named.

    The one beside the file of the module that defines the container's
    class (``main.py`` run as a script included), else the one in the
    working directory (how ``mikros-trio run package.module`` finds it
    from a project's root); when neither exists, the first, which the
    error then names.
    """
    cls = container if isinstance(container, type) else container_class(container)
    module_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    here = Path("service.toml")
    if module_file is None:
        return here
    beside = Path(module_file).resolve().with_name("service.toml")
    return here if not beside.is_file() and here.is_file() else beside


async def run(
    container: ServiceContainer | type[ServiceContainer],
    config: str | os.PathLike[str] | None = None,
    *,
    verbose: bool | None = None,
    workers: int | None = None,
) -> NoReturn:
    """Run a service until it stops, then exit the process with its exit code.

    ``config`` is the service.toml; by default the one beside the module
    that defines the container (see :func:`find_config`), so a service's
    ``main.py`` needs one line: ``trio.run(mikros_trio.run, Container)``.

    Handles SIGTERM, SIGINT and SIGHUP (another one during shutdown forces
    the exit, 128 + N), ends the process with 124 if a hook holds it past
    ``start_timeout`` or ``shutdown_timeout`` (plus 1 s), prints
    configuration errors without a traceback (exit 2), and prints the
    lifecycle event log when ``verbose`` (or ``MIKROS_TRIO_VERBOSE=1``).
    ``workers`` overrides ``[lifecycle] workers``: above 1, this process
    becomes the parent of that many worker processes, each started as
    ``mikros-trio run`` of ``container``'s class (its module, or the script
    run as ``__main__``), which must then be a class, not an instance.
    Call it from ``trio.run``::

        if __name__ == "__main__":
            trio.run(mikros_trio.run, Container)
    """
    await run_process(container, config, verbose=verbose, workers=workers, target=None)


async def run_process(
    container: ServiceContainer | type[ServiceContainer],
    config: str | os.PathLike[str] | None,
    *,
    verbose: bool | None,
    workers: int | None,
    target: str | None,
) -> NoReturn:
    """:func:`run`, with the command-line ``target`` workers are started from (None: derive it)."""
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    if config is None:
        config = find_config(container)
    pause_collection()
    parent_of = 0  # workers to start as their parent, or 0: serve in this process
    link = None
    try:
        service = Service(
            container,
            Path(config),
            handle_signals=True,
            on_event=event_printer() if verbose else None,
            verbose=verbose,
        )
        try:
            service.build()
        except ConfigError as error:
            report_config_error(error)
            raise SystemExit(2) from None
        # _workers is imported only by a parent or a worker: a single process
        # does not pay for it at start.
        in_worker = WORKER_ENV in os.environ
        count = service.definition.lifecycle.workers if workers is None else workers
        if count != 1 and not in_worker:
            from ._workers import worker_count

            count = worker_count(count)
            if count > 1:
                parent_of = count
        if in_worker:
            from ._workers import worker_link

            link = worker_link()
        if service.definition.lifecycle.gc_freeze and not parent_of:
            # Everything built so far lives as long as the process: move it out
            # of the collector's sight, which halves GC time during start and
            # stop of large graphs (bench/graph_scale.py). What start builds is
            # frozen once the service is ready (_gc).
            gc.freeze()
    finally:
        _resume_collection()
    if parent_of:
        raise SystemExit(await _parent(container, config, service, parent_of, verbose, target))
    code = await (service.run() if link is None else link.run(service))
    raise SystemExit(code)


async def _parent(
    container: ServiceContainer | type[ServiceContainer],
    config: str | os.PathLike[str],
    service: Service,
    count: int,
    verbose: bool,
    target: str | None,
) -> int:
    """Become the parent of ``count`` workers (see :mod:`._workers`); the exit code."""
    from ._workers import run_workers

    if target is None:
        try:
            target = _target_of(container)
        except ValueError as error:
            print(f"mikros-trio: {error}", file=sys.stderr)
            return 2
    on_event = event_printer() if verbose else None
    command = _worker_command(target, config, verbose)
    return await run_workers(command, service.definition, count, on_event=on_event)


def _worker_command(target: str, config: str | os.PathLike[str], verbose: bool) -> list[str]:
    command = [sys.executable, "-m", "mikros_trio.cli", "run", target]
    command += ["--config", os.path.abspath(config)]
    return [*command, "--verbose"] if verbose else command


def _target_of(container: ServiceContainer | type[ServiceContainer]) -> str:
    """``module:Class`` (or ``path/to/main.py:Class``) a worker imports ``container`` from."""
    if not isinstance(container, type):
        raise ValueError(
            "workers > 1 start each worker from the container class: "
            "pass the class to mikros_trio.run, not an instance"
        )
    module = container.__module__
    if module == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name  # run with python -m
        else:
            path = getattr(main, "__file__", None)
            if path is None:
                raise ValueError("workers > 1 need the container in a file or module")
            return f"{Path(path).resolve()}:{container.__qualname__}"
    return f"{module}:{container.__qualname__}"
