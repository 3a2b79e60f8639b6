"""The quality benchmark end to end on a tiny labelled set: pretrain, then pretrained / random init / raw pixels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medfoundry_cli.bench import quality as q
from medfoundry_cli.bench import quality_data as qd


def _tiny_set(root: Path) -> qd.QualitySet:
    """Brain-style patches of a volume whose two 'lobes' differ in brightness, so raw pixels separate them."""
    rng = np.random.default_rng(0)
    template = (0.2 * rng.random((13, 48, 48))).astype(np.float32)
    atlas = np.zeros(template.shape, dtype=np.int64)
    atlas[:, 4:24, 4:44], atlas[:, 24:44, 4:44] = 1, 8
    template[:, 24:, :] += 0.7
    x_mm = np.arange(13, dtype=float) - 6
    rows = qd.brain_patches_from_volumes(template, atlas, x_mm, root, patch=32, stride=8, slice_step=1,
                                         min_abs_x=1.0, val_band=(-3.0, -3.0), gap_mm=1.0)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    return qd.QualitySet("tiny", root, qd._write_manifest(root, rows, {"counts": counts}), "lobe", counts)


def test_run_quality_compares_pretrained_random_init_raw_pixels_and_majority(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(qd.PREPARERS, "tiny", lambda cache: _tiny_set(tmp_path / "data"))
    monkeypatch.setitem(q.PREPARERS, "tiny", qd.PREPARERS["tiny"])
    spec = q.QualitySpec(dataset="tiny", recipe="quality_brain_cpu", seeds=(0, 1), steps=3,
                         output_dir=str(tmp_path / "runs"), tasks=("knn",), overrides=[
                             "model.img_size=32", "crops.global_size=32", "crops.local_size=16", "crops.n_local=2",
                             "train.batch_size=8", "train.log_every=1", "dino.head.out_dim=64",
                             "eval.img_size=32"])
    result = q.run_quality(spec, log=lambda m: None)
    assert [s["seed"] for s in result["seeds"]] == [0, 1]
    for entry in result["seeds"]:
        assert entry["steps"] == 3
        assert set(entry) >= {"pretrained", "random_init", "head"}
        assert 0.0 <= entry["pretrained"]["knn_top1_k20"] <= 1.0
        assert "val_knn_top1_k20" in entry["random_init"]
        assert entry["head"]["teacher_effective_prototypes_frac_min"] > 0
    assert result["raw_pixels"]["knn_top1_k20"] > 0.9  # brightness alone nearly separates the two classes
    assert result["classes"] == ["frontal", "temporal"]
    assert 0.0 < result["majority"]["knn_top1_k20"] < 1.0
    # the two seeds really are two runs: different initialisations
    assert result["seeds"][0]["random_init"] != result["seeds"][1]["random_init"]
    table = q.format_quality(result)
    assert "| knn_top1_k20 |" in table and "± " in table and "raw pixels" in table
    assert (tmp_path / "runs" / "tiny" / "quality.json").is_file()
    # a second run with other settings trains afresh instead of re-evaluating the finished checkpoints
    again = q.run_quality(dataclasses.replace(spec, seeds=(0,), overrides=[*spec.overrides, "dino.head.out_dim=32"]),
                          log=lambda m: None)
    import torch

    ckpt = sorted((tmp_path / "runs" / "tiny" / "seed0" / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["method"]
    prototypes = [v for k, v in state.items() if k.startswith("teacher.dino_head.") and "last_layer" in k]
    assert prototypes and all(v.shape[0] == 32 for v in prototypes)
    assert again["seeds"][0]["steps"] == 3


def test_raw_pixel_pca_is_fitted_on_the_training_split_only(tmp_path: Path) -> None:
    from medfoundry.config import load_config
    from medfoundry.eval.eval_images import eval_transform_from_config
    from medfoundry.eval.labelled_set import load_labelled_set
    from medfoundry.recipes import resolve_recipe

    qset = _tiny_set(tmp_path)
    lset = load_labelled_set(str(qset.manifest), "lobe")
    cfg = load_config(resolve_recipe("quality_brain_cpu"), ["model.img_size=32", "eval.img_size=32"])
    transform = eval_transform_from_config(cfg, 0)
    full = q.raw_pixel_features(lset, transform)
    reduced = q.raw_pixel_features(lset, transform, pca_dims=5)
    assert full.feats.shape[1] == 32 * 32 and reduced.feats.shape[1] == 5
    train = reduced.feats[reduced.splits == "train"]
    assert np.allclose(train.mean(axis=0), 0.0, atol=1e-4)  # centred on the training split
    assert not np.allclose(reduced.feats[reduced.splits == "test"].mean(axis=0), 0.0, atol=1e-4)
