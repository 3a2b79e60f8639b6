"""The split rules (eval/split_warnings.py), the metric-to-split map (eval/metric_splits.py) and the
majority-class baseline (eval/majority.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medfoundry.eval.labelled_set import load_labelled_set
from medfoundry.eval.majority import majority_baseline, majority_metrics
from medfoundry.eval.metric_splits import classification_kind, metric_split
from medfoundry.eval.metrics import auc_roc, balanced_accuracy
from medfoundry.eval.split_warnings import MIN_PATIENTS, check_splits, labelled_set_warnings, val_needs


def rules(warnings: list) -> set[tuple[str, str]]:
    return {(w.rule, w.split) for w in warnings}


def test_a_single_class_split_is_flagged_with_what_it_breaks() -> None:
    labels = ["a", "b", "a", "b", "a", "a"]
    splits = ["train", "train", "val", "val", "test", "test"]
    warnings = check_splits(labels, splits)
    assert rules(warnings) == {("single_class", "test")}
    assert "AUC is undefined (reported as nan)" in warnings[0].message and "'a', 2 images" in warnings[0].message
    assert check_splits(["a", "b"] * 3, splits) == []  # every split holds both classes


def test_few_patients_only_when_patient_ids_are_known() -> None:
    n = 40
    labels = ["a", "b"] * (n // 2)
    splits = ["train"] * 20 + ["val"] * 10 + ["test"] * 10
    many = [f"p{i}" for i in range(n)]  # 10 patients in val and in test: not fewer than MIN_PATIENTS
    assert check_splits(labels, splits, many) == []
    few = [f"p{i % 3}" if s == "test" else f"p{i}" for i, s in enumerate(splits)]
    warnings = check_splits(labels, splits, few)
    assert rules(warnings) == {("few_patients", "test")} and "3 patient(s)" in warnings[0].message
    assert check_splits(labels, splits, [""] * n) == []  # ids unknown: nothing to say
    assert check_splits(labels, splits, few, min_patients=2) == []
    assert MIN_PATIENTS == 10


def test_missing_val_only_when_something_needs_it() -> None:
    labels, splits = ["a", "b"] * 4, ["train"] * 4 + ["test"] * 4
    assert check_splits(labels, splits) == []
    needs = val_needs(["knn", "linear"], "val_knn_top1_k20")
    warnings = check_splits(labels, splits, val_needed_by=needs)
    assert rules(warnings) == {("missing_val", "val")}
    assert "eval.best_metric=val_knn_top1_k20" in warnings[0].message and "choice of C" in warnings[0].message
    assert val_needs(["knn"], "") == []
    with pytest.raises(ValueError):
        check_splits(["a"], ["train", "test"])


def test_labelled_set_warnings_read_a_manifest(tmp_path: Path) -> None:
    rows = [("a.png", "neg", "train", "p1"), ("b.png", "pos", "train", "p2"), ("c.png", "neg", "test", "p3"),
            ("d.png", "neg", "test", "p3")]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split,patient\n" + "".join(",".join(r) + "\n" for r in rows))
    lset = load_labelled_set(manifest)
    found = rules(labelled_set_warnings(lset, val_needed_by=val_needs(["linear"])))
    assert found == {("single_class", "test"), ("few_patients", "train"), ("few_patients", "test"),
                     ("missing_val", "val")}


def test_metric_splits_follow_the_evaluators() -> None:
    assert metric_split("knn_top1_k20") == "test" and metric_split("knn_top1_k20", "val") == "val"
    assert metric_split("val_knn_top1_k20") == "val" and metric_split("linear_val_score") == "val"
    assert metric_split("linear_auc", query_split="val") == "test"  # the probe always reports test
    assert metric_split("health_effective_rank") == "all"
    assert metric_split("view_retrieval_ratio") == "views" and metric_split("view_top1") == "views"
    assert metric_split("loss") == ""
    assert classification_kind("knn_top1_k10") == "accuracy"
    assert classification_kind("val_knn_balanced_acc_k20") == "balanced_accuracy"
    assert classification_kind("linear_auc") == "auc" and classification_kind("linear_accuracy") == "accuracy"
    for key in ("view_top1", "health_class_separation", "linear_val_score", "loss", "knn_top1_k20_ci_low"):
        assert classification_kind(key) is None, key


def test_majority_baseline_matches_the_metrics_of_a_constant_answer() -> None:
    classes = ["neg", "pos"]
    labels = np.array([0] * 6 + [1] * 2 + [0, 1, 1] + [0] * 17 + [1] * 3)  # train 6:2, val 1:2, test 17:3
    splits = np.array(["train"] * 8 + ["val"] * 3 + ["test"] * 20)
    base = majority_baseline(labels, splits, classes)
    assert base["class"] == "neg"
    test = base["by_split"]["test"]
    assert test["n"] == 20 and test["accuracy"] == pytest.approx(0.85)  # the all-negative rate
    y_test = labels[splits == "test"]
    assert test["balanced_accuracy"] == pytest.approx(balanced_accuracy(y_test, np.zeros_like(y_test))) == 0.5
    assert test["auc"] == 0.5 == auc_roc(y_test, np.zeros(y_test.size))
    assert base["by_split"]["val"]["accuracy"] == pytest.approx(1 / 3)
    metrics = majority_metrics(base, ["knn_top1_k20", "val_knn_top1_k20", "linear_auc", "health_effective_rank",
                                      "view_top1"])
    assert metrics == {"knn_top1_k20": pytest.approx(0.85), "val_knn_top1_k20": pytest.approx(1 / 3),
                       "linear_auc": 0.5}
    assert majority_metrics(base, ["knn_top1_k20"], query_split="val") == {"knn_top1_k20": pytest.approx(1 / 3)}


def test_majority_baseline_on_a_one_class_split_has_no_auc() -> None:
    base = majority_baseline([0, 1, 0, 0], ["train", "train", "test", "test"], ["a", "b"])
    assert base["by_split"]["test"]["accuracy"] == 1.0 and math.isnan(base["by_split"]["test"]["auc"])
    none = majority_baseline([0, 1], ["test", "test"], ["a", "b"])
    assert none["class"] is None and none["by_split"] == {"test": {"n": 2}}
