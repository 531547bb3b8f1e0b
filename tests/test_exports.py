"""The public API changes only on purpose."""

from __future__ import annotations

import mikros_trio

EXPECTED = {
    "Env",
    "Secret",
    "Call",
    "Observer",
    "Telemetry",
    "current_call",
    "current_telemetry",
    "ConditionError",
    "CustomError",
    "ErrorKind",
    "InternalError",
    "NotFoundError",
    "PermissionDeniedError",
    "RPCError",
    "ServiceError",
    "ValidationError",
    "BuildContext",
    "ClientSettings",
    "Component",
    "ComponentError",
    "ComponentSettings",
    "ComponentState",
    "ConfigError",
    "ConfigIssue",
    "Definition",
    "FeatureConfig",
    "FeatureSpec",
    "Health",
    "KindSpec",
    "LifecycleEvent",
    "LifecycleSettings",
    "Lifetime",
    "LogSettings",
    "MikrosTrioError",
    "Phase",
    "Registry",
    "Role",
    "Service",
    "ServiceContainer",
    "ServiceType",
    "ShutdownTrigger",
    "Supervisor",
    "default_registry",
    "definition_schema",
    "load_definition",
    "load_registry",
    "parse_definition",
    "run",
}


def test_all_is_exactly_the_public_api() -> None:
    """__all__ lists exactly the expected names, sorted, each importable and documented."""
    assert set(mikros_trio.__all__) == EXPECTED
    assert list(mikros_trio.__all__) == sorted(mikros_trio.__all__)
    for name in mikros_trio.__all__:
        obj = getattr(mikros_trio, name)
        assert obj.__doc__, f"{name} has no docstring"


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
