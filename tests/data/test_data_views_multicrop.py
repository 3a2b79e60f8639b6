"""Image folder reading, multi-crop views, iBOT masks and the seeded, resumable sample order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfoundry.config import CropsConfig
from medfoundry.data.image_folder import ImageFolderSource, read_image_file
from medfoundry.data.masking import MaskSampler, block_mask
from medfoundry.data.multicrop import MultiCropTransform, random_resized_crop_box
from medfoundry.data.readers.slices import FULL_RANGE_UINT16, write_stored
from medfoundry.data.sources import Sample
from medfoundry.data.views import SeededViews, StepBatchSampler, collate_views


def test_reads_8_and_16_bit_grey_and_rgb(tmp_path: Path) -> None:
    grey16 = (np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) * 20).astype(np.uint16)
    write_stored(tmp_path / "a.png", grey16, FULL_RANGE_UINT16)  # 16-bit pictures record what they store
    rgb8 = np.zeros((20, 30, 3), np.uint8)
    rgb8[..., 1] = 255
    Image.fromarray(rgb8).save(tmp_path / "b.jpg", quality=100)
    write_stored(tmp_path / "c.tif", grey16, FULL_RANGE_UINT16)
    a = read_image_file(tmp_path / "a.png")
    assert a.dtype == np.float32 and a.max() == pytest.approx(grey16.max() / 65535)
    b = read_image_file(tmp_path / "b.jpg")
    assert b.shape == (20, 30, 3) and b[..., 1].mean() > 0.95
    np.testing.assert_allclose(read_image_file(tmp_path / "c.tif"), grey16 / 65535, atol=1e-6)
    src = ImageFolderSource(tmp_path, [".png", ".jpg", ".tif"], channels=1)
    assert len(src) == 3 and all(src[i].image.shape[0] == 1 for i in range(3))
    assert ImageFolderSource(tmp_path, [".jpg"], channels=3)[0].image.shape == (3, 20, 30)


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no files"):
        ImageFolderSource(tmp_path, [".png"], channels=1)


def test_crop_boxes_follow_the_scale_range() -> None:
    torch.manual_seed(0)
    fracs = []
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(200, 300, (0.3, 0.6))
        assert top >= 0 and top + h <= 200 and left >= 0 and left + w <= 300
        fracs.append(h * w / (200 * 300))
    assert min(fracs) >= 0.28 and max(fracs) <= 0.62


def test_multicrop_sizes_and_normalisation() -> None:
    cfg = CropsConfig(global_size=32, local_size=16, n_local=3, mean=[0.5], std=[0.25])
    views = MultiCropTransform(cfg, channels=1)(torch.full((1, 50, 60), 0.5))
    assert [v.shape for v in views["global"]] == [(1, 32, 32)] * 2
    assert [v.shape for v in views["local"]] == [(1, 16, 16)] * 3
    assert torch.allclose(views["global"][0], torch.zeros(1, 32, 32), atol=1e-5)


def test_block_mask_has_the_requested_count() -> None:
    torch.manual_seed(0)
    for ratio in (0.1, 0.3, 0.5):
        m = block_mask((14, 14), ratio)
        assert int(m.sum()) == round(ratio * 196)
    sampler = MaskSampler(0.0, 0.1, 0.5)
    assert not sampler((4, 4)).any()


class _ListSource:
    def __init__(self, n: int, bad: set[int] = frozenset()) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def describe(self, i: int) -> str:
        return f"item{i}"

    def __getitem__(self, i: int) -> Sample:
        if i in self.bad:
            raise OSError("truncated file")
        return Sample(image=torch.full((1, 40, 40), i / self.n), path=f"item{i}")


def test_sample_k_is_a_pure_function_of_seed_and_k() -> None:
    cfg = CropsConfig(global_size=16, local_size=8, n_local=1, mean=[0.5], std=[0.25])
    ds = SeededViews(_ListSource(7), MultiCropTransform(cfg, 1), seed=3)
    first = [ds[k]["global"][0] for k in range(20)]
    again = SeededViews(_ListSource(7), MultiCropTransform(cfg, 1), seed=3)
    for k in (19, 5, 12):  # any order, fresh object
        torch.testing.assert_close(again[k]["global"][0], first[k])
    # each epoch visits every item exactly once
    assert sorted(ds.index_of(k) for k in range(7)) == list(range(7))
    assert sorted(ds.index_of(k) for k in range(7, 14)) == list(range(7))
    other_seed = SeededViews(_ListSource(7), MultiCropTransform(cfg, 1), seed=4)
    assert [other_seed.index_of(k) for k in range(7)] != [ds.index_of(k) for k in range(7)]


def test_unreadable_samples_are_substituted_and_reported() -> None:
    cfg = CropsConfig(global_size=16, n_local=0, mean=[0.5], std=[0.25])
    ds = SeededViews(_ListSource(5, bad={2}), MultiCropTransform(cfg, 1), seed=0)
    batch = collate_views([ds[k] for k in range(5)])
    assert batch["global_crops"].shape == (2, 5, 1, 16, 16)
    assert batch["bad"] == [("item2", "OSError: truncated file")]


def test_step_batches_split_the_global_batch_over_ranks() -> None:
    r0 = iter(StepBatchSampler(start_step=3, global_batch=8, rank=0, world_size=2))
    r1 = iter(StepBatchSampler(start_step=3, global_batch=8, rank=1, world_size=2))
    assert next(r0) == [24, 25, 26, 27] and next(r1) == [28, 29, 30, 31]
    assert next(r0) == [32, 33, 34, 35]
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(0, 7, 0, 2)
