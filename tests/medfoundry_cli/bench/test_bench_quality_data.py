"""The quality benchmark's real-data builders, on volumes and IDX files written in their real formats."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfoundry_cli.bench import quality_data as qd


def _volumes(n_x: int = 41) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 1 mm template with anatomy-like texture and an atlas: label 1 (frontal) anterior, 8 (temporal) posterior."""
    rng = np.random.default_rng(0)
    template = rng.random((n_x, 40, 40)).astype(np.float32)
    atlas = np.zeros(template.shape, dtype=np.int64)
    atlas[:, 4:20, 4:36] = 1
    atlas[:, 20:36, 4:36] = 8
    x_mm = np.arange(n_x, dtype=float) - n_x // 2  # -20 .. +20 mm
    return template, atlas, x_mm


def test_brain_patches_split_by_hemisphere_with_a_gap_around_the_val_band(tmp_path: Path) -> None:
    template, atlas, x_mm = _volumes()
    rows = qd.brain_patches_from_volumes(template, atlas, x_mm, tmp_path, patch=16, stride=8, slice_step=1,
                                         min_abs_x=2.0, val_band=(-12.0, -10.0), gap_mm=3.0)
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    assert all(by_split.values())
    assert all(r["x_mm"] > 0 and r["hemisphere"] == "right" for r in by_split["test"])
    assert all(r["x_mm"] < 0 for r in by_split["train"] + by_split["val"])
    assert {r["x_mm"] for r in by_split["val"]} == {-12.0, -11.0, -10.0}
    train_x = {r["x_mm"] for r in by_split["train"]}
    assert not train_x & {-14.0, -13.0, -9.0, -8.0}  # the gap: no training slice within 3 mm of the band
    assert -15.0 in train_x and -7.0 in train_x
    assert not {r["x_mm"] for r in rows} & {-1.0, 0.0, 1.0}  # the midline is left out
    assert {r["lobe"] for r in rows} == {"frontal", "temporal"}
    assert {r["region"] for r in rows} == {"Frontal Pole", "Temporal Pole"}
    img = np.asarray(Image.open(tmp_path / rows[0]["path"]))
    assert img.shape == (16, 16) and img.dtype == np.uint16


def test_brain_patch_labels_are_the_atlas_lobe_at_the_jittered_centre(tmp_path: Path) -> None:
    template, atlas, x_mm = _volumes()
    kw = dict(patch=16, stride=8, slice_step=4, min_abs_x=2.0, val_band=(-12.0, -10.0), gap_mm=1.0)
    a = qd.brain_patches_from_volumes(template, atlas, x_mm, tmp_path / "a", jitter=True, seed=3, **kw)
    b = qd.brain_patches_from_volumes(template, atlas, x_mm, tmp_path / "b", jitter=True, seed=3, **kw)
    grid = qd.brain_patches_from_volumes(template, atlas, x_mm, tmp_path / "g", jitter=False, **kw)
    assert [r["path"] for r in a] == [r["path"] for r in b]  # seeded
    assert [r["path"] for r in a] != [r["path"] for r in grid]  # the jitter moves centres off the grid
    for r in a:
        name = Path(r["path"]).stem  # x+NNN_yNNN_zNNN
        y, z = int(name.split("_y")[1][:3]), int(name.split("_z")[1][:3])
        i = int(np.flatnonzero(x_mm == r["x_mm"])[0])
        assert r["lobe"] == ("frontal" if atlas[i, y, z] == 1 else "temporal")


def test_every_harvard_oxford_label_belongs_to_exactly_one_lobe() -> None:
    lut = qd.lobe_lookup()
    assert lut[0] == -1
    assert (lut[1:] >= 0).all() and lut.size == 49
    counted = sorted(label for labels in qd.LOBES.values() for label in labels)
    assert counted == list(range(1, 49))


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_reads_the_mnist_format(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "x.gz", images)
    _write_idx(tmp_path / "y.gz", np.array([9, 0, 4]))
    assert np.array_equal(qd._read_idx(tmp_path / "x.gz"), images)
    assert qd._read_idx(tmp_path / "y.gz").tolist() == [9, 0, 4]
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"\x00" * 12)
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        qd._read_idx(tmp_path / "bad")


def test_fashion_set_is_written_from_the_debian_layout(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "debian" / "dataset-fashion-mnist"
    src = pkg / qd.FASHION_DIR
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(src / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(src / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    (pkg / ".unpacked").write_text("test")  # fetched already: no apt-get call
    qset = qd.prepare_fashion_mnist(tmp_path, n_train=20, n_val=5, n_test=10)
    assert qset.counts == {"train": 20, "val": 5, "test": 10}
    with open(qset.manifest) as fh:
        rows = list(csv.DictReader(fh))
    assert {r["label"] for r in rows} <= set(qd.FASHION_CLASSES)
    assert len({r["path"] for r in rows if r["split"] != "test"}) == 25  # train and val are disjoint
    assert len(list(qset.images("train").glob("*.png"))) == 20
    again = qd.prepare_fashion_mnist(tmp_path, n_train=20, n_val=5, n_test=10)  # cached
    assert again.counts == qset.counts


def test_debian_fetch_names_the_missing_tool(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(qd.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match=r"mricron-data.*apt-get"):
        qd.fetch_debian_package("mricron-data", tmp_path)


def test_written_pngs_record_their_mapping_and_old_caches_are_upgraded_in_place(tmp_path: Path) -> None:
    """A cache written before 16-bit PNGs recorded their mapping is recognised: same pixels, mapping added."""
    from medfoundry.data.image_folder import read_image_file
    from medfoundry.data.readers.slices import FULL_RANGE_UINT16, UnmappedImageError, read_mapping

    qd._write_png(tmp_path / "new.png", np.full((4, 4), 0.5))
    assert read_mapping(tmp_path / "new.png") == FULL_RANGE_UINT16
    root = tmp_path / "brain"
    old = (np.random.default_rng(1).random((8, 8)) * 65535).astype(np.uint16)
    (root / "images" / "train").mkdir(parents=True)
    Image.fromarray(old).save(root / "images" / "train" / "a.png")  # as the old writer did: no mapping
    (root / "manifest.csv").write_text("path,lobe,split\nimages/train/a.png,frontal,train\n")
    info = {"patch": 48, "version": 3}
    (root / "prepared.json").write_text(json.dumps({**info, "counts": {"train": 1}}))
    with pytest.raises(UnmappedImageError):
        read_image_file(root / "images" / "train" / "a.png")
    hit = qd._cached(root, info, "brain", "lobe")
    assert hit is not None and hit.counts == {"train": 1}
    png = root / "images" / "train" / "a.png"
    assert read_mapping(png) == FULL_RANGE_UINT16
    with Image.open(png) as im:
        assert np.array_equal(np.asarray(im), old)  # pixels unchanged
    assert np.array_equal(read_image_file(png), old.astype(np.float32) / 65535.0)
    assert json.loads((root / "prepared.json").read_text())[qd.MAPPED_MARKER] is True
    assert qd.record_full_range_mapping(root / "images") == 0  # nothing left to upgrade
