"""dependency-injector's containers, imported without its wiring module.

``dependency_injector.containers`` imports ``dependency_injector.wiring`` for
two names, ``wire`` and ``unwire``, and the wiring module imports, when they
are installed, ``fastapi.params`` (all of FastAPI, Starlette, pydantic and
OpenTelemetry's propagators behind it), ``starlette.requests``,
``werkzeug.local`` and ``fast_depends``, to recognise their markers. A
service pays for that at start-up whether or not anything is wired: with
FastAPI installed it is most of the time the framework adds.

So the containers module is imported with a stand-in for the wiring module
whose ``wire`` and ``unwire`` import the real one on first call, then the
stand-in is removed: a container that wires modules (``wiring_config`` or
``container.wire()``) gets dependency-injector's own wiring, every
integration included, and so does any ``from dependency_injector.wiring
import inject, Provide`` in user code, which imports the real module. Only
a process that never wires skips it. When the wiring module is already
imported there is nothing to save and the containers import as usual.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dependency_injector import providers

__all__ = ["containers", "providers"]

_WIRING = "dependency_injector.wiring"


def _on_first_call(name: str) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        wiring = importlib.import_module(_WIRING)
        return getattr(wiring, name)(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = f"dependency_injector.wiring.{name}, imported on first call."
    return forward


def _import_containers() -> types.ModuleType:
    if _WIRING in sys.modules or "dependency_injector.containers" in sys.modules:
        return importlib.import_module("dependency_injector.containers")
    stand_in = types.ModuleType(_WIRING, "Stands in while dependency_injector.containers imports.")
    stand_in.wire = _on_first_call("wire")  # type: ignore[attr-defined]
    stand_in.unwire = _on_first_call("unwire")  # type: ignore[attr-defined]
    # For the length of one import only: the containers module binds the two
    # names, and the real module loads the first time anything asks for it.
    sys.modules[_WIRING] = stand_in
    try:
        return importlib.import_module("dependency_injector.containers")
    finally:
        if sys.modules.get(_WIRING) is stand_in:
            del sys.modules[_WIRING]


if TYPE_CHECKING:
    from dependency_injector import containers
else:
    containers = _import_containers()
