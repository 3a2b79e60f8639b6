"""The run report: one HTML page (plus PNG plots) summarising a run folder.

:func:`write_report` reads what a run leaves behind (``metrics.jsonl``, ``eval/history.jsonl``,
``eval/clip_history.jsonl`` (CLIP runs: :mod:`medfoundry.eval.report_clip`), ``monitors.jsonl``, ``best.json``,
``config.yaml``, ``eval/comparison.json`` from the demo or
``medfoundry eval --compare-random``, and pictures under ``attention/``) and writes
``RUN/report.html`` with plots in ``RUN/report/``:

* the loss terms, the learning-rate and other schedules, the teacher entropies and the DINO loss against
  log K (with the entropy-wall threshold on the loss) and the teacher feature std, over steps;
* every in-training evaluation metric over steps (bootstrap intervals shaded where present), with the random
  initialisation (dashed), the majority class (dotted) and the final table's value (a star) on the curve of the
  same metric and split;
* the pretrained-vs-random-initialisation table when a comparison was run; rows are the registered tasks'
  headline metrics (:func:`medfoundry.eval.registry.headline_keys`), each with the split it is measured on
  (:mod:`medfoundry.eval.metric_splits`) and the majority-class baseline (:mod:`medfoundry.eval.majority`); the
  better of pretrained and random init is highlighted only where their 95% intervals do not overlap;
* warning boxes for splits that cannot be read at face value (:mod:`medfoundry.eval.split_warnings`);
* the monitors' warnings (only when the run folder shows the monitors at work: a method that logs none of their
  metrics, such as CLIP, gets no "Health monitors" box), the best checkpoint, the attention/PCA pictures and the
  resolved config.

Every plot has labelled axes (x: training step; y: the metric or quantity). Plots use matplotlib's Agg canvas
directly (no pyplot state, no display).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medfoundry.eval import registry, report_clip
from medfoundry.eval.majority import labelled_set_baseline, majority_metrics
from medfoundry.eval.metric_splits import SPLIT_WORDS, metric_split, split_word
from medfoundry.eval.report_format import fmt, interval_winner, with_ci
from medfoundry.eval.report_plots import Panel, Point, Reference, plot_lines, plot_panels, plot_teacher
from medfoundry.eval.split_warnings import labelled_set_warnings, val_needs

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
.muted{color:#777;font-size:12px}tr.baseline td{color:#666;font-style:italic}
"""

#: The legend line under every pretrained-vs-random table (the highlighting rule).
HIGHLIGHT_LEGEND = ("Green: the better of pretrained and random init, only where their 95% bootstrap intervals do "
                    "not overlap; no highlight where they overlap or a value has no interval.")

#: The training metrics each health monitor watches (what a run folder must hold for the monitors to have run).
MONITORED = {"entropy wall": "dino_loss_frac", "prototype collapse": "teacher_effective_prototypes_frac",
             "feature collapse": "teacher_feature_std"}


def _split_cell(split: str, sizes: dict[str, int], legend: bool = False) -> str:
    """``split`` with its image count, ``test (n=6359)`` in a table, ``test, n=6359`` in a plot legend."""
    n = sum(sizes.values()) if split == "all" else sizes.get(split)
    if not n:
        return split_word(split)
    return f"{split_word(split)}, n={n}" if legend else f"{split_word(split)} (n={n})"


def _comparison_html(comparison: dict, cfg: dict | None = None, histories: dict[str, Sequence[dict]] | None = None,
                     fallback_baselines: dict[str, dict] | None = None) -> str:
    """The pretrained-vs-random table per label: split and size of each row, the majority-class baseline
    (``fallback_baselines[label]`` when the comparison predates it), a highlight only where the intervals
    separate, and the in-training values of the same step (``histories[label]``: the in-training evaluation on
    the same labelled set) beside it."""
    step = comparison.get("step")
    parts = [f"<p>Checkpoint <code>{html.escape(str(comparison.get('checkpoint', '')))}</code> "
             f"(step {step}) against the same backbone at its random initialisation "
             "(the run's step-0 weights). kNN and linear probe fit on the train split; the <b>split</b> column says "
             "which images each row is measured on. kNN and linear-probe values carry 95% bootstrap intervals over "
             "those images; raw pixels are the evaluation-resized images themselves, flattened; the majority class "
             "always answers the training split's most frequent class (AUC 0.5).</p>"]
    for column, entry in comparison.get("labels", {}).items():
        same_step = next((r for r in (histories or {}).get(column, ()) if r.get("step") == step), None)
        pre, rnd = entry.get("pretrained", {}), entry.get("random_init", {})
        query = str(entry.get("query_split", "test"))
        sizes = {str(k): int(v) for k, v in (entry.get("split_sizes") or {}).items()}
        keys = registry.headline_keys(pre)
        majority = entry.get("majority_class")
        baseline_note = ""
        fallback_baseline = (fallback_baselines or {}).get(column)
        if majority is None and fallback_baseline is not None:
            majority = majority_metrics(fallback_baseline, keys, query)
            baseline_note = " (computed by the report from eval.data: this comparison.json predates the baseline)"
        parts.append(f"<h3>label <code>{html.escape(column)}</code></h3><p class='muted'>"
                     f"{html.escape(str(entry.get('summary', '')))}</p>")
        top = (entry.get("majority") or fallback_baseline or {}).get("class")
        if top is not None:
            parts.append(f"<p class='muted'>majority class: always '{html.escape(str(top))}'{baseline_note}.</p>")
        raw = entry.get("raw_pixels") or {}
        raw_head = "<th>raw pixels</th>" if raw else ""
        maj_head = "<th>majority class</th>" if majority is not None else ""
        parts.append(f"<table><tr><th>metric</th><th>split</th><th>pretrained</th><th>random init</th>{raw_head}"
                     f"{maj_head}</tr>")
        for key in keys:
            winner = interval_winner(pre, rnd, key, registry.metric_direction(key) or "max")
            cls_pre = " class='better'" if winner == 1 else ""
            cls_rnd = " class='better'" if winner == 2 else ""
            raw_cell = f"<td>{with_ci(raw, key) if key in raw else ''}</td>" if raw else ""
            maj_cell = f"<td>{fmt(majority[key]) if key in majority else ''}</td>" if majority is not None else ""
            parts.append(f"<tr><td>{key}</td><td>{_split_cell(metric_split(key, query), sizes)}</td>"
                         f"<td{cls_pre}>{with_ci(pre, key)}</td><td{cls_rnd}>{with_ci(rnd, key)}</td>"
                         f"{raw_cell}{maj_cell}</tr>")
        parts.append(f"</table><p class='muted'>{HIGHLIGHT_LEGEND}</p>")
        if same_step is not None:
            parts.append(_same_step_html(same_step, keys, pre, query))
    if cfg is not None and any(metric_split(k) == "views" for e in comparison.get("labels", {}).values()
                               for k in e.get("pretrained", {})):
        parts.append(f"<p class='muted'>view retrieval: {html.escape(_retrieval_source(cfg))}.</p>")
    return "\n".join(parts)


def _same_step_html(record: dict, keys: Sequence[str], table: dict, query_split: str) -> str:
    """The in-training evaluation of the checkpoint the table evaluates: its val numbers, and its numbers on the
    table's split beside the table's (the same split and the same computation, so they should agree)."""
    val = [f"{k} = {fmt(record[k])}" for k in ("val_" + k for k in keys) if k in record]
    same = [f"{k} = {fmt(record[k])} (table: {fmt(table.get(k))})" for k in keys
            if k in record and metric_split(k, query_split) == metric_split(k) in ("train", "val", "test")]
    parts = []
    if val:
        parts.append("on <b>val</b>: " + ", ".join(val))
    if same:
        parts.append(f"on <b>{split_word(query_split)}</b>: " + ", ".join(same))
    if not parts:
        return ""
    return (f"<p class='muted'>In-training evaluation of the same checkpoint (step {record['step']}), "
            + "; ".join(parts) + ".</p>")


def _retrieval_source(cfg: dict) -> str:
    """Which images the label-free view retrieval embeds, from the run's config."""
    ev, data = cfg.get("eval", {}), cfg.get("data", {})
    root = ev.get("retrieval_root") or data.get("root") or "?"
    split = ev.get("retrieval_split") or data.get("split") or ""
    where = "the training data (data.root)" if not ev.get("retrieval_root") else "eval.retrieval_root"
    return (f"label-free view pairs of up to {ev.get('retrieval_images', '?')} images of {root}"
            f"{f' (split {split})' if split else ''}, {where}")


def _eval_table(history: list[dict], split_of: Callable[[str, bool], str], majority: dict[str, float] | None) -> str:
    """Every in-training evaluation (rows = steps) with a split row under the header and a majority-class row."""
    keys = registry.headline_keys({k for r in history for k in r})
    keys += sorted({k for r in history for k in r if k.startswith("val_") and not k.endswith(("_low", "_high"))})
    if not keys:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    splits = "".join(f"<td>{html.escape(split_of(k, False))}</td>" for k in keys)
    rows = [f"<tr class='baseline'><td>split</td>{splits}</tr>"]
    for r in history:
        cells = "".join(f"<td>{with_ci(r, k) if k in r else ''}</td>" for k in keys)
        rows.append(f"<tr><td>{r['step']}</td>{cells}</tr>")
    if majority:
        cells = "".join(f"<td>{fmt(majority[k]) if k in majority else ''}</td>" for k in keys)
        rows.append(f"<tr class='baseline'><td>majority class</td>{cells}</tr>")
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


def monitors_html(records: Sequence[dict], history: Sequence[dict], warnings: Sequence[dict]) -> str:
    """The "Health monitors" box: the monitors' warnings, or which monitors watched the run and found nothing.

    Empty when the run folder shows no monitor at work (no warning, none of the watched metrics logged): the
    monitors belong to the DINO family, and a run whose method logs none of their metrics (CLIP) gets no box
    rather than a reassuring "no warning" about checks that never ran.
    """
    logged = {k for r in records for k in r}
    watched = [f"{name} (<code>{key}</code>)" for name, key in MONITORED.items() if key in logged]
    if any("health_feature_std" in r for r in history):
        watched.append("feature collapse on the evaluated features (<code>health_feature_std</code>)")
    if not warnings and not watched:
        return ""
    parts = ["<h2>Health monitors</h2>"]
    if warnings:
        parts.extend(f"<div class='warn'><b>step {w['step']} — {html.escape(str(w.get('monitor')))}"
                     f"{' (fatal)' if w.get('fatal') else ''}</b>: {html.escape(str(w.get('message')))}</div>"
                     for w in warnings)
    else:
        parts.append("<div class='ok'>No monitor raised a warning. Watched: " + ", ".join(watched) + ".</div>")
    return "\n".join(parts)


def warnings_html(warnings: Sequence[tuple[str, str]]) -> str:
    """A warning box per ``(where, message)`` (split warnings, :mod:`medfoundry.eval.split_warnings`), one per
    distinct message; empty without warnings."""
    by_message: dict[str, list[str]] = {}
    for where, message in warnings:
        by_message.setdefault(message, [])
        if where not in by_message[message]:
            by_message[message].append(where)
    if not by_message:
        return ""
    boxes = "".join(f"<div class='warn'><b>warning</b> ({html.escape('; '.join(where))}): {html.escape(message)}"
                    "</div>" for message, where in by_message.items())
    return "<h2>Evaluation warnings</h2>" + boxes


def _in_training_set(cfg: dict) -> Any:
    """The run's ``eval.data`` labelled set (as the in-training evaluation read it), None when there is none or
    it cannot be read any more."""
    ev = cfg.get("eval", {})
    if not ev.get("data"):
        return None
    from medfoundry.eval.labelled_set import load_labelled_set

    try:
        return load_labelled_set(ev["data"], ev.get("label_column", "label"),
                                 ev.get("split_fractions", (0.6, 0.2, 0.2)), ev.get("split_seed", 0))
    except (OSError, ValueError, ImportError):
        return None


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and its plots; returns the HTML path.

    Every table and plot says which split it is on; classification tables carry the majority-class baseline of
    the same split; split problems (a single class, few patients, no val split) are shown as warning boxes.
    """
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
    ev_cfg = cfg.get("eval", {}) if isinstance(cfg.get("eval"), dict) else {}
    num_prototypes = cfg.get("dino", {}).get("head", {}).get("out_dim")
    threshold = ev_cfg.get("entropy_wall", {}).get("threshold_frac")
    marks = [(int(w["step"]), str(w.get("monitor", ""))) for w in warnings]
    eval_keys = {k for r in history_list for k in r}

    # the in-training labelled set: split sizes, majority class and split warnings
    lset = _in_training_set(cfg) if (history_list or ev_cfg.get("every_steps")) else None
    sizes = dict(Counter(str(s) for s in lset.splits)) if lset is not None else {}
    baseline = labelled_set_baseline(lset) if lset is not None else None
    majority = majority_metrics(baseline, eval_keys) if baseline is not None else {}
    split_warnings: list[tuple[str, str]] = []
    if lset is not None:
        needs = val_needs(ev_cfg.get("tasks", ()), ev_cfg.get("best_metric", ""))
        if any(k.startswith("knn_") for k in eval_keys):
            needs.append("the report's val curves (val_knn_*)")
        split_warnings += [("in-training labelled set, eval.data", w.message)
                           for w in labelled_set_warnings(lset, val_needed_by=needs)]
    elif ev_cfg.get("data") and history_list:
        split_warnings.append(("in-training labelled set", f"eval.data '{ev_cfg['data']}' cannot be read any more: "
                               "split sizes, the majority-class baseline and the split checks are left out"))
    for label, compared in (comparison or {}).get("labels", {}).items():
        split_warnings += [(f"comparison, label '{label}'", str(w.get("message")))
                           for w in compared.get("warnings", [])]

    def split_of(key: str, legend: bool = True) -> str:
        split = metric_split(key)
        return _split_cell(split, sizes, legend) if split else ""

    plots: list[tuple[str, Path | None]] = []
    loss_keys = sorted({k for r in records for k in r if k == "loss" or k.endswith("_loss")},
                       key=lambda k: (k != "loss", k))
    plots.append(("Loss terms (training batches)", plot_lines(records, loss_keys, plot_dir / "losses.png")))
    plots.append(("Schedules", plot_lines(records, _SCHEDULE_KEYS, plot_dir / "schedules.png")))
    plots.append(("Teacher entropy and feature std (training batches)",
                  plot_teacher(records, num_prototypes, threshold, plot_dir / "teacher.png", marks)))
    other = [k for k in ("grad_norm", "images_per_s") if any(k in r for r in records)]
    plots.append(("Optimisation", plot_lines(records, other, plot_dir / "optimisation.png")))
    column = ev_cfg.get("label_column", "label")
    references: list[Reference] = []
    points: list[Point] = []
    entry = (comparison or {}).get("labels", {}).get(column)
    if entry is not None and lset is not None and entry.get("summary") != lset.summary():
        entry = None  # compared on another labelled set than the curves': no reference lines from it
    if entry is not None and str(entry.get("query_split", "test")) == "test":  # the curves' kNN queries test
        references.append(Reference("random init", entry.get("random_init", {})))
        points.append(Point(f"final table, step {comparison.get('step')}", int(comparison.get("step") or 0),
                            entry.get("pretrained", {})))
    if majority:
        references.append(Reference("majority class", majority, ":"))
    ks = sorted({int(k.rsplit("_k", 1)[1]) for k in eval_keys if k.startswith("knn_top1_k")})
    knn_panels = [(f"kNN {name}", [f"{p}knn_{m}_k{k}" for p in ("", "val_") for k in ks])
                  for name, m in (("top-1 accuracy", "top1"), ("balanced accuracy", "balanced_acc"), ("AUC", "auc"))]
    linear_panels: list[Panel] = [(f"linear probe {m.replace('_', ' ')} (test, 95% CI)", [f"linear_{m}"])
                                  for m in ("accuracy", "balanced_accuracy", "auc")]
    linear_panels.append(("linear probe val score (selects C)", ["linear_val_score"]))
    health_panels = [(k[7:].replace("_", " "), [k]) for k in sorted(eval_keys) if k.startswith("health_")]
    view_panels = [("view retrieval ratio (x chance)", ["view_retrieval_ratio"]), ("view top-1", ["view_top1"])]
    groups = [("kNN", knn_panels), ("Linear probe", linear_panels), ("Representation health", health_panels),
              ("View retrieval", view_panels)]
    groups += _task_groups(eval_keys, laid_out=("knn", "linear", "health", "retrieval"))
    legend = []
    if references and references[0].label == "random init":
        legend.append("dashed: random initialisation, star: the final table's value (both on test)")
    if majority:
        legend.append("dotted: majority class")
    for group, panels in groups:
        name = group.lower().replace(" ", "_")
        shown = sorted({metric_split(k) for _, keys, *_ in panels for k in keys if k in eval_keys} - {""},
                       key=lambda s: list(SPLIT_WORDS).index(s) if s in SPLIT_WORDS else 99)
        where = "split " + ", ".join(_split_cell(s, sizes) for s in shown) if shown else ""
        if "views" in shown:
            where += f" — {_retrieval_source(cfg)}"
        caption = "; ".join(p for p in (where, *legend) if p)
        plots.append((f"Evaluation over steps: {group}" + (f" ({caption})" if caption else ""),
                      plot_panels(history_list, panels, plot_dir / f"eval_{name}.png", split_of=split_of,
                                  references=references, points=points)))

    clip_history = [report_clip.interval_keys(r) for r in _read_jsonl(run_dir / report_clip.HISTORY)]
    if clip_history:
        clip_keys = {k for r in clip_history for k in r}
        plots.append(("Image-text evaluation over steps (split of each panel in its title)",
                      plot_panels(clip_history, report_clip.clip_panels(clip_keys, cfg), plot_dir / "eval_clip.png")))

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
    body.append(warnings_html(split_warnings))
    if comparison:
        same_set = entry is not None and lset is not None
        body.append("<h2>Pretrained vs random initialisation</h2>" + _comparison_html(
            comparison, cfg, histories={column: history_list} if entry is not None else {},
            fallback_baselines={column: baseline} if same_set and baseline is not None else {}))
    body.append(monitors_html(records, history_list, warnings))
    best_metric = str((best or {}).get("metric", ""))
    best_split = split_word(metric_split(best_metric)) if metric_split(best_metric) else \
        report_clip.clip_split(best_metric, cfg)
    best_file = html.escape(str((best or {}).get("checkpoint") or "best.pt"))  # best.dcp from an FSDP run
    best_line = "" if not best else (
        f"<p>Best checkpoint: <code>{best_file}</code> at step {best.get('step')} with "
        f"{html.escape(best_metric)} = {fmt(best.get('value'))} "
        f"({html.escape(str(best.get('mode')))}{f'; split {html.escape(best_split)}' if best_split else ''}).</p>")
    if clip_history:
        body.append("<h2>Image-text evaluation (zero-shot, retrieval, validation loss)</h2>")
        body.append(("" if history_list else best_line) + report_clip.last_evaluation_html(clip_history, cfg))
    if history_list:
        body.append("<h2>In-training evaluation</h2>" + best_line)
        body.append("<p class='muted'>kNN queries the test split (memory bank: train), <code>val_*</code> the val "
                    "split; the linear probe fits on train, chooses C on val and reports test; the row under the "
                    "header names each column's split.</p>")
        body.append(_eval_table(history_list, split_of, majority))
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
