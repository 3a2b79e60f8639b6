"""What the training loop calls after each step: the :class:`Hook` protocol that evaluation hooks implement.

It lives here, below ``train/``, so the hooks (:mod:`medfoundry.eval.in_training`,
:mod:`medfoundry.eval.clip_hook`) need nothing from the loop; :mod:`medfoundry.train.hooks` lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn


class Hook(Protocol):
    """Called by the loop after the optimizer steps it wants; returned values are logged with the step's metrics.

    A hook may define ``wants_step(step, log_step) -> bool`` (``log_step``: whether the loop logs ``step``):
    the loop reads the step's metrics from the device and calls :meth:`on_step_end` only on the steps some hook
    wants or that it logs, so a hook that acts every N steps costs no host sync in between. Without it a hook
    is called on every step. The answer must depend on ``step`` and ``log_step`` only (the same on every rank).
    """

    def on_step_end(self, step: int, metrics: dict[str, float], method: nn.Module,
                    run_dir: Path) -> dict[str, float] | None: ...


def wants_step(hook: Hook, step: int, log_step: bool) -> bool:
    """Whether the loop calls ``hook`` after ``step``: its ``wants_step`` if it has one, else always."""
    ask = getattr(hook, "wants_step", None)
    return True if ask is None else bool(ask(step, log_step))
