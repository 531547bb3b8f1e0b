"""A third-party extension for the tests: feature ``audit`` and kind ``cron``.

Registered only through entry points of a fake distribution the tests write
(see tests/test_extensions.py), exactly as an installed package would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import trio

from mikros_trio import Lifetime
from mikros_trio.ext import BuildContext, Component, FeatureSpec, KindSpec, Role

#: What the extension's components did, in order; tests clear it.
JOURNAL: list[str] = []


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """``[features.audit]``."""

    level: Literal["low", "high"] = "low"


@dataclass(frozen=True, slots=True)
class CronSettings:
    """``[runtime.cron]``."""

    every: float = 1.0


class Audit(Component):
    """Work-processing: records when it starts and stops."""

    role = Role.PROCESSING

    def __init__(self, level: str) -> None:
        self.name = "audit"
        self.level = level

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        JOURNAL.append(f"audit start {self.level}")
        task_status.started()
        await lifetime.wait_stopping()
        JOURNAL.append("audit stop")


class Cron(Component):
    """Work-generating: ticks every ``every`` seconds until stopping."""

    role = Role.GENERATING

    def __init__(self, every: float) -> None:
        self.name = "cron"
        self.every = every
        self.ticks = 0

    async def run(
        self, lifetime: Lifetime, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        JOURNAL.append("cron start")
        task_status.started()
        while not lifetime.stopping:
            self.ticks += 1
            with trio.move_on_after(self.every):
                await lifetime.wait_stopping()
        JOURNAL.append(f"cron stop after {self.ticks} ticks")


def build_audit(context: BuildContext) -> Sequence[Component]:
    """Feature builder."""
    settings: AuditSettings = context.settings
    return [Audit(settings.level)]


def build_cron(context: BuildContext) -> Sequence[Component]:
    """Kind builder."""
    settings: CronSettings = context.settings
    return [Cron(settings.every)]


audit = FeatureSpec(
    name="audit",
    settings=AuditSettings,
    factory="mikros_trio_testext:build_audit",
    summary="records start and stop",
    depends_on=("logger",),  # a built-in, to show third-party features order among them
)

cron = KindSpec(
    name="cron",
    settings=CronSettings,
    factory="mikros_trio_testext:build_cron",
    summary="ticks on a timer",
)

#: Loads, but is no spec: for the "wrong object" test.
not_a_spec = object()

#: Claims the built-in kind's name: for the clash test.
worker = KindSpec(
    name="worker",
    settings=CronSettings,
    factory="mikros_trio_testext:build_cron",
)
