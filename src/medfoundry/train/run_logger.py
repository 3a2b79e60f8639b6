"""Metric output of a run: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard, progress, trackers.

On resume every per-step record file of the run (:data:`STEP_RECORDS`) drops the lines past the resumed
step, so steps redone after a crash are not recorded twice.

Progress is a tqdm bar when stderr is a terminal and plain newline-terminated lines every ``train.log_every``
steps otherwise (:mod:`medfoundry.train.progress`). TensorBoard gets the scalars, a grid of the first batch's
input crops (:mod:`medfoundry.train.sample_images`) and, when the logger closes, the run's hyperparameters with
its last metrics (the hparams dashboard). The optional trackers (:mod:`medfoundry.train.tracking`) get every
logged record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medfoundry.train.progress import PlainProgress, stderr_is_terminal
from medfoundry.train.sample_images import input_grid
from medfoundry.train.tracking import Trackers, finite_numbers

#: Per-step JSON-lines files of a run folder (relative paths) that a resume truncates to the resumed step.
STEP_RECORDS = ("metrics.jsonl", "eval/history.jsonl", "eval/clip_history.jsonl", "monitors.jsonl")


class RunLogger:
    """Writes metrics on the main process only; on resume, drops lines past the resumed step.

    ``log_every`` spaces the plain progress lines (stderr not a terminal); ``hparams`` (flat, see
    :func:`~medfoundry.train.tracking.flat_params`) go to TensorBoard's hparams dashboard at :meth:`close`;
    ``trackers`` receive every logged record and are closed with the logger.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, total_steps: int,
                 tensorboard: bool = True, progress: bool = True, log_every: int = 1,
                 hparams: dict[str, Any] | None = None, trackers: Trackers | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        self.lines: PlainProgress | None = None
        self.hparams = hparams or {}
        self.trackers = trackers
        self.last: dict[str, Any] = {}
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
        if progress and stderr_is_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=0.1)
        elif progress:  # a log file (CI, SLURM): a bar's \r redraws would join the steps onto a few lines
            self.lines = PlainProgress(start_step, total_steps, log_every)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line ``{"step": step, **metrics}`` and mirror it to TensorBoard and the trackers."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.last = record
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.trackers is not None:
            self.trackers.log_metrics(step, {k: v for k, v in record.items() if k != "step"})

    def log_inputs(self, step: int, batch: dict) -> None:
        """A grid of up to 8 of the batch's input crops as the TensorBoard image ``inputs/<batch key>`` at ``step``.

        Call it with a batch already drawn (the loop's first): nothing random is drawn here.
        """
        if not self.enabled or self.tb is None:
            return
        found = input_grid(batch)
        if found is not None:
            key, grid = found
            self.tb.add_image(f"inputs/{key}", grid, step)

    def advance(self, n: int = 1, loss: float | None = None, lr: float | None = None) -> None:
        """Move the progress bar, or write a plain progress line at each ``log_every``-th step."""
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.lines is not None:
            self.lines.update(n, loss, lr)

    def write(self, message: str) -> None:
        """Print a message without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self, status: str = "finished") -> None:
        """Write the hparams summary, close TensorBoard, the bar and the trackers (``status``: finished, failed,
        stopped)."""
        if self.tb is not None:
            if self.hparams:
                self._write_hparams()
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.trackers is not None:
            self.trackers.close(status)

    def _write_hparams(self) -> None:
        """TensorBoard's hparams records in the run's own event file: the hyperparameters and, as its metrics, the
        scalar tags of the last logged record (their values are those scalars)."""
        from torch.utils.tensorboard.summary import hparams

        metrics = finite_numbers({k: v for k, v in self.last.items() if k != "step"})
        experiment, start, end = hparams(self.hparams, metrics)
        writer = self.tb._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary, self.last.get("step"))


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
