"""The results table of a sweep: :func:`collect` reads every arm's ``metrics.jsonl`` and ``sweep_arm.json``
(status, wall time, devices) and :func:`write_table` writes ``results.csv`` and ``results.md`` with the overrides,
final and best loss and evaluation metrics, GPU-hours and cost (the arms themselves: :mod:`medfoundry_cli.sweep`)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from medfoundry_cli.sweep import SweepPlan, read_arm_record

#: Substrings of metric keys reported as evaluation columns besides the registered tasks' ``key_parts``: any AUC.
EXTRA_EVAL_KEY_PARTS = ("auc",)
_SKIP_SUFFIXES = ("_ci_low", "_ci_high", "n_pos", "seconds")


def _numbers(records: list[dict], key: str) -> list[float]:
    out = []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def eval_key_parts() -> tuple[str, ...]:
    """Substrings marking evaluation metric keys: the registered tasks' ``key_parts``
    (:func:`medfoundry.eval.registry.key_parts`: knn, linear, zeroshot, recall) and :data:`EXTRA_EVAL_KEY_PARTS`."""
    from medfoundry.eval.registry import key_parts  # the eval package imports torch: only when results are read

    return tuple(dict.fromkeys(key_parts() + EXTRA_EVAL_KEY_PARTS))


def eval_keys(records: list[dict]) -> list[str]:
    """Logged evaluation metric keys (containing one of :func:`eval_key_parts`), without CI bounds."""
    parts = eval_key_parts()
    keys: set[str] = set()
    for r in records:
        for k in r:
            low = k.lower()
            if any(p in low for p in parts) and not low.endswith(_SKIP_SUFFIXES):
                keys.add(k)
    return sorted(keys)


def _best(values: list[float], key: str) -> float | None:
    if not values:
        return None
    lower_is_better = "loss" in key.lower() or "err" in key.lower()
    return min(values) if lower_is_better else max(values)


def collect(plan: SweepPlan, price_per_gpu_hour: float = 2.0) -> tuple[list[dict], list[str]]:
    """One row per arm (in grid order) and the column names; missing values are ``None``."""
    from medfoundry.train.run_logger import read_metrics

    per_arm = []
    all_eval: set[str] = set()
    for arm in plan.arms:
        out = Path(arm.output_dir)
        try:
            metrics = read_metrics(out)
        except (OSError, json.JSONDecodeError):
            metrics = []
        per_arm.append((arm, read_arm_record(out), metrics))
        all_eval.update(eval_keys(metrics))
    ekeys = sorted(all_eval)
    columns = ["arm", "status", "overrides", "steps", "final_loss", "best_loss"]
    for k in ekeys:
        columns += [f"final {k}", f"best {k}"]
    columns += ["device", "processes", "gpus", "wall_hours", "gpu_hours", "cost", "error"]
    rows = []
    for arm, rec, metrics in per_arm:
        losses = _numbers(metrics, "loss")
        steps = [r["step"] for r in metrics if isinstance(r.get("step"), int)]
        status = rec.get("status") or ("incomplete" if metrics else "not run")
        error = rec.get("error", "")
        if status == "failed" and not error and (out_err := Path(arm.output_dir) / "error.log").is_file():
            error = out_err.read_text().strip().splitlines()[-1]
        wall_h = float(rec.get("wall_s", 0.0)) / 3600.0
        gpus = int(rec.get("gpus", 0) or 0)
        gpu_h = wall_h * gpus
        row: dict[str, Any] = {
            "arm": arm.name,
            "status": status,
            "overrides": arm.label,
            "steps": max(steps) if steps else None,
            "final_loss": losses[-1] if losses else None,
            "best_loss": min(losses) if losses else None,
        }
        for k in ekeys:
            vals = _numbers(metrics, k)
            row[f"final {k}"] = vals[-1] if vals else None
            row[f"best {k}"] = _best(vals, k)
        row.update({
            "device": rec.get("device", ""),
            "processes": rec.get("processes"),
            "gpus": gpus,
            "wall_hours": wall_h,
            "gpu_hours": gpu_h,
            "cost": gpu_h * price_per_gpu_hour,
            "error": error,
        })
        rows.append(row)
    return rows, columns


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.2e}"
    return str(v)


def write_table(plan: SweepPlan, rows: list[dict], columns: list[str], price_per_gpu_hour: float = 2.0,
                currency: str = "USD") -> tuple[Path, Path]:
    """Write ``SWEEP_DIR/results.csv`` (full precision) and ``SWEEP_DIR/results.md``; returns both paths."""
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    cost_col = f"cost_{currency.lower()}"
    header = [cost_col if c == "cost" else c for c in columns]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    csv_path = plan.sweep_dir / "results.csv"
    csv_path.write_text(buf.getvalue())

    n_stopped = sum(r["status"] == "interrupted" for r in rows)
    interrupted = f", {n_stopped} interrupted (run the sweep again to resume)" if n_stopped else ""
    lines = [
        f"# Sweep results: {Path(plan.recipe).name}",
        "",
        f"- recipe: `{plan.recipe}`",
        f"- sweep folder: `{plan.sweep_dir}`",
        f"- fixed overrides: {' '.join(f'`{f}`' for f in plan.fixed) or '(none)'}",
        "- grid: " + ("; ".join(f"`{k}` in {', '.join(f'`{v}`' for v in vals)}" for k, vals in plan.axes)
                      or "(single arm)"),
        f"- cost: GPU-hours x {price_per_gpu_hour:g} {currency} per GPU-hour (CPU arms: 0 GPU-hours)",
        f"- loss: final and best (minimum) of the logged training loss; {len(rows)} arm(s), "
        f"{sum(r['status'] == 'ok' for r in rows)} ok{interrupted}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        cells = [_fmt(row.get(c)).replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    md_path = plan.sweep_dir / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
