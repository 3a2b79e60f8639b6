"""Hooks the loop calls after each step: in-training evaluation, health monitors, best-checkpoint tracking.

A hook is any object with ``on_step_end(step, metrics, method, run_dir) -> dict[str, float] | None``
(:class:`medfoundry.eval.hooks.Hook`); returned values are logged with the step's metrics. Hooks run on
every rank (evaluations may need collectives) and must return the same keys on every rank.
:data:`HOOK_BUILDERS` lists the builders ``(cfg) -> list[Hook]``, the evaluation package's first; add your
own with :func:`register_hook_builder`. The loop knows nothing about what they do.
"""

from __future__ import annotations

from collections.abc import Callable

from medfoundry.config.schema import RunConfig
from medfoundry.eval import clip_hook, in_training
from medfoundry.eval.hooks import Hook

#: Builders consulted by :func:`build_hooks`, in order.
HOOK_BUILDERS: list[Callable[[RunConfig], list[Hook]]] = [in_training.build, clip_hook.build]


def register_hook_builder(fn: Callable[[RunConfig], list[Hook]]) -> Callable[[RunConfig], list[Hook]]:
    """Decorator: add a builder ``(cfg) -> list[Hook]`` consulted by :func:`build_hooks` (after the built-in ones)."""
    HOOK_BUILDERS.append(fn)
    return fn


def build_hooks(cfg: RunConfig) -> list[Hook]:
    """All hooks the config asks for, from every builder in :data:`HOOK_BUILDERS`."""
    return [hook for builder in HOOK_BUILDERS for hook in builder(cfg)]


__all__ = ["HOOK_BUILDERS", "Hook", "build_hooks", "register_hook_builder"]
