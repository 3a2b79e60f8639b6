"""Best-checkpoint tracking for in-training evaluation: ``RUN/best.pt`` and ``RUN/best.json``.

Used by every evaluation hook (image-feature evaluation, CLIP zero-shot). The record survives resume:
the best value so far is read back from ``best.json`` the first time the tracker is used in a run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from torch import nn

from medfoundry.checkpoints.format import atomic_torch_save
from medfoundry.distributed.setup import is_main_process as _is_main


class BestCheckpoint:
    """Keep the method's weights at the best value of one metric.

    Args:
        metric: the result key to follow ("" disables tracking).
        mode: ``max`` or ``min``.
        config: the resolved run config as a dict (stored with the weights so they can be reloaded).
        key_name: the config key that chose ``metric``, named in warnings.
        say: how to print a warning (rank 0 only).
    """

    def __init__(self, metric: str, mode: Literal["max", "min"], config: dict, key_name: str, say=print) -> None:
        self.metric = metric
        self.mode = mode
        self.config = config
        self.key_name = key_name
        self.say = say
        self.value: float | None = None
        self.step: int | None = None
        self._restored = False
        self._warned = False

    def restore(self, run_dir: Path) -> None:
        """Read the best value so far from ``best.json`` (once per run; a resumed run keeps its record)."""
        if self._restored:
            return
        self._restored = True
        path = Path(run_dir) / "best.json"
        if path.is_file():
            try:
                rec = json.loads(path.read_text())
                if rec.get("metric") == self.metric:
                    self.value, self.step = float(rec["value"]), int(rec["step"])
            except (ValueError, KeyError):
                pass

    def better(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (non-finite values never do)."""
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, step: int, results: dict[str, float], method: nn.Module, run_dir: Path,
               sharded: bool = False) -> bool:
        """Save ``best.pt``/``best.json`` if ``results[metric]`` improved; returns whether it did.

        With FSDP (``sharded``) the full weights are gathered collectively, so every rank must call this.
        """
        if not self.metric:
            return False
        self.restore(run_dir)
        if self.metric not in results:
            if not self._warned and _is_main():
                self._warned = True
                self.say(f"warning: {self.key_name} '{self.metric}' is not among the evaluation results "
                         f"({sorted(results)[:12]} ...); no best checkpoint is kept")
            return False
        value = float(results[self.metric])
        if not self.better(value):
            return False
        self.value, self.step = value, step
        if sharded:  # a collective: every rank takes part, rank 0 receives full tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            weights = get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif _is_main():
            weights = method.state_dict()
        if not _is_main():
            return True
        state = {"step": step, "method": weights, "config": self.config, "metric": self.metric, "value": value,
                 "mode": self.mode, "eval": results, "format": "medfoundry-best-v1"}
        atomic_torch_save(state, Path(run_dir) / "best.pt")
        record = {"step": step, "metric": self.metric, "value": value, "mode": self.mode, "checkpoint": "best.pt",
                  "eval": results}
        tmp = Path(run_dir) / ".best.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(Path(run_dir) / "best.json")
        return True
