"""The multi-label probe against scikit-learn, its choice of C on val only, and its undefined-label cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medfoundry.eval.features import FeatureSet
from medfoundry.eval.linear_probe import linear_metrics
from medfoundry.eval.multilabel_probe import multilabel_metrics, multilabel_probe, targets_of


def _data(n: int = 240, dim: int = 12, labels: int = 4, noise: float = 1.5, seed: int = 0):
    """Features and 0/1 labels that are noisy linear functions of them (label j: feature j + 0.5 feature j+1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    score = x[:, :labels] + 0.5 * x[:, 1 : labels + 1] + noise * rng.standard_normal((n, labels))
    y = (score > 0.8).astype(np.int64)
    tr, va = slice(0, n // 2), slice(n // 2, 3 * n // 4)
    te = slice(3 * n // 4, n)
    return x[tr], y[tr], x[va], y[va], x[te], y[te]


def test_per_label_auc_matches_sklearn_one_vs_rest() -> None:
    x_tr, y_tr, x_va, y_va, x_te, y_te = _data()
    res = multilabel_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, ["a", "b", "c", "d"], n_bootstrap=50)
    scaler = StandardScaler().fit(x_tr)
    expected = []
    for j, name in enumerate("abcd"):
        model = LogisticRegression(C=res["best_C"], max_iter=1000).fit(scaler.transform(x_tr), y_tr[:, j])
        expected.append(roc_auc_score(y_te[:, j], model.predict_proba(scaler.transform(x_te))[:, 1]))
        auc, low, high = res["per_label"][name]
        assert auc == pytest.approx(expected[-1], abs=2e-3)  # warm-started fits reach the same optimum
        assert low <= auc <= high
    assert res["mean_auc"] == pytest.approx(np.mean([res["per_label"][n][0] for n in "abcd"]))
    assert 0.7 < res["mean_auc"] < 1.0 and res["mean_auc_ci_low"] <= res["mean_auc"] <= res["mean_auc_ci_high"]
    assert res["n_scored"] == res["n_labels"] == 4 and not res["unfit"]


def test_c_is_chosen_on_val_only() -> None:
    x_tr, y_tr, x_va, y_va, x_te, y_te = _data(seed=3)
    res = multilabel_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, n_bootstrap=0)
    shuffled = multilabel_probe(x_tr, y_tr, x_va, y_va, x_te, y_te[::-1], n_bootstrap=0)
    assert shuffled["best_C"] == res["best_C"] and shuffled["val_scores"] == res["val_scores"]
    assert res["val_score"] == max(res["val_scores"].values())
    val_changed = multilabel_probe(x_tr, y_tr, x_va, 1 - y_va, x_te, y_te, n_bootstrap=0)  # val now anti-correlated
    assert val_changed["val_scores"] != res["val_scores"]
    assert np.isnan(res["mean_auc_ci_low"])  # no bootstrap asked for


def test_single_valued_labels_give_nan_and_the_mean_of_the_rest() -> None:
    x_tr, y_tr, x_va, y_va, x_te, y_te = _data(labels=4)
    y_tr, y_te = y_tr.copy(), y_te.copy()
    y_tr[:, 0] = 0  # no positive in train: no model
    y_te[:, 2] = 1  # every test image positive: AUC undefined
    res = multilabel_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, n_bootstrap=20)
    assert res["unfit"] == ["0"] and np.isnan(res["per_label"]["0"][0]) and np.isnan(res["per_label"]["2"][0])
    assert res["n_scored"] == 2
    assert res["mean_auc"] == pytest.approx((res["per_label"]["1"][0] + res["per_label"]["3"][0]) / 2)
    assert np.isfinite(res["mean_auc_ci_low"])


def test_without_val_c_is_chosen_on_part_of_train() -> None:
    x_tr, y_tr, _, _, x_te, y_te = _data()
    res = multilabel_probe(x_tr, y_tr, None, None, x_te, y_te, n_bootstrap=0)
    assert res["n_val"] == 24 and res["n_train"] == 96 and np.isfinite(res["mean_auc"])
    with pytest.raises(ValueError, match="0/1"):
        multilabel_probe(x_tr, y_tr * 2, None, None, x_te, y_te)


def _feature_set(x: np.ndarray, labels: np.ndarray, splits: np.ndarray, classes: list[str],
                 targets: np.ndarray | None = None) -> FeatureSet:
    n = len(labels)
    return FeatureSet(x.astype(np.float32), labels, splits, classes, [f"{i}" for i in range(n)], [""] * n,
                      targets=targets, target_names=[f"f{j}" for j in range(targets.shape[1])] if targets is not None
                      else [])


def test_task_on_single_and_multi_label_feature_sets() -> None:
    x_tr, y_tr, x_va, y_va, x_te, y_te = _data()
    x = np.concatenate([x_tr, x_va, x_te])
    y = np.concatenate([y_tr, y_va, y_te])
    splits = np.array(["train"] * len(x_tr) + ["val"] * len(x_va) + ["test"] * len(x_te))
    multi = _feature_set(x, (y.sum(1) > 0).astype(np.int64), splits, ["none", "any"], y)
    out = multilabel_metrics(multi, n_bootstrap=10)
    assert {f"multilabel_auc_f{j}" for j in range(4)} <= set(out) and out["multilabel_labels_scored"] == 4
    assert out["val_multilabel_mean_auc"] <= 1 and out["multilabel_mean_auc_ci_low"] <= out["multilabel_mean_auc"]

    binary = _feature_set(x, y[:, 1], splits, ["neg", "pos"])
    targets, names = targets_of(binary)
    assert names == ["pos"] and targets.shape == (len(x), 1)
    out = multilabel_metrics(binary, n_bootstrap=10)  # one binary model: the linear probe's AUC
    assert out["multilabel_auc_pos"] == pytest.approx(linear_metrics(binary, n_bootstrap=10)["linear_auc"], abs=2e-3)

    three = _feature_set(x, np.argmax(np.c_[y[:, :2], 0.5 * np.ones(len(x))], axis=1), splits, ["p", "q", "r"])
    assert targets_of(three)[1] == ["p", "q", "r"]
    assert {"multilabel_auc_p", "multilabel_auc_q", "multilabel_auc_r"} <= set(multilabel_metrics(three, 0))

    with pytest.raises(ValueError, match="needs a train and a test split"):
        multilabel_metrics(_feature_set(x, y[:, 1], np.array(["train"] * len(x)), ["neg", "pos"]))
