"""Metric output of a run: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard, progress bar.

On resume every per-step record file of the run (:data:`STEP_RECORDS`) drops the lines past the resumed
step, so steps redone after a crash are not recorded twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

#: Per-step JSON-lines files of a run folder (relative paths) that a resume truncates to the resumed step.
STEP_RECORDS = ("metrics.jsonl", "eval/history.jsonl", "eval/clip_history.jsonl", "monitors.jsonl")


class RunLogger:
    """Writes metrics on the main process only; on resume, drops lines past the resumed step."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, total_steps: int,
                 tensorboard: bool = True, progress: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        for name in STEP_RECORDS:
            _truncate_after(Path(run_dir) / name, start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.tb = None
        if progress:
            import sys

            from tqdm import tqdm

            # in a terminal refresh freely; in a log file (CI, SLURM) write a line about every 30 s
            interval = 0.1 if sys.stderr.isatty() else 30.0
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=interval)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line ``{"step": step, **metrics}`` and mirror it to TensorBoard."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        """Move the progress bar."""
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def write(self, message: str) -> None:
        """Print a message without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All metric records of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
