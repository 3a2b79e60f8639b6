"""View-retrieval ratio (DINO-X) and recall@k."""

import numpy as np
import pytest
import torch

from medfoundry.eval import retrieval_recall_at_k, view_retrieval_ratio


def test_identical_views_give_maximum_ratio():
    n = 40
    feats = np.random.default_rng(0).normal(size=(n, 32))
    res = view_retrieval_ratio(feats, feats.copy(), chunk_size=9)
    assert res["view_top1"] == 1.0
    assert res["view_retrieval_ratio"] == 2 * n - 1
    assert res["view_chance"] == pytest.approx(1 / (2 * n - 1))


def test_random_views_give_chance_ratio():
    ratios = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        res = view_retrieval_ratio(rng.normal(size=(50, 16)), rng.normal(size=(50, 16)))
        ratios.append(res["view_retrieval_ratio"])
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.5)


def test_noisy_views_between_chance_and_max():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(64, 24))
    a = torch.from_numpy(base + 0.3 * rng.normal(size=base.shape)).float()
    b = torch.from_numpy(base + 0.3 * rng.normal(size=base.shape)).float()
    res = view_retrieval_ratio(a, b)
    assert 10 < res["view_retrieval_ratio"] <= 127


def _reference_recall(q, g, ks, pos_mask):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    order = np.argsort(-(q @ g.T), axis=1)
    return {k: np.mean([pos_mask[i, order[i, :k]].any() for i in range(len(q))]) for k in ks}


def test_recall_at_k_default_and_mask():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(30, 10))
    q = g + 0.8 * rng.normal(size=g.shape)
    res = retrieval_recall_at_k(q, g, ks=(1, 5, 10), chunk_size=4)
    ref = _reference_recall(q, g, (1, 5, 10), np.eye(30, dtype=bool))
    for k in (1, 5, 10):
        assert res[f"recall_at_{k}"] == pytest.approx(ref[k])
    assert res["recall_at_1"] <= res["recall_at_5"] <= res["recall_at_10"]

    # several positives per query: image i has captions 2i and 2i+1
    captions = np.repeat(g, 2, axis=0) + 0.8 * rng.normal(size=(60, 10))
    mask = np.repeat(np.eye(30, dtype=bool), 2, axis=1)
    res = retrieval_recall_at_k(g, captions, ks=(1, 5), positives=mask)
    ref = _reference_recall(g, captions, (1, 5), mask)
    assert res["recall_at_1"] == pytest.approx(ref[1]) and res["recall_at_5"] == pytest.approx(ref[5])

    # index form equals the default
    idx = retrieval_recall_at_k(q, g, positives=np.arange(30))
    assert idx == retrieval_recall_at_k(q, g)
    assert retrieval_recall_at_k(g, g)["recall_at_1"] == 1.0
