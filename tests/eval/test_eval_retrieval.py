"""DINO-X's view-retrieval ratio and recall@k."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medfoundry.eval import dinox_view_retrieval, retrieval_recall_at_k


def _brute_force_dinox(v1: np.ndarray, v2: np.ndarray) -> float:
    """DINO-X's formula written out: top-1 of view 1 -> view 2 among N, times N (one direction)."""
    n = len(v1)
    q = [a / np.linalg.norm(a) for a in v1.astype(np.float64)]
    k = [b / np.linalg.norm(b) for b in v2.astype(np.float64)]
    hits = 0
    for i in range(n):
        sims = [float(np.dot(q[i], k[j])) for j in range(n)]
        hits += int(max(range(n), key=lambda j: (sims[j], -j)) == i)
    return hits / n * n


def test_identical_views_give_n():
    n = 40
    feats = np.random.default_rng(0).normal(size=(n, 32))
    res = dinox_view_retrieval(feats, feats.copy())
    assert res["view_top1"] == 1.0
    assert res["view_retrieval_ratio"] == n  # DINO-X's maximum is N, not 2N - 1
    assert res["view_chance"] == pytest.approx(1 / n)
    assert res["num_images"] == n


def test_random_features_give_about_one():
    ratios = [dinox_view_retrieval(*np.random.default_rng(s).normal(size=(2, 50, 16)))["view_retrieval_ratio"]
              for s in range(40)]
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.4)


def test_matches_brute_force_on_noisy_views():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(64, 24))
    a = base + 0.9 * rng.normal(size=base.shape)
    b = base + 0.9 * rng.normal(size=base.shape)
    res = dinox_view_retrieval(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert 1 < res["view_retrieval_ratio"] < 64  # neither chance nor perfect: the comparison has teeth
    assert res["view_retrieval_ratio"] == pytest.approx(_brute_force_dinox(a, b))


def test_collapsed_views_give_one():
    """Every view 2 identical (collapse): ties go to image 0, one hit of N, ratio 1 = chance."""
    v1 = np.random.default_rng(3).normal(size=(5, 4))
    v2 = np.ones((5, 4))
    res = dinox_view_retrieval(v1, v2)
    assert res["view_retrieval_ratio"] == _brute_force_dinox(v1, v2) == 1.0


REAL_CT = ("693_UNCI.dcm", "eCT_Supplemental.dcm", "CT_small.dcm")  # real CT in pydicom / pydicom-data


def test_view_pairs_on_real_ct_slices_match_brute_force(tmp_path: Path):
    """Views of real CT slices (DICOM, HU, per-view random windows) through the label-free pipeline."""
    from pydicom.data import get_testdata_file

    from medfoundry.config import load_config
    from medfoundry.eval.view_pairs import view_pair_features
    from medfoundry.models.registry import create_backbone
    from medfoundry.recipes import resolve_recipe

    for i, name in enumerate(REAL_CT):
        (tmp_path / "ct" / f"s{i}").mkdir(parents=True)
        shutil.copy(get_testdata_file(name), tmp_path / "ct" / f"s{i}" / name)
    cfg = load_config(resolve_recipe("tiny_dino_cpu"), [
        f"data.root={tmp_path / 'ct'}", "data.kind=dicom", "data.intensity=window", "data.windows=[lung]",
        "data.channels=1", "model.in_chans=1", "data.random_window_prob=1.0", "data.random_window_per_view=true",
        "data.window_center_range=[-400,400]", "data.window_width_range=[800,2000]", "crops.global_size=32",
        "model.img_size=32", "crops.mean=[0.5]", "crops.std=[0.25]", "eval.retrieval_images=4096"])
    torch.manual_seed(0)
    backbone = create_backbone(cfg.model).eval()
    v1, v2, names = view_pair_features(backbone, cfg, batch_size=3)
    assert len(names) == v1.shape[0] == v2.shape[0] == 4  # 1 + 2 frames + 1 real CT slices, N capped at 4
    again = view_pair_features(backbone, cfg, batch_size=2)
    np.testing.assert_array_equal(v1, again[0])  # seeded: the same views for every checkpoint compared
    assert not np.allclose(v1, v2)  # two different augmented views
    res = dinox_view_retrieval(v1, v2)
    assert res["view_retrieval_ratio"] == pytest.approx(_brute_force_dinox(v1, v2))
    assert res["num_images"] == 4


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
