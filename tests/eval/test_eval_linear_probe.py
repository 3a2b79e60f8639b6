"""Linear probe vs scikit-learn computed directly."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from medfoundry.eval.linear_probe import linear_probe


def _blobs(n, n_classes, dim, seed, offset=5.0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(n_classes, dim))
    y = rng.integers(0, n_classes, size=n)
    return centers[y] + 1.2 * rng.normal(size=(n, dim)) + offset, y


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_probe_matches_sklearn(n_classes):
    xtr, ytr = _blobs(200, n_classes, 12, 0)
    xva, yva = _blobs(80, n_classes, 12, 1)
    xte, yte = _blobs(120, n_classes, 12, 2)
    cs = np.logspace(-3, 1, 3)
    res = linear_probe(xtr, ytr, xva, yva, xte, yte, Cs=cs, n_bootstrap=100)
    assert res["best_C"] in cs
    assert res["selection_metric"] == ("auc" if n_classes == 2 else "balanced_accuracy")

    scaler = StandardScaler().fit(xtr)
    val = {}
    for c in cs:
        m = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(xtr), ytr)
        p = m.predict_proba(scaler.transform(xva))
        val[c] = roc_auc_score(yva, p[:, 1]) if n_classes == 2 else balanced_accuracy_score(yva, p.argmax(1))
    best_c = cs[int(np.argmax([val[c] for c in cs]))]
    assert res["best_C"] == pytest.approx(best_c)
    model = LogisticRegression(C=best_c, max_iter=1000).fit(scaler.transform(xtr), ytr)
    probs = model.predict_proba(scaler.transform(xte))
    pred = probs.argmax(1)
    auc = roc_auc_score(yte, probs[:, 1]) if n_classes == 2 else roc_auc_score(yte, probs, multi_class="ovr")
    assert res["accuracy"] == pytest.approx(np.mean(pred == yte), abs=1e-9)
    assert res["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yte, pred), abs=1e-9)
    assert res["auc"] == pytest.approx(auc, abs=1e-6)
    for key in ("accuracy", "balanced_accuracy", "auc"):
        assert res[f"{key}_ci_low"] <= res[key] <= res[f"{key}_ci_high"]
    assert res["auc"] > 0.8


def test_linear_probe_internal_validation_split_and_label_encoding():
    xtr, ytr = _blobs(250, 3, 8, 3)
    xte, yte = _blobs(60, 3, 8, 4)
    labels = np.array([3, 7, 11])
    kw = dict(Cs=[0.01, 1.0], n_bootstrap=0, seed=1)
    res = linear_probe(xtr, labels[ytr], None, None, xte, labels[yte], **kw)
    assert res["n_val"] == 50 and res["n_train"] == 200
    assert res["num_classes"] == 3
    assert res["accuracy"] > 0.7
    assert np.isnan(res["auc_ci_low"])
    again = linear_probe(xtr, labels[ytr], None, None, xte, labels[yte], **kw)
    assert again["accuracy"] == res["accuracy"] and again["best_C"] == res["best_C"]


def test_linear_probe_rejects_unseen_test_class():
    xtr, ytr = _blobs(60, 2, 4, 5)
    with pytest.raises(ValueError, match="absent"):
        linear_probe(xtr, ytr, None, None, xtr[:5], np.full(5, 9), Cs=[1.0], n_bootstrap=0)
