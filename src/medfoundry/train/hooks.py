"""Hooks the loop calls after each step: in-training evaluation, health monitors, best-checkpoint tracking.

A hook is any object with ``on_step_end(step, metrics, method, run_dir) -> dict[str, float] | None``;
returned values are logged with the step's metrics. Hooks run on every rank (evaluations may need
collectives) and must return the same keys on every rank. ``build_hooks`` collects the hooks a
config asks for; the loop knows nothing about what they do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn

from medfoundry.config.schema import RunConfig


class Hook(Protocol):
    """Called by the loop after each optimizer step."""

    def on_step_end(self, step: int, metrics: dict[str, float], method: nn.Module,
                    run_dir: Path) -> dict[str, float] | None: ...


HOOK_BUILDERS: list = []  # callables (cfg: RunConfig) -> list[Hook]


def register_hook_builder(fn):
    """Decorator: add a builder ``(cfg) -> list[Hook]`` consulted by :func:`build_hooks`."""
    HOOK_BUILDERS.append(fn)
    return fn


def build_hooks(cfg: RunConfig) -> list[Hook]:
    """All hooks the config asks for (modules register their builders on import)."""
    import importlib

    for module in ("medfoundry.eval.in_training", "medfoundry.eval.clip_hook"):
        importlib.import_module(module)  # each registers its hook builder on import
    hooks: list[Hook] = []
    for builder in HOOK_BUILDERS:
        hooks.extend(builder(cfg))
    return hooks
