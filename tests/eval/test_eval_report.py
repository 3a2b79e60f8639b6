"""The run report (eval/report.py) on small run folders written by hand: splits named on every table and plot,
the majority-class baseline, highlighting only for separated intervals, labelled axes, the health box only where
monitors ran, and the split warnings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from medfoundry.eval import report, report_plots
from medfoundry.eval.labelled_set import load_labelled_set
from medfoundry.eval.report_context import comparison_context


def write_manifest(path: Path, test_classes: tuple[str, ...] = ("neg", "pos")) -> Path:
    """train 6 neg : 2 pos, val 2 : 2, test 17 : 3 (or 20 of the one class given)."""
    rows = [("neg", "train")] * 6 + [("pos", "train")] * 2 + [("neg", "val"), ("pos", "val")] * 2
    if len(test_classes) == 2:
        rows += [("neg", "test")] * 17 + [("pos", "test")] * 3
    else:
        rows += [(test_classes[0], "test")] * 20
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("path,finding,split\n" + "".join(f"img{i}.png,{lab},{s}\n" for i, (lab, s) in enumerate(rows)))
    return path


def ci(value: float, low: float, high: float, key: str) -> dict[str, float]:
    return {key: value, f"{key}_ci_low": low, f"{key}_ci_high": high}


def make_run(root: Path, manifest: Path, *, dino: bool = True, comparison: bool = True,
             context: bool = True) -> Path:
    """A run folder as training and ``medfoundry eval --compare-random`` leave it (values made up)."""
    run = root / "run"
    (run / "eval").mkdir(parents=True)
    cfg = {"method": "dino" if dino else "clip", "model": {"name": "vit_tiny"}, "train": {"steps": 4},
           "eval": {"data": str(manifest), "label_column": "finding", "every_steps": 2, "tasks": ["knn", "linear"],
                    "best_metric": "val_knn_top1_k20", "split_fractions": [0.6, 0.2, 0.2], "split_seed": 0}}
    if dino:
        cfg["dino"] = {"head": {"out_dim": 64}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for step in range(1, 5):
        rec = {"step": step, "loss": 4.0 - step * 0.5, "lr": 1e-3 * step, "grad_norm": 1.0 / step}
        if dino:
            rec.update(dino_loss=3.0, dino_loss_frac=0.7, teacher_entropy=3.5, teacher_feature_std=0.05,
                       teacher_effective_prototypes_frac=0.4)
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    history = [{"step": s, "knn_top1_k20": 0.7 + s / 100, "val_knn_top1_k20": 0.6 + s / 100,
                **ci(0.75, 0.7, 0.8, "linear_accuracy"), "linear_auc": 0.8, "health_effective_rank": 5.0}
               for s in (2, 4)]
    (run / "eval" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if comparison:
        pre = {**ci(0.74, 0.70, 0.78, "knn_top1_k20"), **ci(0.75, 0.70, 0.80, "linear_accuracy"),
               **ci(0.80, 0.75, 0.85, "linear_auc"), "health_effective_rank": 5.0}
        rnd = {**ci(0.55, 0.50, 0.60, "knn_top1_k20"), **ci(0.73, 0.68, 0.78, "linear_accuracy"),
               **ci(0.78, 0.72, 0.84, "linear_auc"), "health_effective_rank": 2.0}
        lset = load_labelled_set(manifest, "finding")
        entry = {"pretrained": pre, "random_init": rnd, "summary": lset.summary(), "classes": lset.classes}
        if context:
            entry.update(comparison_context(lset, pre, "test", ["the linear probe's choice of C"]))
        (run / "eval" / "comparison.json").write_text(json.dumps({"checkpoint": "ckpt.pt", "step": 4,
                                                                  "labels": {"finding": entry}}))
    return run


def rows(page: str) -> dict[str, str]:
    """Table rows by their first cell (the comparison table's metric rows, the eval table's step rows)."""
    out = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", page, flags=re.S):
        cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, flags=re.S)
        if cells:
            out.setdefault(cells[0], row)
    return out


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every matplotlib figure the report saves."""
    saved: list = []
    real = report_plots._save

    def keep(fig, path):
        saved.append(fig)
        return real(fig, path)

    monkeypatch.setattr(report_plots, "_save", keep)
    return saved


def test_comparison_table_has_splits_baseline_and_highlights_only_separated_intervals(tmp_path: Path) -> None:
    run = make_run(tmp_path, write_manifest(tmp_path / "data" / "m.csv"))
    page = report.write_report(run).read_text()
    table = rows(page)
    knn = table["knn_top1_k20"]
    assert "test (n=20)" in knn  # the split column names the split and its size
    assert re.search(r"<td class='better'>0\.74", knn)  # [0.70, 0.78] vs [0.50, 0.60]: separated
    for key in ("linear_accuracy", "linear_auc"):  # overlapping intervals: no highlight anywhere in the row
        assert "better" not in table[key], key
    assert "better" not in table["health_effective_rank"]  # no interval, no claim
    assert report.HIGHLIGHT_LEGEND in page
    # majority class: 'neg' (6 of 8 training images) is 17 of 20 test images; AUC 0.5
    assert "majority class</th>" in page and "always 'neg'" in page
    assert "<td>0.85</td>" in knn and "<td>0.5</td>" in table["linear_auc"]
    assert "<td>all splits (n=32)</td>" in table["health_effective_rank"]
    # the in-training evaluation of the same step: its val number and the same-split value beside the table's
    assert "on <b>val</b>: val_knn_top1_k20 = 0.64" in page
    assert "knn_top1_k20 = 0.74 (table: 0.74)" in page


def test_in_training_table_names_splits_and_has_a_majority_row(tmp_path: Path) -> None:
    run = make_run(tmp_path, write_manifest(tmp_path / "data" / "m.csv"), comparison=False)
    (run / "best.json").write_text(json.dumps({"step": 4, "metric": "val_knn_top1_k20", "value": 0.64,
                                               "mode": "max"}))
    page = report.write_report(run).read_text()
    assert "val_knn_top1_k20 = 0.64 (max; split val)" in page
    table = rows(page)
    split_row = re.findall(r"<td>(.*?)</td>", table["split"])
    header = re.findall(r"<th>(.*?)</th>", table["step"])[1:]
    by_key = dict(zip(header, split_row[1:]))
    assert by_key["knn_top1_k20"] == "test (n=20)" and by_key["val_knn_top1_k20"] == "val (n=4)"
    assert by_key["linear_accuracy"] == "test (n=20)" and by_key["health_effective_rank"] == "all splits (n=32)"
    majority = dict(zip(header, re.findall(r"<td>(.*?)</td>", table["majority class"])[1:]))
    assert majority["knn_top1_k20"] == "0.85" and majority["val_knn_top1_k20"] == "0.5"
    assert majority["health_effective_rank"] == ""
    assert "Evaluation warnings" not in page  # nothing wrong with these splits


def test_every_plot_has_labelled_axes_and_split_labelled_lines(tmp_path: Path, figures: list) -> None:
    run = make_run(tmp_path, write_manifest(tmp_path / "data" / "m.csv"))
    report.write_report(run)
    axes = [ax for fig in figures for ax in fig.axes]
    assert len(figures) >= 5 and axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
    knn = next(ax for ax in axes if ax.get_title() == "kNN top-1 accuracy")
    labels = knn.get_legend_handles_labels()[1]
    assert "knn_top1_k20 (test, n=20)" in labels and "val_knn_top1_k20 (val, n=4)" in labels
    assert "knn_top1_k20: random init (test, n=20)" in labels  # the reference is on the same split as its curve
    assert "knn_top1_k20: majority class (test, n=20)" in labels
    assert any(label.startswith("knn_top1_k20: final table, step 4") for label in labels)
    val_refs = [label for label in labels if label.startswith("val_knn_top1_k20:")]
    assert val_refs == ["val_knn_top1_k20: majority class (val, n=4)"]  # no test-split reference on a val curve
    assert knn.get_ylabel() == "accuracy (fraction correct)"


def test_health_box_only_when_the_run_folder_shows_monitors(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "data" / "m.csv")
    dino = report.write_report(make_run(tmp_path / "dino", manifest)).read_text()
    assert "Health monitors" in dino and "dino_loss_frac" in dino
    clip = report.write_report(make_run(tmp_path / "clip", manifest, dino=False)).read_text()
    assert "Health monitors" not in clip and "No monitor raised" not in clip
    run = make_run(tmp_path / "warned", manifest, dino=False)  # a warning on record is always shown
    (run / "monitors.jsonl").write_text(json.dumps({"step": 3, "monitor": "collapse", "message": "std 0.001"}) + "\n")
    assert "std 0.001" in report.write_report(run).read_text()


def test_single_class_test_split_warns_and_shows_nan(tmp_path: Path) -> None:
    run = make_run(tmp_path, write_manifest(tmp_path / "data" / "m.csv", test_classes=("neg",)))
    comparison = json.loads((run / "eval" / "comparison.json").read_text())
    entry = comparison["labels"]["finding"]
    assert [w["rule"] for w in entry["warnings"]] == ["single_class"]
    entry["pretrained"]["linear_auc"] = float("nan")  # what the probe returns on a one-class test split
    (run / "eval" / "comparison.json").write_text(json.dumps(comparison))
    page = report.write_report(run).read_text()
    assert "Evaluation warnings" in page and "class='warn'" in page
    assert "the test split holds a single class" in page and "reported as nan" in page
    assert page.count("the test split holds a single class") == 1  # in-training set and comparison: one box
    assert re.search(r"<td>nan", rows(page)["linear_auc"])
    assert "<td>1</td>" in rows(page)["knn_top1_k20"]  # the baseline scores 1: accuracy means nothing here


def test_old_comparison_gets_the_baseline_from_eval_data(tmp_path: Path) -> None:
    run = make_run(tmp_path, write_manifest(tmp_path / "data" / "m.csv"), context=False)
    page = report.write_report(run).read_text()
    assert "predates the baseline" in page and "<td>0.85</td>" in rows(page)["knn_top1_k20"]


def test_missing_val_split_warns_when_best_selection_needs_it(tmp_path: Path) -> None:
    manifest = tmp_path / "data" / "m.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("path,finding,split\n" + "".join(f"i{i}.png,{'ab'[i % 2]},{'train' if i < 8 else 'test'}\n"
                                                          for i in range(12)))
    run = make_run(tmp_path, manifest, comparison=False)
    page = report.write_report(run).read_text()
    assert "there is no val split" in page and "eval.best_metric=val_knn_top1_k20" in page
