"""DINOv2's augmentations per crop type (blur 1.0 / 0.1 / 0.5, solarise on global 2, jitter strengths)
and DINO-X's random HU window drawn for every view."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from medfoundry.config import CropsConfig, load_config
from medfoundry.config.data import DataConfig
from medfoundry.data.intensity import build_intensity_transform
from medfoundry.data.multicrop import MultiCropTransform

# full-image crops at the image's own size, no flip: a crop without photometric change equals the input
IDENTITY_CROPS = dict(n_global=2, global_size=32, global_scale=[1.0, 1.0], n_local=2, local_size=32,
                      local_scale=[1.0, 1.0], hflip_prob=0.0, mean=[0.0], std=[1.0])


def _noise(channels: int = 1) -> torch.Tensor:
    return torch.rand(channels, 32, 32, generator=torch.Generator().manual_seed(0))


def _blurred(view: torch.Tensor, image: torch.Tensor) -> bool:
    """A blurred view has clearly less pixel-to-pixel variation than the white-noise input."""
    def tv(x: torch.Tensor) -> float:
        return float((x[..., 1:] - x[..., :-1]).abs().mean())
    return tv(view) < 0.7 * tv(image)


@pytest.mark.parametrize("probs,expected", [((1.0, 0.0, 0.0), (True, False, False, False)),
                                            ((0.0, 1.0, 0.0), (False, True, False, False)),
                                            ((0.0, 0.0, 1.0), (False, False, True, True))])
def test_blur_probability_is_set_per_crop_type(probs: tuple, expected: tuple) -> None:
    cfg = CropsConfig(**IDENTITY_CROPS, global1_blur_prob=probs[0], global2_blur_prob=probs[1],
                      local_blur_prob=probs[2])
    image = _noise()
    torch.manual_seed(1)
    out = MultiCropTransform(cfg, channels=1)(image)
    views = out["global"] + out["local"]
    assert tuple(_blurred(v, image) for v in views) == expected
    for v, blurred in zip(views, expected):
        if not blurred:
            torch.testing.assert_close(v, image, atol=2e-6, rtol=0)


def test_solarisation_only_on_the_second_global_crop() -> None:
    cfg = CropsConfig(**IDENTITY_CROPS, solarize_prob=1.0)
    image = _noise()
    out = MultiCropTransform(cfg, channels=1)(image)
    torch.testing.assert_close(out["global"][0], image, atol=2e-6, rtol=0)
    torch.testing.assert_close(out["global"][1], torch.where(image >= 0.5, 1 - image, image), atol=2e-6, rtol=0)
    for v in out["local"]:
        torch.testing.assert_close(v, image, atol=2e-6, rtol=0)


def test_colour_jitter_strengths_are_configurable() -> None:
    image = _noise(3)
    still = MultiCropTransform(CropsConfig(**{**IDENTITY_CROPS, "mean": [0.0] * 3, "std": [1.0] * 3},
                                           color_jitter_prob=1.0, color_jitter=[0.0, 0.0, 0.0, 0.0]), channels=3)
    torch.testing.assert_close(still(image)["global"][0], image, atol=1e-5, rtol=0)
    moved = MultiCropTransform(CropsConfig(**{**IDENTITY_CROPS, "mean": [0.0] * 3, "std": [1.0] * 3},
                                           color_jitter_prob=1.0, color_jitter=[0.4, 0.4, 0.2, 0.1]), channels=3)
    torch.manual_seed(0)
    assert (moved(image)["global"][0] - image).abs().mean() > 0.01
    with pytest.raises(ValueError, match="crops.color_jitter"):
        MultiCropTransform(CropsConfig(color_jitter=[0.4, 0.4]), channels=3)


def _hu_windows(per_view: bool) -> DataConfig:
    return DataConfig(intensity="window", windows=["lung"], channels=1, random_window_prob=1.0,
                      random_window_per_view=per_view, window_center_range=[-400.0, 400.0],
                      window_width_range=[800.0, 2000.0])


def test_random_window_drawn_for_every_view() -> None:
    """DINO-X windows each view separately: a flat HU ramp gives different intensities per view."""
    hu = torch.linspace(-1000, 1000, 32 * 32).reshape(1, 32, 32)
    cfg = CropsConfig(**IDENTITY_CROPS)
    per_view = MultiCropTransform(cfg, 1, view_intensity=build_intensity_transform(_hu_windows(True)))
    torch.manual_seed(0)
    views = per_view(hu)
    all_views = views["global"] + views["local"]
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in all_views)
    assert len({round(float(v.mean()), 4) for v in all_views}) == len(all_views)  # a window per view
    per_sample = MultiCropTransform(cfg, 1)
    torch.manual_seed(0)
    shared = per_sample(build_intensity_transform(_hu_windows(False))(hu))
    torch.testing.assert_close(shared["global"][0], shared["global"][1])  # one window for the whole sample


def test_per_view_windows_through_the_loader_on_real_ct(tmp_path: Path) -> None:
    """The training loader on real CT DICOM (pydicom-data) with DINO-X's per-view windows."""
    from pydicom.data import get_testdata_file

    from medfoundry.methods.dino.loader import build_dino_loader
    from medfoundry.recipes import resolve_recipe

    (tmp_path / "ct").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct" / "CT_small.dcm")
    overrides = [f"data.root={tmp_path / 'ct'}", "data.kind=dicom", "data.intensity=window", "data.channels=1",
                 "model.in_chans=1", "data.random_window_prob=1.0", "data.window_center_range=[-400,400]",
                 "data.window_width_range=[800,2000]", "crops.global_scale=[1.0,1.0]", "crops.hflip_prob=0",
                 "crops.n_local=0", "train.batch_size=2", "dino.ibot_weight=0"]
    per_view = load_config(resolve_recipe("tiny_dino_cpu"), [*overrides, "data.random_window_per_view=true"])
    batch = next(iter(build_dino_loader(per_view, 8, 0, 0, 1)))
    g = batch["global_crops"]  # (2 views, batch 2, 1, 64, 64)
    assert not torch.allclose(g[0], g[1])
    shared = load_config(resolve_recipe("tiny_dino_cpu"), overrides)
    g = next(iter(build_dino_loader(shared, 8, 0, 0, 1)))["global_crops"]
    torch.testing.assert_close(g[0], g[1])
    with pytest.raises(ValueError, match="random_window_per_view"):
        build_dino_loader(load_config(resolve_recipe("tiny_dino_cpu"),
                                      [f"data.root={tmp_path / 'ct'}", "data.kind=dicom",
                                       "data.random_window_per_view=true"]), 8, 0, 0, 1)


def test_colour_jitter_on_grey_is_brightness_and_contrast_not_a_no_op() -> None:
    """Grey CT/X-ray input: the jitter changes intensities (brightness/contrast) instead of doing nothing."""
    import torchvision.transforms.v2.functional as TF

    from medfoundry.data.transforms.color_jitter import apply_color_jitter

    image = _noise(1)
    cfg = CropsConfig(**IDENTITY_CROPS, color_jitter_prob=1.0)
    torch.manual_seed(3)
    view = MultiCropTransform(cfg, channels=1)(image)["global"][0]
    assert (view - image).abs().mean() > 0.01
    kept = (view > 0) & (view < 1)  # brightness/contrast: monotone, near-affine maps of the intensity
    corr = torch.corrcoef(torch.stack([view[kept], image[kept]]))[0, 1]
    assert corr > 0.95  # an intensity map, not a spatial change
    # the grey-valid part of torchvision's ColorJitter, written out for one set of parameters
    expected = TF.adjust_contrast(TF.adjust_brightness(image, 1.2), 0.8)
    torch.testing.assert_close(apply_color_jitter(image, [2, 0, 3, 1], [1.2, 0.8, 0.5, 0.1], [0.4] * 4), expected)
    with pytest.raises(ValueError, match="crops.color_jitter_prob"):
        MultiCropTransform(CropsConfig(color_jitter_prob=0.8), channels=9)  # 3 slices x 3 windows are not colours
    with pytest.raises(ValueError, match="crops.grayscale_prob"):
        MultiCropTransform(CropsConfig(grayscale_prob=0.2), channels=1)
