"""kNN evaluator vs a brute-force numpy reimplementation of DINO's weighted kNN."""

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medfoundry.eval import knn_classify, knn_evaluate


def _brute_force(train, train_y, test, k, t, c):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((test.shape[0], c))
    for i, q in enumerate(test):
        sim = train @ q
        nn = np.argsort(-sim)[:k]
        for j in nn:
            scores[i, train_y[j]] += np.exp(sim[j] / t)
    return scores


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16))
    train_y = rng.integers(0, 4, size=300)
    test_y = rng.integers(0, 4, size=80)
    train = centers[train_y] + 1.5 * rng.normal(size=(300, 16))
    test = centers[test_y] + 1.5 * rng.normal(size=(80, 16))
    return train, train_y, test, test_y


@pytest.mark.parametrize("k", [1, 10, 20])
def test_knn_matches_brute_force(data, k):
    train, train_y, test, _ = data
    ref = _brute_force(train, train_y, test, k, 0.07, 4)
    got = knn_classify(train, train_y, test, k=k, temperature=0.07, num_classes=4, chunk_size=7)
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


def test_knn_float32_torch_input_and_chunking(data):
    train, train_y, test, _ = data
    ref = _brute_force(train, train_y, test, 20, 0.07, 4)
    got = knn_classify(
        torch.from_numpy(train).float(), torch.from_numpy(train_y), torch.from_numpy(test).float(), k=20
    )
    assert got.shape == (80, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


def test_knn_k_larger_than_train_is_clipped():
    rng = np.random.default_rng(1)
    train, y, test = rng.normal(size=(5, 8)), np.array([0, 1, 1, 0, 2]), rng.normal(size=(3, 8))
    got = knn_classify(train, y, test, k=50)
    np.testing.assert_allclose(got, _brute_force(train, y, test, 5, 0.07, 3), rtol=1e-10)


def test_knn_evaluate_keys_and_values(data):
    train, train_y, test, test_y = data
    res = knn_evaluate(train, train_y, test, test_y, ks=(10, 20))
    for k in (10, 20):
        ref = _brute_force(train, train_y, test, k, 0.07, 4)
        probs = ref / ref.sum(1, keepdims=True)
        assert res[f"knn_top1_k{k}"] == pytest.approx(np.mean(ref.argmax(1) == test_y))
        assert res[f"knn_balanced_acc_k{k}"] == pytest.approx(balanced_accuracy_score(test_y, ref.argmax(1)))
        assert res[f"knn_auc_k{k}"] == pytest.approx(roc_auc_score(test_y, probs, multi_class="ovr"))
    assert res["knn_top1_k20"] > 0.5  # well-separated clusters


def test_knn_evaluate_binary_auc(data):
    train, train_y, test, test_y = data
    train_y, test_y = (train_y >= 2).astype(int), (test_y >= 2).astype(int)
    res = knn_evaluate(train, train_y, test, test_y, ks=(10,))
    ref = _brute_force(train, train_y, test, 10, 0.07, 2)
    assert res["knn_auc_k10"] == pytest.approx(roc_auc_score(test_y, ref[:, 1] / ref.sum(1)))


def test_knn_bootstrap_bounds_bracket_the_accuracies_and_narrow_with_more_queries() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        return centres[y] + 1.5 * rng.normal(size=(n, 8)), y

    x_tr, y_tr = sample(300)
    widths = []
    for n_test in (60, 1200):
        x_te, y_te = sample(n_test)
        res = knn_evaluate(x_tr, y_tr, x_te, y_te, ks=(20,), n_bootstrap=300, seed=1)
        for name in ("top1", "balanced_acc"):
            point = res[f"knn_{name}_k20"]
            assert res[f"knn_{name}_k20_ci_low"] <= point <= res[f"knn_{name}_k20_ci_high"]
        widths.append(res["knn_top1_k20_ci_high"] - res["knn_top1_k20_ci_low"])
        assert 0.2 < res["knn_top1_k20"] < 1.0
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(n): 20x the queries, ~4.5x narrower
    assert "knn_top1_k20_ci_low" not in knn_evaluate(x_tr, y_tr, x_te, y_te, ks=(20,))
