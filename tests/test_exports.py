"""The public API changes only on purpose."""

from __future__ import annotations

from types import ModuleType

import pytest

import mikros_trio
import mikros_trio.ext

#: What a service's author uses, in __all__'s order: the entry point, the container, hooks'
#: lifetime, environment access, the Mikros error kinds.
SERVICE_AUTHORS = (
    "ConditionError ConfigError CustomError Env ErrorKind InternalError Lifetime "
    "NotFoundError PermissionDeniedError RPCError Secret Service ServiceContainer "
    "ServiceError ValidationError run"
)

#: What writing a feature or a kind needs, in mikros_trio.ext.
EXTENSION_AUTHORS = (
    "BuildContext Call ClientSettings Component ComponentError ComponentSettings "
    "ComponentState ConfigIssue Definition FeatureConfig FeatureSpec Health KindSpec "
    "LifecycleEvent LifecycleSettings LogSettings MikrosTrioError Observer Phase "
    "Registry Role ServiceType ShutdownTrigger Supervisor Telemetry current_call "
    "current_telemetry default_registry definition_schema load_definition "
    "load_registry parse_definition"
)


@pytest.mark.parametrize(
    ("module", "expected"),
    [(mikros_trio, SERVICE_AUTHORS), (mikros_trio.ext, EXTENSION_AUTHORS)],
    ids=["mikros_trio", "mikros_trio.ext"],
)
def test_all_is_exactly_the_tier(module: ModuleType, expected: str) -> None:
    """Each tier's __all__ is exactly its names, sorted, each importable and documented."""
    assert " ".join(module.__all__) == expected
    for name in module.__all__:
        obj = getattr(module, name)
        assert obj.__doc__, f"{name} has no docstring"


def test_the_tiers_do_not_overlap() -> None:
    """A name has one home: a service author never needs ext, nor ext the package's names."""
    assert set(SERVICE_AUTHORS.split()).isdisjoint(EXTENSION_AUTHORS.split())


def test_importing_the_package_skips_network_stacks() -> None:
    """Importing mikros_trio does not import quart, hypercorn or purerpc."""
    import subprocess
    import sys

    code = (
        "import sys, mikros_trio, mikros_trio.worker, mikros_trio.script;"
        "heavy = ('quart', 'quart_trio', 'hypercorn', 'purerpc');"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
