"""Labelled sets, grouped splits, feature extraction and the on-disk feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfoundry.config import ModelConfig, load_config
from medfoundry.data.readers.slices import FULL_RANGE_UINT16, write_stored
from medfoundry.eval.eval_images import EvalTransform, eval_transform_from_config, read_eval_image, resize_center_crop
from medfoundry.eval.features import FeatureSet, cached_features, compute_feature_set
from medfoundry.eval.labelled_set import LabelledItem, assign_splits, load_labelled_set
from medfoundry.models.registry import create_backbone


def _write_pngs(root: Path, n_per_class: int = 6, size: int = 40) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for label in ("disc", "plain"):
        for i in range(n_per_class):
            img = 0.2 + 0.05 * rng.standard_normal((size, size))
            if label == "disc":
                img += 0.6 * (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2)
            d = root / label / f"series{i % 3}"
            d.mkdir(parents=True, exist_ok=True)
            write_stored(d / f"img{i}.png", (np.clip(img, 0, 1) * 65535).astype(np.uint16), FULL_RANGE_UINT16)


@pytest.fixture()
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(ModelConfig(name="vit_tiny_patch8", img_size=32, in_chans=1)).eval()


def test_evalx_folder_labels_and_grouped_splits(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "set")
    lset = load_labelled_set(tmp_path / "set", split_fractions=(0.5, 0.2, 0.3), seed=1)
    assert lset.classes == ["disc", "plain"] and len(lset) == 12
    assert set(lset.labels.tolist()) == {0, 1}
    # slices of one series (subfolder) never straddle splits
    by_series: dict = {}
    for it in lset.items:
        by_series.setdefault((it.label, it.series), set()).add(it.split)
    assert all(len(s) == 1 for s in by_series.values())
    assert {"train", "test"} <= set(lset.splits.tolist())
    assert "train:" in lset.summary()


def test_evalx_split_folders_and_manifest(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "raw")
    files = sorted((tmp_path / "raw").rglob("*.png"))
    rows = ["path,finding,split,series_id,patient_id"]
    for i, f in enumerate(files):
        rows.append(f"{f.relative_to(tmp_path)},{f.parent.parent.name},{['train', 'validation', 'test'][i % 3]},"
                    f"s{i},p{i}")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    lset = load_labelled_set(manifest, label_column="finding")
    assert [it.split for it in lset.items[:3]] == ["train", "val", "test"]
    assert lset.items[0].patient == "p0" and lset.items[0].series == "s0"
    assert Path(lset.items[0].path).is_absolute()
    with pytest.raises(ValueError, match="label column"):
        load_labelled_set(manifest, label_column="nope")
    split_root = tmp_path / "splitted"
    for split in ("train", "test"):
        for label in ("a", "b"):
            d = split_root / split / label
            d.mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "x.png")
    lset2 = load_labelled_set(split_root)
    assert sorted(set(lset2.splits.tolist())) == ["test", "train"]


def test_evalx_assign_splits_stratified_and_grouped() -> None:
    labels = ["a"] * 30 + ["b"] * 10
    groups = [f"g{i // 2}" for i in range(40)]  # 20 groups of two images
    splits = assign_splits(labels, groups, (0.6, 0.2, 0.2), seed=0)
    for g in set(groups):
        assert len({s for s, gg in zip(splits, groups) if gg == g}) == 1
    for lab in ("a", "b"):
        got = {s for s, ll in zip(splits, labels) if ll == lab}
        assert got == {"train", "val", "test"}
    assert splits == assign_splits(labels, groups, (0.6, 0.2, 0.2), seed=0)


def test_evalx_feature_kinds_and_transform(tmp_path: Path, backbone: torch.nn.Module) -> None:
    _write_pngs(tmp_path / "set", n_per_class=2)
    lset = load_labelled_set(tmp_path / "set")
    t = EvalTransform(32, [0.5], [0.25], channels=1)
    for kind, dim in (("cls", 64), ("mean_patch", 64), ("both", 128)):
        fs = compute_feature_set(backbone, lset, t, feature=kind)
        assert fs.feats.shape == (4, dim) and fs.feats.dtype == np.float32
    # mean of patch tokens equals the backbone's patch output averaged
    x = t.load(lset.items[0])[None]
    with torch.no_grad():
        ref = backbone.forward_features(x).patch.mean(1)[0].numpy()
    fs = compute_feature_set(backbone, lset, t, feature="mean_patch")
    np.testing.assert_allclose(fs.feats[0], ref, atol=1e-5)
    assert resize_center_crop(torch.zeros(1, 30, 60), 16).shape == (1, 16, 16)
    assert read_eval_image(lset.items[0]).shape == (1, 40, 40)


def test_evalx_feature_cache_keyed_by_identity(tmp_path: Path, backbone: torch.nn.Module) -> None:
    _write_pngs(tmp_path / "set", n_per_class=3)
    lset = load_labelled_set(tmp_path / "set")
    cfg = load_config(None, ["model.img_size=32", "crops.global_size=32", "data.channels=1", "crops.mean=[0.5]",
                             "crops.std=[0.25]"])
    t = eval_transform_from_config(cfg)
    cache = tmp_path / "cache"
    fs1, hit1 = cached_features(backbone, "ckpt-a", lset, t, "cls", cache_dir=cache)
    fs2, hit2 = cached_features(backbone, "ckpt-a", lset, t, "cls", cache_dir=cache)
    assert (hit1, hit2) == (False, True)
    np.testing.assert_array_equal(fs1.feats, fs2.feats)
    assert len(list(cache.glob("*.npz"))) == 1
    # another checkpoint identity, feature kind or image size is another entry
    _, hit3 = cached_features(backbone, "ckpt-b", lset, t, "cls", cache_dir=cache)
    _, hit4 = cached_features(backbone, "ckpt-a", lset, t, "both", cache_dir=cache)
    _, hit5 = cached_features(backbone, "ckpt-a", lset, eval_transform_from_config(cfg, 48), "cls", cache_dir=cache)
    assert not (hit3 or hit4 or hit5)
    # a changed image file invalidates the entry
    f = Path(lset.items[0].path)
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(f)
    _, hit6 = cached_features(backbone, "ckpt-a", load_labelled_set(tmp_path / "set"), t, "cls", cache_dir=cache)
    assert not hit6
    # an empty identity never caches
    _, hit7 = cached_features(backbone, "", lset, t, "cls", cache_dir=tmp_path / "nocache")
    assert not hit7 and not (tmp_path / "nocache").exists()


def test_evalx_series_aggregation() -> None:
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]], dtype=np.float32)
    fs = FeatureSet(feats, np.array([0, 1, 1, 1, 0]), np.array(["train", "train", "test", "test", "val"]),
                    ["neg", "pos"], [f"p{i}" for i in range(5)], ["a", "a", "b", "b", ""])
    agg = fs.aggregate_series()
    assert agg.feats.shape == (3, 2)
    np.testing.assert_allclose(agg.feats[0], [2.0, 0.0])
    np.testing.assert_allclose(agg.feats[1], [0.0, 3.0])
    assert agg.labels.tolist() == [1, 1, 0]  # tie in series a -> the higher class (positive)
    assert agg.splits.tolist() == ["train", "test", "val"]
    assert agg.meta["aggregate"] == "series"


def test_evalx_volume_slice_item(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4)  # nibabel (x, y, z)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    img = read_eval_image(LabelledItem(str(tmp_path / "v.nii.gz"), "x", slice_index=1), slices=3)
    assert img.shape[0] == 3 and img.dtype == torch.float32
