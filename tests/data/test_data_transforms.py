"""HU windows, random windows, 2.5D stacks, label-guided crops, statistics, the intensity transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from medical_testdata import write_ct_series

from medfoundry.config.data import DataConfig
from medfoundry.data.intensity import build_intensity_transform
from medfoundry.data.sources import Sample, build_source
from medfoundry.data.transforms import (
    WINDOW_PRESETS,
    HUWindows,
    apply_window,
    channel_stats,
    label_guided_crop_box,
    neighbour_indices,
    parse_window,
    region_from_mask,
    stack_slices,
    valid_centres,
)


@pytest.mark.parametrize("name", ["lung", "mediastinum", "soft_tissue", "bone", "brain"])
def test_window_bounds_map_to_output_ends(name: str) -> None:
    c, w = WINDOW_PRESETS[name]
    hu = torch.tensor([c - w / 2 - 500, c - w / 2, c, c + w / 2, c + w / 2 + 500])
    out = apply_window(hu, c, w)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    assert apply_window(hu, c, w, (-1.0, 1.0)).tolist() == pytest.approx([-1, -1, 0, 1, 1])


def test_parse_window() -> None:
    assert parse_window("lung") == (-600.0, 1500.0)
    assert parse_window("Soft-Tissue") == WINDOW_PRESETS["soft_tissue"]
    assert parse_window("-600:1500") == (-600.0, 1500.0)
    with pytest.raises(ValueError, match="neither a preset"):
        parse_window("lungs")


def test_random_window_within_ranges_and_reproducible() -> None:
    t = HUWindows(["lung"], random_prob=1.0, center_range=(-500, 100), width_range=(300, 1800))
    draws = []
    for seed in range(50):
        torch.manual_seed(seed)
        (c, w), = t.sample_windows()
        assert -500 <= c <= 100 and 300 <= w <= 1800
        draws.append((c, w))
    assert len(set(draws)) == 50
    hu = torch.linspace(-1200, 1200, 64).reshape(1, 8, 8)
    torch.manual_seed(3)
    a = t(hu)
    torch.manual_seed(3)
    b = t(hu)
    torch.testing.assert_close(a, b)
    c, w = draws[3]
    torch.testing.assert_close(a, apply_window(hu, c, w))


def test_2p5d_holds_exact_neighbour_slices() -> None:
    vol = np.arange(10)[:, None, None] * 100.0 + np.random.default_rng(0).normal(size=(10, 4, 5))
    for stride in (1, 2, 3):
        for z in range(stride, 10 - stride):
            np.testing.assert_array_equal(stack_slices(vol, z, n_slices=3, stride=stride),
                                          vol[[z - stride, z, z + stride]])
    assert neighbour_indices(0, 10, 3, 2, "replicate") == [0, 0, 2]
    assert neighbour_indices(9, 10, 3, 2, "replicate") == [7, 9, 9]
    assert neighbour_indices(0, 10, 3, 2, "reflect") == [2, 0, 2]
    assert neighbour_indices(1, 10, 5, 1, "reflect") == [1, 0, 1, 2, 3]
    assert list(valid_centres(10, 3, 2, "skip")) == [2, 3, 4, 5, 6, 7]
    with pytest.raises(IndexError):
        neighbour_indices(0, 10, 3, 1, "skip")
    with pytest.raises(ValueError, match="odd"):
        neighbour_indices(3, 10, 2, 1)


def test_dicom_source_2p5d_sample_in_hu_then_windowed(tmp_path: Path) -> None:
    hu = write_ct_series(tmp_path / "s", slope=0.5, intercept=-1000.0)
    cfg = DataConfig(kind="dicom", root=str(tmp_path), slices=3, slice_stride=2, slice_edge="skip",
                     intensity="window", windows=["lung"], channels=3)
    src = build_source(cfg)
    assert len(src) == hu.shape[0] - 4
    s = src[1]  # centre z = 3
    assert s.meta["position"] == 3
    np.testing.assert_array_equal(s.image.numpy(), hu[[1, 3, 5]])
    out = build_intensity_transform(cfg)(s.image)
    torch.testing.assert_close(out, apply_window(torch.from_numpy(hu[[1, 3, 5]]), -600, 1500))
    # one slice per series: each item is a whole series at a random slice
    per = build_source(DataConfig(kind="dicom", root=str(tmp_path), slice_sampling="one_per_volume", channels=1))
    assert len(per) == 1
    torch.manual_seed(0)
    seen = {per[0].meta["position"] for _ in range(30)}
    assert len(seen) > 3


def test_multi_window_channels_feed_the_backbone() -> None:
    from medfoundry.config.schema import ModelConfig
    from medfoundry.models import create_backbone

    cfg = DataConfig(intensity="window", windows=["lung", "mediastinum", "bone"], slices=3, channels=9)
    hu = torch.linspace(-1000, 1500, 3 * 32 * 32).reshape(3, 32, 32)
    out = build_intensity_transform(cfg)(hu)
    assert out.shape == (9, 32, 32)
    torch.testing.assert_close(out[3:6], apply_window(hu, 50, 350))  # window-major
    net = create_backbone(ModelConfig(name="vit_tiny_patch8", img_size=32, in_chans=9))
    assert net.forward_features(out[None]).cls.shape == (1, net.embed_dim)
    with pytest.raises(ValueError, match="data.channels"):
        build_intensity_transform(DataConfig(intensity="window", windows=["lung", "bone"], slices=3, channels=3))
    single = build_intensity_transform(DataConfig(intensity="window", windows=["brain"], channels=3))
    assert single(hu[:1]).shape == (3, 32, 32)  # one slice, one window, repeated to 3 channels


def test_identity_and_range_intensity() -> None:
    x = torch.tensor([[[0.0, 0.25, 1.0]]])
    assert build_intensity_transform(DataConfig(channels=1))(x).tolist() == [[[0.0, 0.25, 1.0]]]
    with pytest.raises(ValueError, match="data.intensity=window"):  # HU left unmapped is an error, not clamped
        build_intensity_transform(DataConfig(channels=1))(torch.tensor([[[-1000.0, 40.0]]]))
    r = build_intensity_transform(DataConfig(channels=1, intensity="range", value_range=[0.0, 255.0]))
    assert r(torch.tensor([[[0.0, 127.5, 300.0]]])).tolist() == [[[0.0, 0.5, 1.0]]]


def test_label_guided_crops_contain_region() -> None:
    region = (40, 70, 60, 90)  # y0, x0, y1, x1
    torch.manual_seed(0)
    for _ in range(200):
        top, left, h, w = label_guided_crop_box(128, 160, (0.2, 0.6), (3 / 4, 4 / 3), region, 1.0)
        assert top >= 0 and top + h <= 128 and left >= 0 and left + w <= 160
        assert top <= 40 and top + h >= 60 and left <= 70 and left + w >= 90
    hits = 0
    for _ in range(400):
        top, left, h, w = label_guided_crop_box(128, 160, (0.05, 0.1), (3 / 4, 4 / 3), region, 0.0)
        hits += top <= 40 and top + h >= 60 and left <= 70 and left + w >= 90
    assert hits < 40  # unguided small crops rarely hold the whole region
    # a crop smaller than the region lies inside it
    big = (10, 10, 120, 150)
    for _ in range(50):
        top, left, h, w = label_guided_crop_box(128, 160, (0.02, 0.05), (3 / 4, 4 / 3), big, 1.0)
        assert top >= 10 and top + h <= 120 and left >= 10 and left + w <= 150
    # probability 0.5: about half the crops are guided
    torch.manual_seed(1)
    guided = sum(
        (lambda b: b[0] <= 40 and b[0] + b[2] >= 60 and b[1] <= 70 and b[1] + b[3] >= 90)(
            label_guided_crop_box(128, 160, (0.05, 0.1), (3 / 4, 4 / 3), region, 0.5)
        )
        for _ in range(400)
    )
    assert 150 < guided < 260
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:9, 12:20] = True
    assert region_from_mask(mask) == (5, 12, 9, 20)
    assert region_from_mask(np.zeros((4, 4))) is None


def test_channel_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.normal(loc=[[[0]], [[500]]], scale=100, size=(2, 16, 16)).astype(np.float32))
              for _ in range(6)]

    class Src:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return Sample(image=images[i])

    t = build_intensity_transform(DataConfig(intensity="window", windows=["0:1000"], slices=2, channels=2))
    stats = channel_stats(Src(), t)
    stacked = torch.stack([t(im) for im in images]).double()
    assert stats["mean"] == pytest.approx(stacked.mean(dim=(0, 2, 3)).tolist(), abs=1e-5)
    assert stats["std"] == pytest.approx(stacked.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-5)
    assert stats["samples"] == 6
