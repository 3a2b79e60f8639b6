"""Hooks the loop calls after each step: in-training evaluation, health monitors, best-checkpoint tracking.

A hook is any object with ``on_step_end(step, metrics, method, run_dir) -> dict[str, float] | None``
(:class:`medfoundry.eval.hooks.Hook`); returned values are logged with the step's metrics. Hooks run on
every rank (evaluations may need collectives) and must return the same keys on every rank.
The method's entry builds its own hooks (``MethodEntry.build_hooks``: frozen-feature evaluation and monitors
for the DINO family, zero-shot/retrieval for CLIP); :data:`HOOK_BUILDERS` holds further builders
``(cfg) -> list[Hook]`` added with :func:`register_hook_builder`. The loop knows nothing about what they do.
"""

from __future__ import annotations

from collections.abc import Callable

from medfoundry.config.schema import RunConfig
from medfoundry.eval.hooks import Hook
from medfoundry.methods.registry import get_method_entry

#: Builders consulted by :func:`build_hooks` after the method's own, in order.
HOOK_BUILDERS: list[Callable[[RunConfig], list[Hook]]] = []


def register_hook_builder(fn: Callable[[RunConfig], list[Hook]]) -> Callable[[RunConfig], list[Hook]]:
    """Decorator: add a builder ``(cfg) -> list[Hook]`` consulted by :func:`build_hooks` (after the method's)."""
    HOOK_BUILDERS.append(fn)
    return fn


def build_hooks(cfg: RunConfig) -> list[Hook]:
    """All hooks the config asks for: the method's (its entry's ``build_hooks``), then every :data:`HOOK_BUILDERS`'."""
    builders = [get_method_entry(cfg.method).build_hooks, *HOOK_BUILDERS]
    return [hook for builder in builders for hook in builder(cfg)]


__all__ = ["HOOK_BUILDERS", "Hook", "build_hooks", "register_hook_builder"]
