"""What the training loop calls after each step: the :class:`Hook` protocol that evaluation hooks implement.

It lives here, below ``train/``, so the hooks (:mod:`medfoundry.eval.in_training`,
:mod:`medfoundry.eval.clip_hook`) need nothing from the loop; :mod:`medfoundry.train.hooks` lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn


class Hook(Protocol):
    """Called by the loop after each optimizer step; returned values are logged with the step's metrics."""

    def on_step_end(self, step: int, metrics: dict[str, float], method: nn.Module,
                    run_dir: Path) -> dict[str, float] | None: ...
