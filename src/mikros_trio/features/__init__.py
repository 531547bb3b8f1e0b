"""The built-in features: logger, errors, env (always on), metrics and tracing.

Each module is imported only when a service runs its feature; the settings
of all of them live in :mod:`mikros_trio.features.settings`, which imports
nothing heavy, so ``mikros-trio check`` validates ``[features.*]`` without
structlog, prometheus-client or OpenTelemetry loaded.
"""
