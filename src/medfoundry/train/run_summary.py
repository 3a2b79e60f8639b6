"""The start-of-run summary: one compact block saying what this start of ``train`` is about to do.

Printed once per start on the main rank and written into the run folder (``run_summary.txt``, one block
appended per start, so a resumed run keeps the history of its starts; ``run_summary.json``, the latest
start), so a log or a folder answers the first questions about a run without reading its config: which
model and how many parameters train, on which device and precision, on how many ranks, from which data
(how many samples were found, how many were skipped while indexing), with which batch and horizon, and
from which step.

The functions take explicit values; the training loop (a builder) assembles them from its run config,
method and loader.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

#: at most this many skipped files are named in the text block (all are counted; the JSON keeps 100)
_SHOWN_SKIPPED = 5
_KEPT_SKIPPED = 100


@dataclass
class ParamCount:
    """Parameter count of one part of the trained module (``name`` "all" is the whole module)."""

    name: str
    total: int
    trainable: int

    @property
    def frozen(self) -> int:
        """Parameters that receive no gradient (a teacher, a frozen tower or layer)."""
        return self.total - self.trainable


@dataclass
class RunSummary:
    """What one start of a run is about to do; every field is a plain value (see :func:`format_summary`)."""

    run_dir: str
    method: str
    backbone: str  # the configured backbone name (model.name)
    parameters: list[ParamCount]  # "all" first, then the module's parts, then its named backbones
    device: str  # e.g. "cpu", "cuda:0 (NVIDIA H100 80GB HBM3)"
    precision: str  # resolved: fp32 | bf16
    world_size: int
    data_kind: str  # the training data's source kind (data.kind, clip.data.kind, ...), "" if unknown
    inputs: dict[str, str]  # config key -> path of every input the run reads (data root, weights, ...)
    samples: int | None  # samples (files, slices, tiles, pairs) the training source found
    skipped: list[tuple[str, str]] | None  # (file, reason) the source skipped while indexing; None: not reported
    batch_size: int  # global batch
    steps: int  # train.steps
    start_step: int  # 0 for a new run
    resumed_from: str | None = None  # checkpoint resumed from
    outputs: list[str] = field(default_factory=list)  # metrics.jsonl, tensorboard, wandb, mlflow ...
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))


def parameter_counts(module: nn.Module, backbones: dict[str, nn.Module] | None = None) -> list[ParamCount]:
    """Counts of ``module`` as a whole ("all"), of each direct child holding parameters (student, teacher, towers),
    of parameters held by ``module`` itself ("(own)", e.g. CLIP's logit scale) and of each named backbone.

    Call it before the module is wrapped or sharded: then every count is of whole (global) tensors.
    """
    def count(params) -> ParamCount:
        unique = {id(p): p for p in params}.values()
        return ParamCount("", sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad))

    rows = [_named("all", count(module.parameters()))]
    for name, child in module.named_children():
        part = count(child.parameters())
        if part.total:
            rows.append(_named(name, part))
    own = count(module.parameters(recurse=False))
    if own.total:
        rows.append(_named("(own)", own))
    for name, backbone in (backbones or {}).items():
        rows.append(_named(name, count(backbone.parameters())))
    return rows


def _named(name: str, c: ParamCount) -> ParamCount:
    return ParamCount(name, c.total, c.trainable)


def source_counts(dataset: Any) -> tuple[int | None, list[tuple[str, str]] | None]:
    """``(samples found, files skipped while indexing)`` of a training dataset, as far as it reports them.

    The samples are ``len(dataset)``; the skipped files are the ``skipped`` list of its source (``dataset.source``
    or ``dataset.pairs``), which the medical sources keep (unreadable or unusable volumes, slides, rows); ``None``
    where the source does not report one.
    """
    try:
        samples = len(dataset)
    except TypeError:
        samples = None
    source = getattr(dataset, "source", None) or getattr(dataset, "pairs", None)
    skipped = getattr(source, "skipped", None)
    return samples, ([(str(p), str(r)) for p, r in skipped] if skipped is not None else None)


def _n(value: int) -> str:
    """A parameter count, short: 5.53M, 86.6M, 1.23B, 384."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            scaled = value / size
            return f"{scaled:.3g}{unit}" if scaled < 100 else f"{scaled:.0f}{unit}"
    return str(value)


def _params_line(c: ParamCount) -> str:
    if c.trainable == c.total:
        return f"{c.name} {_n(c.total)} trainable"
    if c.trainable == 0:
        return f"{c.name} {_n(c.total)} frozen"
    return f"{c.name} {_n(c.total)} ({_n(c.trainable)} trainable, {_n(c.frozen)} frozen)"


def format_summary(s: RunSummary) -> str:
    """The summary as a compact text block (a dozen lines at most), for the log and ``run_summary.txt``."""
    rows = {c.name: c for c in s.parameters}
    whole = rows.get("all")
    parts = [c for c in s.parameters if c.name != "all"]
    if s.start_step:
        start = f"resuming at step {s.start_step}" + (f" from {s.resumed_from}" if s.resumed_from else "")
    else:
        start = "new run (step 0)"
    if s.samples is None:
        found = "samples: not reported"
    else:
        found = f"{s.samples} samples found"
    if s.skipped is not None:
        found += f", {len(s.skipped)} skipped" + (" while indexing" if s.skipped else "")
    lines = [
        f"run summary ({s.started})",
        f"  run dir    {s.run_dir}",
        f"  method     {s.method}, backbone {s.backbone}",
    ]
    if whole is not None:
        lines.append(f"  params     {_n(whole.total)} total, {_n(whole.trainable)} trainable, "
                     f"{_n(whole.frozen)} frozen")
    if parts:
        lines.append("             " + "; ".join(_params_line(c) for c in parts))
    per_rank = s.batch_size // max(1, s.world_size)
    lines += [
        f"  device     {s.device}, {s.precision}, world size {s.world_size}",
        f"  data       {s.data_kind or 'source'}: {found}",
    ]
    lines += [f"             {key} = {path}" for key, path in s.inputs.items()]
    lines += [f"             skipped {path}: {reason}" for path, reason in (s.skipped or [])[:_SHOWN_SKIPPED]]
    if s.skipped and len(s.skipped) > _SHOWN_SKIPPED:
        lines.append(f"             ... and {len(s.skipped) - _SHOWN_SKIPPED} more skipped (run_summary.json)")
    lines += [
        f"  schedule   batch {s.batch_size} ({per_rank} per rank), {s.steps} steps, {start}",
    ]
    if s.outputs:
        lines.append(f"  logging    {', '.join(s.outputs)}")
    return "\n".join(lines)


def write_summary(run_dir: str | Path, summary: RunSummary) -> str:
    """Append the text block to ``RUN/run_summary.txt``, write ``RUN/run_summary.json`` (this start); return the block.

    The JSON holds the exact counts (``parameters`` with total/trainable/frozen each) and up to 100 skipped files.
    """
    run_dir = Path(run_dir)
    text = format_summary(summary)
    with open(run_dir / "run_summary.txt", "a") as fh:
        fh.write(text + "\n\n")
    record = asdict(summary)
    record["parameters"] = [{**asdict(c), "frozen": c.frozen} for c in summary.parameters]
    if summary.skipped is not None:
        record["skipped_count"] = len(summary.skipped)
        record["skipped"] = [list(item) for item in summary.skipped[:_KEPT_SKIPPED]]
    tmp = run_dir / ".run_summary.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(run_dir / "run_summary.json")
    return text
