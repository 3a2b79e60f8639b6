"""The run report's plots: metric curves over training steps with intervals, reference lines and markers, and the
teacher's entropy panel (:mod:`medfoundry.eval.report` lays them out in the HTML page).

Every axis is labelled (x: training step; y: the metric kind or quantity, :func:`axis_label`). Plots use
matplotlib's Agg canvas directly (no pyplot state, no display).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfoundry.eval.metric_splits import classification_kind
from medfoundry.eval.report_format import number


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for r in records:
        if key in r:
            steps.append(int(r["step"]))
            values.append(number(r[key]))
    return np.asarray(steps), np.asarray(values, dtype=float)


def _figure(n: int, ncols: int = 3, width: float = 4.2, height: float = 2.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=90)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


#: A plot panel: ``(title, keys)`` or ``(title, keys, y-axis label)``; without a label one is derived from the keys.
Panel = tuple


@dataclass(frozen=True)
class Reference:
    """Values per metric key drawn as horizontal lines (``style``: a matplotlib line style) labelled ``label``:
    the random initialisation, the majority class."""

    label: str
    values: dict[str, float]
    style: str = "--"


@dataclass(frozen=True)
class Point:
    """Values per metric key drawn as one marker at ``step`` labelled ``label``: the final table's number on the
    curve of the same metric, split and checkpoint."""

    label: str
    step: int
    values: dict[str, float]


_Y_LABELS = {"loss": "loss", "lr": "learning rate", "weight_decay": "weight decay",
             "teacher_temp": "teacher temperature", "teacher_momentum": "teacher EMA momentum",
             "grad_norm": "gradient norm (L2)", "images_per_s": "throughput (images / s)",
             "view_retrieval_ratio": "top-1 × N (chance = 1)", "view_top1": "view top-1 (fraction)",
             "linear_val_score": "val score (AUC or balanced accuracy)"}
_KIND_LABELS = {"accuracy": "accuracy (fraction correct)", "balanced_accuracy": "balanced accuracy (mean recall)",
                "auc": "AUC-ROC"}


def axis_label(keys: Sequence[str], fallback: str = "value") -> str:
    """The y-axis label of a panel showing ``keys``: the metric kind (accuracy, balanced accuracy, AUC) or the
    quantity (loss, learning rate, ...) the keys share, else the single key itself, else ``fallback``."""
    labels = set()
    for key in keys:
        kind = classification_kind(key)
        if kind is not None:
            labels.add(_KIND_LABELS[kind])
        elif key in _Y_LABELS:
            labels.add(_Y_LABELS[key])
        elif key.endswith("_loss"):
            labels.add("loss")
        else:
            labels.add(key.replace("_", " "))
    return labels.pop() if len(labels) == 1 else fallback


def plot_lines(records: Sequence[dict], keys: Sequence[str], path: Path, title: str = "",
               marks: Sequence[tuple[int, str]] = (), baselines: dict[str, float] | None = None) -> Path | None:
    """One small plot per key over steps (see :func:`plot_panels`)."""
    return plot_panels(records, [(k, [k]) for k in keys], path, title, marks, baselines)


def _with_split(text: str, key: str, split_of: Callable[[str], str] | None) -> str:
    split = split_of(key) if split_of is not None else ""
    return f"{text} ({split})" if split else text


def plot_panels(records: Sequence[dict], panels: Sequence[Panel], path: Path, title: str = "",
                marks: Sequence[tuple[int, str]] = (), baselines: dict[str, float] | None = None, *,
                split_of: Callable[[str], str] | None = None, references: Sequence[Reference] = (),
                points: Sequence[Point] = ()) -> Path | None:
    """One plot per panel (``(title, keys)`` or ``(title, keys, y label)``), one line per key over steps.

    Every axis is labelled: x "training step", y the panel's label or :func:`axis_label` of its keys. Keys with
    ``<key>_ci_low``/``<key>_ci_high`` records get a shaded interval; ``marks`` are (step, label) vertical lines
    (monitor warnings); ``baselines`` (the random initialisation) and ``references`` are drawn as horizontal
    lines, ``points`` as markers, each only on the key it was computed for; ``split_of(key)`` names the split a
    key is on, added to its legend entries so that a curve and a reference on different splits never look alike.
    """
    refs = ([Reference("random init", dict(baselines))] if baselines else []) + list(references)
    laid_out = []
    for panel in panels:
        panel_title, keys = panel[0], [k for k in panel[1] if any(k in r for r in records)]
        if keys:
            laid_out.append((panel_title, keys, panel[2] if len(panel) > 2 else axis_label(keys, panel_title)))
    if not laid_out:
        return None
    fig, axes = _figure(len(laid_out))
    for ax, (panel_title, keys, ylabel) in zip(axes, laid_out):
        many = len(keys) > 1
        for key in keys:
            x, y = _series(records, key)
            line = ax.plot(x, y, lw=1.2, marker="o" if len(x) <= 20 else None, ms=3,
                           label=_with_split(key, key, split_of))[0]
            lo_x, lo = _series(records, key + "_ci_low")
            hi_x, hi = _series(records, key + "_ci_high")
            if lo.size and lo.size == hi.size == y.size and np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, alpha=0.15, lw=0, color=line.get_color())
            for ref in refs:
                value = number(ref.values.get(key))
                if math.isfinite(value):
                    name = f"{key}: {ref.label}" if many else ref.label
                    ax.axhline(value, color=line.get_color(), ls=ref.style, lw=0.9, alpha=0.8,
                               label=_with_split(name, key, split_of))
            for point in points:
                value = number(point.values.get(key))
                if math.isfinite(value):
                    name = f"{key}: {point.label}" if many else point.label
                    ax.plot([point.step], [value], marker="*", ms=9, ls="none", color=line.get_color(),
                            markeredgecolor="black", markeredgewidth=0.5, label=_with_split(name, key, split_of))
        for step, label in marks:
            ax.axvline(step, color="crimson", ls="--", lw=0.8)
            ax.text(step, ax.get_ylim()[1], label, color="crimson", fontsize=6, va="top", rotation=90)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_teacher(records: Sequence[dict], num_prototypes: int | None, threshold_frac: float | None, path: Path,
                 marks: Sequence[tuple[int, str]] = ()) -> Path | None:
    """Teacher entropies (per sample, of the batch-mean target) and the DINO loss against log K (with the
    entropy-wall threshold on the loss), and the teacher feature std."""
    has_entropy = any("teacher_entropy" in r for r in records)
    has_std = any("teacher_feature_std" in r for r in records)
    if not (has_entropy or has_std):
        return None
    fig, axes = _figure(int(has_entropy) + int(has_std), ncols=2, width=5.5)
    i = 0
    if has_entropy:
        ax = axes[i]
        i += 1
        for key, label in (("teacher_entropy", "teacher per-sample entropy"),
                           ("teacher_mean_entropy", "entropy of the mean teacher target"), ("dino_loss", "DINO loss")):
            if any(key in r for r in records):
                x, y = _series(records, key)
                ax.plot(x, y, lw=1.2, label=f"{label} (nats)")
        if num_prototypes:
            log_k = math.log(num_prototypes)
            ax.axhline(log_k, color="black", ls=":", lw=1, label=f"log K = {log_k:.2f}")
            if threshold_frac:
                ax.axhline(threshold_frac * log_k, color="orange", ls="--", lw=1,
                           label=f"entropy wall: DINO loss >= {threshold_frac:.0%} of log K")
        for step, _ in marks:
            ax.axvline(step, color="crimson", ls="--", lw=0.8)
        ax.set_title("teacher entropies and DINO loss", fontsize=9)
        ax.set_ylabel("entropy / loss (nats)", fontsize=8)
        ax.legend(fontsize=7)
    if has_std:
        ax = axes[i]
        x, y = _series(records, "teacher_feature_std")
        ax.plot(x, y, lw=1.2, color="tab:green")
        ax.set_title("teacher feature std (L2-normalised class tokens)", fontsize=9)
        ax.set_ylabel("mean per-dimension std", fontsize=8)
    for ax in axes:
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)
