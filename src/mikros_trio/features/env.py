"""The env feature: typed access to the environment, per-service overrides, secrets.

Design decisions:

- **Checked at boot, read from a snapshot.** Every name in ``envs`` must be
  set, and not empty (as Mikros Go requires), before anything starts
  (:meth:`~mikros_trio.ext.Definition.missing_envs`, all missing names in one
  error, exit code 2). :class:`Env` reads only the
  definition's ``environ`` (the copy taken when service.toml was loaded),
  never ``os.environ`` again, so what was checked is what is read, and a
  test's ``environ=`` is the whole world.
- **Override first.** ``<SERVICE>__KEY`` (the service name upper-cased,
  other characters ``_``; Mikros Go's ``<kebab-name>__KEY`` is accepted
  next) wins over ``KEY``: one environment can hold shared values and
  per-service ones. Declared names are resolved once, at build time. The
  first form that is set is the value, even when it is empty (then a
  declared name is missing). Mikros' own variables (``MIKROS_*``) also take
  Mikros Rust's ``MIKROS_X_<service>``: see
  :meth:`~mikros_trio.ext.Definition.mikros_env`.
- **Only declared names.** Reading a name that ``envs`` does not list is an
  error unless the read gives a ``default=`` (or uses :meth:`Env.get`):
  a silent read of an undeclared name would defeat the boot check, and the
  default says in the code that the variable is optional.
- **Secrets never shown.** Names in ``[features.env] secrets`` (which must
  be in ``envs``) have their values, under every variable they may be read
  from, registered with the service's telemetry at build time, before any
  component starts. The hub derives each value's forms (``repr``, bytes,
  JSON, URL-quoted, hex, base64, a DSN's password: see
  :mod:`mikros_trio._secrets`): the logger masks them in every line, the
  tracing feature in every span, the kinds in every error they send.
  :meth:`Env.secret` wraps a value in :class:`Secret`, whose ``str`` and
  ``repr`` never show it, and errors about a secret's value never quote it.
- **No runtime component.** Everything happens at build time (resolution,
  validation, secret registration, the container's ``env`` provider); at
  run time an :class:`Env` is an immutable lookup table with nothing to
  start, flush or close, so :func:`build_env` returns no component and the
  feature costs nothing per call.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Final, TypeVar, final, overload

from mikros_trio._definition import Definition, env_forms
from mikros_trio._settings import quote, suggest
from mikros_trio.errors import ConfigError, ConfigIssue
from mikros_trio.features.settings import EnvSettings

if TYPE_CHECKING:
    from mikros_trio._component import Component
    from mikros_trio._container import BuildContext

__all__ = ["Env", "Secret", "build_env"]

T = TypeVar("T")

# Where an issue about a value found in the environment comes from (a file
# name, or "<container>", for the other issues).
_ENVIRONMENT: Final = "<environment>"

_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})
# Plain decimal numbers only: int() and float() would also take "1_000",
# non-ASCII digits, "nan" and "inf", none of which a deployment means.
# Integers are 64-bit at most: a longer run of digits is a mistake, and
# past 4,300 digits int() itself raises (CPython's conversion limit).
_INT: Final = re.compile(r"[+-]?[0-9]{1,19}")
_INT_BOUND: Final = 2**63
_FLOAT: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class _Missing:
    """The type of "no default given" (``None`` is a default a caller may want)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<no default>"


_NO_DEFAULT: Final = _Missing()


@final
class Secret:
    """A secret's value, kept out of ``str``, ``repr``, f-strings and log lines.

    Call :meth:`reveal` where the value is really needed (a driver's
    password argument), and nowhere else::

        token = env.secret("API_TOKEN")
        print(token)                       # ***
        client = Client(token=token.reveal())
    """

    __slots__ = ("_value", "name")

    def __init__(self, name: builtins.str, value: builtins.str) -> None:
        self.name = name
        self._value = value

    def reveal(self) -> builtins.str:
        """The value itself."""
        return self._value

    def __str__(self) -> builtins.str:
        return "***"

    def __repr__(self) -> builtins.str:
        return f"Secret({self.name}=***)"

    def __bool__(self) -> builtins.bool:
        """Whether the value is not empty (an optional secret may be)."""
        return bool(self._value)


class Env:
    """Typed, read-only access to the service's environment variables.

    Inject it as ``ServiceContainer.env``::

        class Container(ServiceContainer):
            repo = providers.Singleton(
                Repo,
                dsn=ServiceContainer.env.provided.str.call("DB_DSN"),
                pool=ServiceContainer.env.provided.int.call("DB_POOL", default=4),
            )

    Each read takes the per-service override ``<SERVICE>__KEY`` before
    ``KEY`` (:meth:`source` says which one was read). Names listed in
    ``envs`` are always set (checked at boot); any other name needs a
    ``default=``, or :meth:`get`. A value that does not parse raises
    :class:`~mikros_trio.ConfigError` naming the variable, what was expected
    and, unless it is a secret, the value. Built by the env feature from
    the definition; build one yourself in a unit test with
    ``Env(parse_definition(text, environ={...}))``.
    """

    __slots__ = ("_declared", "_environ", "_secrets", "_service", "_source", "_values")

    def __init__(
        self, definition: Definition, *, secrets: Collection[builtins.str] | None = None
    ) -> None:
        """Resolve every declared name; ``secrets`` default to ``[features.env] secrets``."""
        if secrets is None:
            config = definition.features.get("env")
            settings = config.settings if config is not None else None
            secrets = settings.secrets if isinstance(settings, EnvSettings) else ()
        # The name as written: Mikros Go's override form spells a module path whole.
        self._service = definition.full_name or definition.name
        self._source = definition.source
        self._environ: Mapping[builtins.str, builtins.str] = definition.environ
        self._declared = frozenset(definition.envs)
        self._secrets = frozenset(secrets)
        self._values: dict[builtins.str, tuple[builtins.str, builtins.str]] = {}
        for name in definition.envs:
            found = self._lookup(name)
            if found is not None:
                self._values[name] = found

    def _lookup(self, name: builtins.str) -> tuple[builtins.str, builtins.str] | None:
        """``(value, variable it came from)`` for ``name``, override first, or ``None``."""
        for form in env_forms(self._service, name):
            value = self._environ.get(form)
            if value is not None:
                return value, form
        return None

    def _raw(self, name: builtins.str, default: object) -> tuple[builtins.str, builtins.str] | None:
        """The value and source of ``name``, ``None`` to use ``default``; raises if neither."""
        found = self._values.get(name)
        if found is not None:
            return found
        if name in self._declared:
            # Only an Env built from a definition nobody checked gets here.
            raise ConfigError(
                [
                    ConfigIssue(
                        _ENVIRONMENT,
                        name,
                        "required environment variable is not set (nor its per-service "
                        f"override {' or '.join(env_forms(self._service, name)[:-1])})",
                    )
                ]
            )
        if default is _NO_DEFAULT:
            hint = suggest(name, sorted(self._declared), noun="declared names")
            raise ConfigError(
                [
                    ConfigIssue(
                        self._source,
                        "envs",
                        f"environment variable {name} is read but not declared in envs; "
                        "declare it (it is then required at start-up) or read it with a "
                        f"default= if it is optional{hint}",
                    )
                ]
            )
        return self._lookup(name)

    def _bad(
        self, name: builtins.str, source: builtins.str, value: builtins.str, expected: builtins.str
    ) -> ConfigError:
        where = "" if source == name else f" (read from {source}, its per-service override)"
        got = (
            "a value that is not shown because it is a secret"
            if name in self._secrets
            else quote(value)
        )
        return ConfigError(
            [ConfigIssue(_ENVIRONMENT, name, f"expected {expected}, got {got}{where}")]
        )

    def str(
        self, name: builtins.str, default: builtins.str | _Missing = _NO_DEFAULT
    ) -> builtins.str:
        """The value of ``name`` as text.

        >>> env.str("DB_DSN")  # doctest: +SKIP
        'postgres://db/items'
        """
        found = self._raw(name, default)
        if found is None:
            assert isinstance(default, builtins.str)
            return default
        return found[0]

    def int(
        self, name: builtins.str, default: builtins.int | _Missing = _NO_DEFAULT
    ) -> builtins.int:
        """The value of ``name`` as a decimal integer (``"42"``, ``"-1"``)."""
        found = self._raw(name, default)
        if found is None:
            assert isinstance(default, builtins.int)
            return default
        value, source = found
        if not _INT.fullmatch(value.strip()) or abs(number := builtins.int(value)) >= _INT_BOUND:
            raise self._bad(name, source, value, "a 64-bit integer")
        return number

    def float(
        self, name: builtins.str, default: builtins.float | _Missing = _NO_DEFAULT
    ) -> builtins.float:
        """The value of ``name`` as a decimal number (``"0.5"``, ``"1e3"``, not ``"nan"``)."""
        found = self._raw(name, default)
        if found is None:
            assert isinstance(default, builtins.int | builtins.float)
            return builtins.float(default)
        value, source = found
        # "1e999" matches but overflows to inf: finite numbers only.
        text = value.strip()
        if not _FLOAT.fullmatch(text) or not math.isfinite(number := builtins.float(text)):
            raise self._bad(name, source, value, "a finite number")
        return number

    def bool(
        self, name: builtins.str, default: builtins.bool | _Missing = _NO_DEFAULT
    ) -> builtins.bool:
        """The value of ``name`` as a flag: true/false, 1/0, yes/no, on/off, any case."""
        found = self._raw(name, default)
        if found is None:
            assert isinstance(default, builtins.bool)
            return default
        value, source = found
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise self._bad(name, source, value, "true/false, 1/0, yes/no or on/off")

    @overload
    def get(self, name: builtins.str) -> builtins.str | None: ...

    @overload
    def get(self, name: builtins.str, default: T) -> builtins.str | T: ...

    def get(self, name: builtins.str, default: object = None) -> object:
        """The value of ``name``, or ``default`` when it is set in no form; never raises.

        For optional variables, declared in ``envs`` or not::

            region = env.get("REGION", "eu-west-1")
        """
        found = self._values.get(name) or self._lookup(name)
        return default if found is None else found[0]

    def secret(self, name: builtins.str, default: builtins.str | _Missing = _NO_DEFAULT) -> Secret:
        """The value of ``name``, which ``[features.env] secrets`` lists, as a :class:`Secret`.

        Only listed names: their values are masked in logs and errors from
        start-up, which a name first read here at run time could not be.
        """
        if name not in self._secrets:
            raise ConfigError(
                [
                    ConfigIssue(
                        self._source,
                        "features.env.secrets",
                        f"{name} is read as a secret but not listed here; add it, so its "
                        "value is masked in logs and errors from start-up",
                    )
                ]
            )
        return Secret(name, self.str(name, default))

    def source(self, name: builtins.str) -> builtins.str | None:
        """The variable ``name`` is read from (``"ITEMS_API__DB_DSN"`` or ``"DB_DSN"``), if set."""
        found = self._values.get(name) or self._lookup(name)
        return None if found is None else found[1]

    def __contains__(self, name: object) -> builtins.bool:
        """Whether ``name`` is set, in any of its forms."""
        return isinstance(name, builtins.str) and self.source(name) is not None

    def __repr__(self) -> builtins.str:
        names = ", ".join(
            f"{name} (secret)" if name in self._secrets else name for name in sorted(self._declared)
        )
        return f"<Env of {self._service}: {names or 'no declared names'}>"


def build_env(context: BuildContext) -> list[Component]:
    """Check ``[features.env]``, register secrets, and give the container its :class:`Env`.

    The value of each secret under each variable it may be read from is
    registered with ``context.telemetry.add_secrets`` (named by that
    variable, for warnings) before any component starts; the
    :class:`Env` becomes ``ServiceContainer.env`` and is published on the
    telemetry hub (``telemetry.get(Env)``). Returns no component: see the
    module docstring.
    """
    definition = context.definition
    settings: EnvSettings = context.settings
    declared = definition.envs
    issues = [
        ConfigIssue(
            definition.source,
            f"features.env.secrets[{index}]",
            f"{quote(name)} is not in envs{suggest(name, declared, noun='names in envs')}; "
            "a secret must be a declared, required variable",
        )
        for index, name in enumerate(settings.secrets)
        if name not in declared
    ]
    if issues:
        raise ConfigError(issues)
    environ = definition.environ
    for name in settings.secrets:
        for form in env_forms(definition.full_name or definition.name, name):
            if form in environ:
                context.telemetry.add_secrets([environ[form]], name=form)
    env = Env(definition, secrets=settings.secrets)
    context.container.env.set_provides(env)
    context.telemetry.publish(env)
    return []
