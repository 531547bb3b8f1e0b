"""Lazy public names (PEP 562) for the package and its ``ext`` tier.

Each public module lists where each name lives; a name is imported on
first use, so importing the package imports no dependency and code that
needs a name or two pays for those alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_module"]


def lazy_module(
    namespace: dict[str, Any],
    module_of: Mapping[str, str],
    elsewhere: Callable[[str], str | None] = lambda name: None,
    submodules: frozenset[str] = frozenset(),
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the module whose globals are ``namespace``.

    ``module_of`` maps each public name to the module (relative to the
    package) it is imported from; ``submodules`` are the package's public
    modules, imported on first access as attributes (``mikros_trio.grpc``
    after ``import mikros_trio``). ``elsewhere(name)`` may return a hint
    naming where a name the module does not export lives; it goes in the
    ``AttributeError``.
    """
    module_name = namespace["__name__"]
    package = namespace["__package__"]

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{module_name}.{name}")  # binds it here too
        source = module_of.get(name)
        if source is None:
            hint = elsewhere(name)
            tail = f": {hint}" if hint else ""
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}{tail}")
        value = getattr(importlib.import_module(source, package), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *module_of, *submodules})

    return __getattr__, __dir__
