"""AUC, balanced accuracy and bootstrap CI vs scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medfoundry.eval import accuracy, auc_roc, balanced_accuracy, bootstrap_ci


def test_auc_binary_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=200)
    s = y + rng.normal(size=200)
    s[:20] = np.round(s[:20])  # ties
    assert auc_roc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    two_col = np.stack([-s, s], axis=1)
    assert auc_roc(y, two_col) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc_roc(torch.from_numpy(y), torch.from_numpy(s)) == pytest.approx(roc_auc_score(y, s))


def test_auc_multiclass_ovr_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, size=300)
    logits = rng.normal(size=(300, 5)) + 1.5 * np.eye(5)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert auc_roc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-12)


def test_auc_single_class_is_nan():
    assert np.isnan(auc_roc(np.ones(10, dtype=int), np.linspace(0, 1, 10)))


def test_balanced_accuracy_matches_sklearn():
    rng = np.random.default_rng(2)
    y = rng.choice(3, size=150, p=[0.7, 0.2, 0.1])
    pred = np.where(rng.random(150) < 0.7, y, rng.integers(0, 3, size=150))
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    scores = np.eye(3)[pred]
    assert balanced_accuracy(y, scores) == pytest.approx(balanced_accuracy_score(y, pred))
    assert accuracy(y, scores) == pytest.approx(np.mean(y == pred))


def _width(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    s = y + 1.2 * rng.normal(size=n)
    return bootstrap_ci(y, s, auc_roc, n_bootstrap=300, seed=0)


def test_bootstrap_ci_contains_point_and_narrows():
    point, low, high = _width(100, 0)
    assert low <= point <= high
    assert low < high
    _, low_big, high_big = _width(2000, 0)
    assert (high_big - low_big) < 0.6 * (high - low)


def test_bootstrap_deterministic_and_skips_one_class_resamples():
    y = np.array([0] * 19 + [1])  # many resamples miss the lone positive
    s = np.linspace(0, 1, 20)
    a = bootstrap_ci(y, s, auc_roc, n_bootstrap=200, seed=3)
    b = bootstrap_ci(y, s, auc_roc, n_bootstrap=200, seed=3)
    assert a == b
    assert all(np.isfinite(a))
    point, low, high = bootstrap_ci(y, s, auc_roc, n_bootstrap=0)
    assert point == 1.0 and np.isnan(low) and np.isnan(high)
