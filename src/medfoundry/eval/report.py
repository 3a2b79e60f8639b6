"""The run report: one HTML page (plus PNG plots) summarising a run folder.

:func:`write_report` reads what a run leaves behind (``metrics.jsonl``, ``eval/history.jsonl``,
``eval/clip_history.jsonl`` (CLIP runs: :mod:`medfoundry.eval.report_clip`), ``monitors.jsonl``, ``best.json``,
``config.yaml``, ``eval/comparison.json`` from the demo or
``medfoundry eval --compare-random``, and pictures under ``attention/``) and writes
``RUN/report.html`` with plots in ``RUN/report/``:

* the loss terms, the learning-rate and other schedules, the teacher entropies and the DINO loss against
  log K (with the entropy-wall threshold on the loss) and the teacher feature std, over steps;
* every in-training evaluation metric over steps (bootstrap intervals shaded where present);
* the pretrained-vs-random-initialisation table when a comparison was run;
* table rows are the registered tasks' headline metrics (:func:`medfoundry.eval.registry.headline_keys`),
  the better of pretrained and random init marked by each metric's direction;
* the monitors' warnings, the best checkpoint, the attention/PCA pictures and the resolved config.

Plots use matplotlib's Agg canvas directly (no pyplot state, no display).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.eval import registry, report_clip
from medfoundry.eval.report_format import fmt, number, with_ci

_SCHEDULE_KEYS = ("lr", "weight_decay", "teacher_temp", "teacher_momentum")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for r in records:
        if key in r:
            steps.append(int(r["step"]))
            values.append(number(r[key]))
    return np.asarray(steps), np.asarray(values, dtype=float)


# ----------------------------------------------------------------------------------------------- plots
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


def plot_lines(records: Sequence[dict], keys: Sequence[str], path: Path, title: str = "",
               marks: Sequence[tuple[int, str]] = (), baselines: dict[str, float] | None = None) -> Path | None:
    """One small plot per key over steps (see :func:`plot_panels`)."""
    return plot_panels(records, [(k, [k]) for k in keys], path, title, marks, baselines)


def plot_panels(records: Sequence[dict], panels: Sequence[tuple[str, Sequence[str]]], path: Path, title: str = "",
                marks: Sequence[tuple[int, str]] = (), baselines: dict[str, float] | None = None) -> Path | None:
    """One plot per ``(panel title, keys)``, one line per key over steps.

    Keys with ``<key>_ci_low``/``<key>_ci_high`` records get a shaded interval; ``marks`` are
    (step, label) vertical lines (monitor warnings); ``baselines`` maps a key to a reference value
    drawn as a dashed horizontal line (e.g. the random-initialisation result).
    """
    panels = [(t, [k for k in keys if any(k in r for r in records)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    baselines = baselines or {}
    fig, axes = _figure(len(panels))
    for ax, (panel_title, keys) in zip(axes, panels):
        for key in keys:
            x, y = _series(records, key)
            line = ax.plot(x, y, lw=1.2, marker="o" if len(x) <= 20 else None, ms=3,
                           label=key if len(keys) > 1 else None)[0]
            lo_x, lo = _series(records, key + "_ci_low")
            hi_x, hi = _series(records, key + "_ci_high")
            if lo.size and lo.size == hi.size == y.size and np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, alpha=0.15, lw=0, color=line.get_color())
            if key in baselines and math.isfinite(number(baselines[key])):
                ax.axhline(number(baselines[key]), color=line.get_color(), ls="--", lw=0.9, alpha=0.8,
                           label=f"{key}: random init" if len(keys) > 1 else "random init")
        for step, label in marks:
            ax.axvline(step, color="crimson", ls="--", lw=0.8)
            ax.text(step, ax.get_ylim()[1], label, color="crimson", fontsize=6, va="top", rotation=90)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
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
        ax.legend(fontsize=7)
    if has_std:
        ax = axes[i]
        x, y = _series(records, "teacher_feature_std")
        ax.plot(x, y, lw=1.2, color="tab:green")
        ax.set_title("teacher feature std (L2-normalised class tokens)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- html
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.better{font-weight:bold;color:#0a6}
.warn{background:#fff4e0;border-left:4px solid #e80;padding:6px 10px;margin:6px 0;font-size:13px}
.ok{background:#eefbea;border-left:4px solid #3a3;padding:6px 10px;font-size:13px}
img{max-width:100%}pre{background:#f7f7f7;padding:10px;font-size:12px;overflow:auto;max-height:480px}
.muted{color:#777;font-size:12px}
"""


def _comparison_html(comparison: dict) -> str:
    parts = [f"<p>Checkpoint <code>{html.escape(str(comparison.get('checkpoint', '')))}</code> "
             f"(step {comparison.get('step')}) against the same backbone at its random initialisation "
             "(the run's step-0 weights). kNN and linear probe fit on the train split and report the test "
             "split; kNN and linear-probe values carry 95% bootstrap intervals over the test images; raw pixels "
             "are the evaluation-resized images themselves, flattened.</p>"]
    for column, entry in comparison.get("labels", {}).items():
        pre, rnd = entry.get("pretrained", {}), entry.get("random_init", {})
        parts.append(f"<h3>label <code>{html.escape(column)}</code></h3><p class='muted'>"
                     f"{html.escape(str(entry.get('summary', '')))}</p>")
        raw = entry.get("raw_pixels") or {}
        raw_head = "<th>raw pixels</th>" if raw else ""
        parts.append(f"<table><tr><th>metric</th><th>pretrained</th><th>random init</th>{raw_head}</tr>")
        for key in registry.headline_keys(pre):
            a, b = number(pre.get(key)), number(rnd.get(key))
            better = (a < b) if registry.metric_direction(key) == "min" else (a > b)
            cls = " class='better'" if math.isfinite(a) and math.isfinite(b) and better else ""
            raw_cell = f"<td>{with_ci(raw, key) if key in raw else ''}</td>" if raw else ""
            parts.append(f"<tr><td>{key}</td><td{cls}>{with_ci(pre, key)}</td><td>{with_ci(rnd, key)}</td>"
                         f"{raw_cell}</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def _eval_table(history: list[dict]) -> str:
    keys = registry.headline_keys({k for r in history for k in r})
    keys += sorted({k for r in history for k in r if k.startswith("val_") and not k.endswith(("_low", "_high"))})
    if not keys:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = []
    for r in history:
        cells = "".join(f"<td>{with_ci(r, k) if k in r else ''}</td>" for k in keys)
        rows.append(f"<tr><td>{r['step']}</td>{cells}</tr>")
    return f"<div style='overflow-x:auto'><table><tr><th>step</th>{head}</tr>{''.join(rows)}</table></div>"


def _attention_html(run_dir: Path, report_path: Path) -> str:
    root = run_dir / "attention"
    if not root.is_dir():
        return "<p class='muted'>No attention pictures (run <code>medfoundry attention CHECKPOINT IMAGE... "\
               f"--out {html.escape(str(root))}</code>).</p>"
    panels = sorted(root.rglob("*_panel.png"))
    if not panels:
        return "<p class='muted'>No attention pictures.</p>"
    groups: dict[str, list[Path]] = {}
    for p in panels:
        groups.setdefault(str(p.parent.relative_to(root)), []).append(p)
    parts = ["<p>Last-block class-token attention (per head and mean, DINO) and a 3-component PCA of the "
             "patch features (DINOv2), overlaid on the input.</p>"]
    names = sorted({p.name for p in panels})
    for name in names:
        for group in sorted(groups):
            match = [p for p in groups[group] if p.name == name]
            for p in match:
                rel = os.path.relpath(p, report_path.parent)
                parts.append(f"<div><span class='muted'>{html.escape(group)}</span><br>"
                             f"<img src='{html.escape(str(rel))}' alt='{html.escape(name)}'></div>")
    return "\n".join(parts)


def _task_groups(eval_keys: set[str], laid_out: Sequence[str]) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """A plot group per registered task without a layout of its own: one panel per headline metric found
    (with its ``val_`` twin), named after the task."""
    groups = []
    for task in registry.all_tasks():
        keys = task.headline_keys(eval_keys) if task.name not in laid_out else []
        if keys:
            groups.append((task.name, [(k, [k, "val_" + k]) for k in keys]))
    return groups


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and its plots; returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist")
    report_path = Path(out) if out is not None else run_dir / "report.html"
    plot_dir = report_path.parent / "report"
    records = _read_jsonl(run_dir / "metrics.jsonl")
    history = {r["step"]: r for r in _read_jsonl(run_dir / "eval" / "history.jsonl")}
    if not history:  # runs without the history file: take the eval/ keys of the metric lines
        for r in records:
            ev = {k[5:]: v for k, v in r.items() if k.startswith("eval/")}
            if ev:
                history[r["step"]] = {"step": r["step"], **ev}
    history_list = [history[s] for s in sorted(history)]
    warnings = _read_jsonl(run_dir / "monitors.jsonl")
    best = _read_json(run_dir / "best.json")
    comparison = _read_json(run_dir / "eval" / "comparison.json")
    timing = _read_json(run_dir / "eval" / "demo_timing.json")
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    cfg: dict = {}
    if config_text:
        import yaml

        cfg = yaml.safe_load(config_text) or {}
    num_prototypes = cfg.get("dino", {}).get("head", {}).get("out_dim")
    threshold = cfg.get("eval", {}).get("entropy_wall", {}).get("threshold_frac")
    marks = [(int(w["step"]), str(w.get("monitor", ""))) for w in warnings]

    plots: list[tuple[str, Path | None]] = []
    loss_keys = sorted({k for r in records for k in r if k == "loss" or k.endswith("_loss")},
                       key=lambda k: (k != "loss", k))
    plots.append(("Loss terms", plot_lines(records, loss_keys, plot_dir / "losses.png")))
    plots.append(("Schedules", plot_lines(records, _SCHEDULE_KEYS, plot_dir / "schedules.png")))
    plots.append(("Teacher entropy and feature std",
                  plot_teacher(records, num_prototypes, threshold, plot_dir / "teacher.png", marks)))
    other = [k for k in ("grad_norm", "images_per_s") if any(k in r for r in records)]
    plots.append(("Optimisation", plot_lines(records, other, plot_dir / "optimisation.png")))
    eval_keys = {k for r in history_list for k in r}
    baselines = {}
    column = cfg.get("eval", {}).get("label_column", "label")
    if comparison and column in comparison.get("labels", {}):
        baselines = comparison["labels"][column].get("random_init", {})
    ks = sorted({int(k.rsplit("_k", 1)[1]) for k in eval_keys if k.startswith("knn_top1_k")})
    knn_panels = [(f"kNN {name}", [f"{p}knn_{m}_k{k}" for p in ("", "val_") for k in ks])
                  for name, m in (("top-1 accuracy", "top1"), ("balanced accuracy", "balanced_acc"), ("AUC", "auc"))]
    linear_panels = [(f"linear probe {m.replace('_', ' ')} (test, 95% CI)", [f"linear_{m}"])
                     for m in ("accuracy", "balanced_accuracy", "auc")]
    linear_panels.append(("linear probe val score (selects C)", ["linear_val_score"]))
    health_panels = [(k[7:].replace("_", " "), [k]) for k in sorted(eval_keys) if k.startswith("health_")]
    view_panels = [("view retrieval ratio (x chance)", ["view_retrieval_ratio"]), ("view top-1", ["view_top1"])]
    groups = [("kNN", knn_panels), ("Linear probe", linear_panels), ("Representation health", health_panels),
              ("View retrieval", view_panels)]
    groups += _task_groups(eval_keys, laid_out=("knn", "linear", "health", "retrieval"))
    for group, panels in groups:
        name = group.lower().replace(" ", "_")
        plots.append((f"Evaluation over steps: {group} (dashed: random initialisation)" if baselines
                      else f"Evaluation over steps: {group}",
                      plot_panels(history_list, panels, plot_dir / f"eval_{name}.png", baselines=baselines)))

    clip_history = [report_clip.interval_keys(r) for r in _read_jsonl(run_dir / report_clip.HISTORY)]
    if clip_history:
        clip_keys = {k for r in clip_history for k in r}
        plots.append(("Image-text evaluation over steps",
                      plot_panels(clip_history, report_clip.clip_panels(clip_keys), plot_dir / "eval_clip.png")))

    last = records[-1] if records else {}
    body = [f"<h1>medfoundry run report</h1><p><code>{html.escape(str(run_dir.resolve()))}</code><br>"
            f"<span class='muted'>generated {_dt.datetime.now().isoformat(timespec='seconds')}; "
            f"method {html.escape(str(cfg.get('method', '?')))}, backbone "
            f"{html.escape(str(cfg.get('model', {}).get('name', '?')))}, "
            f"{last.get('step', 0)} of {cfg.get('train', {}).get('steps', '?')} steps logged</span></p>"]
    if timing:
        body.append(f"<p class='muted'>demo timing: pretraining {timing.get('train_seconds', 0):.0f} s, "
                    f"everything before the report {timing.get('total_seconds_before_report', 0):.0f} s "
                    f"on {timing.get('cpu_count')} CPU cores.</p>")
    if comparison:
        body.append("<h2>Pretrained vs random initialisation</h2>" + _comparison_html(comparison))
    body.append("<h2>Health monitors</h2>")
    if warnings:
        body.extend(f"<div class='warn'><b>step {w['step']} — {html.escape(str(w.get('monitor')))}"
                    f"{' (fatal)' if w.get('fatal') else ''}</b>: {html.escape(str(w.get('message')))}</div>"
                    for w in warnings)
    else:
        body.append("<div class='ok'>No entropy-wall or collapse warning was raised.</div>")
    best_line = "" if not best else (
        f"<p>Best checkpoint: <code>best.pt</code> at step {best.get('step')} with "
        f"{html.escape(str(best.get('metric')))} = {fmt(best.get('value'))} "
        f"({html.escape(str(best.get('mode')))}).</p>")
    if clip_history:
        body.append("<h2>Image-text evaluation (zero-shot, retrieval, validation loss)</h2>")
        body.append(("" if history_list else best_line) + report_clip.last_evaluation_html(clip_history))
    if history_list:
        body.append("<h2>In-training evaluation</h2>" + best_line)
        body.append(_eval_table(history_list))
    body.append("<h2>Training curves</h2>")
    for title, path in plots:
        if path is not None:
            rel = path.relative_to(report_path.parent)
            body.append(f"<h3>{html.escape(title)}</h3><img src='{html.escape(str(rel))}' alt='{html.escape(title)}'>")
    body.append("<h2>Attention and feature maps</h2>" + _attention_html(run_dir, report_path))
    if config_text:
        body.append(f"<h2>Config</h2><pre>{html.escape(config_text)}</pre>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>medfoundry report: "
            f"{html.escape(run_dir.name)}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_path.with_name(f".{report_path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(report_path)
    return report_path
