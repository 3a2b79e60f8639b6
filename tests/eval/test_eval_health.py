"""Representation health: RankMe, active dims, collapse indicators, class separation."""

import numpy as np
import pytest

from medfoundry.eval import effective_rank, representation_health


def test_effective_rank_identity_and_rank_one():
    assert effective_rank(np.eye(32)) == pytest.approx(32, rel=1e-4)
    assert effective_rank(np.tile(np.eye(16), (4, 1))) == pytest.approx(16, rel=1e-4)
    rng = np.random.default_rng(0)
    rank1 = np.outer(rng.normal(size=100), rng.normal(size=32))
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-3)


def test_active_dims_and_collapse_indicators():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 20))
    x[:, 15:] = 3.0 + 1e-4 * rng.normal(size=(500, 5))  # 5 dead (near-constant) dims
    h = representation_health(x)
    assert h["active_dims"] == 15 and h["active_dims_frac"] == pytest.approx(0.75)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = z @ z.T
    assert h["mean_pairwise_cosine"] == pytest.approx(cos[~np.eye(500, dtype=bool)].mean())
    assert h["feature_std"] == pytest.approx(z.std(0).mean())

    collapsed = np.ones((100, 20)) + 1e-6 * rng.normal(size=(100, 20))
    hc = representation_health(collapsed)
    assert hc["active_dims"] == 0
    assert hc["mean_pairwise_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert hc["feature_std"] < 1e-5
    assert hc["effective_rank"] < 1.1


def test_class_separation():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 16))
    y = np.repeat(np.arange(3), 50)
    tight = representation_health(centers[y] + 0.1 * rng.normal(size=(150, 16)), labels=y)
    loose = representation_health(centers[y] + 2.0 * rng.normal(size=(150, 16)), labels=y)
    assert tight["class_separation"] > loose["class_separation"] > 0
    assert tight["class_separation"] > 10
    assert np.isnan(representation_health(rng.normal(size=(10, 4)), labels=np.zeros(10))["class_separation"])
