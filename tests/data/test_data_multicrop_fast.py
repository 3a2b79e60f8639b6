"""The CPU multi-crop's fast paths against today's path (docs/performance.md, "CPU multi-crop").

* grey pictures given as RGB (three equal channels) are cropped on one channel: the views must be those of the
  three-channel path bit for bit, with the same random draws, except the Gaussian blur, whose convolution may be
  computed by a different algorithm for one channel than for three (float rounding, a few ulps); a broken shortcut
  (saturation and greyscale taken as the identity on grey, which they are not quite) must be caught;
* ``uint8_resize`` resizes 8-bit copies: not exact, so the views are compared with the float path's under the same
  random draws, pixel by pixel and as distributions over many seeded samples, within the documented bounds; broken
  variants (floor instead of round, bilinear instead of the configured bicubic) must fail the same checks.

Real CT: pydicom's own ``CT_small.dcm`` (always installed with pydicom), in Hounsfield units, windowed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from medfoundry.config import CropsConfig
from medfoundry.config.data import DataConfig
from medfoundry.data import multicrop
from medfoundry.data.intensity import build_intensity_transform
from medfoundry.data.multicrop import MultiCropTransform
from medfoundry.data.transforms import color_jitter
from medfoundry.data.transforms.hu import apply_window

SMALL = dict(global_size=48, local_size=24, n_local=3)
DINOV2 = dict(color_jitter_prob=0.8, color_jitter=[0.4, 0.4, 0.2, 0.1], grayscale_prob=0.2, solarize_prob=0.2)
BLUR = dict(global1_blur_prob=1.0, global2_blur_prob=0.1, local_blur_prob=0.5)
SEEDS = range(24)


@pytest.fixture(scope="module")
def ct_hu() -> torch.Tensor:
    """pydicom's real CT slice in HU, (1, 128, 128)."""
    from pydicom.data import get_testdata_file

    from medfoundry.data.readers import read_volume

    return torch.from_numpy(read_volume(get_testdata_file("CT_small.dcm")).array[0]).float()[None]


@pytest.fixture(scope="module")
def ct(ct_hu: torch.Tensor) -> torch.Tensor:
    """The slice through a soft-tissue window, in [0, 1]."""
    return apply_window(ct_hu, 40, 400)


def _views(transform: MultiCropTransform, image: torch.Tensor, seed: int, region=None) -> tuple[list, torch.Tensor]:
    torch.manual_seed(seed)
    out = transform(image, region)
    return out["global"] + out["local"], torch.get_rng_state()


def _max_difference(cfg: CropsConfig, image: torch.Tensor, seeds=SEEDS, region=None, **kwargs) -> float:
    """Largest |fast - reference| over all views of all seeds; also checks shapes and the random stream."""
    fast, ref = MultiCropTransform(cfg, 3, **kwargs), MultiCropTransform(cfg, 3, grey_fast_path=False)
    worst = 0.0
    for seed in seeds:
        (a, state_a), (b, state_b) = _views(fast, image, seed, region), _views(ref, image, seed, region)
        assert torch.equal(state_a, state_b), "the fast path must draw the same random numbers"
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape and x.dtype == y.dtype and x.is_contiguous()
            worst = max(worst, float((x - y).abs().max()))
    return worst


@pytest.mark.parametrize("extra", [{}, DINOV2, {**DINOV2, "color_jitter_prob": 1.0, "grayscale_prob": 0.5},
                                   {**DINOV2, "interpolation": "bilinear", "hflip_prob": 1.0}],
                         ids=["geometric", "dinov2-colour", "strong-colour", "bilinear"])
def test_grey_rgb_views_equal_the_three_channel_path_bit_for_bit(ct: torch.Tensor, extra: dict) -> None:
    cfg = CropsConfig(**SMALL, **extra)
    image = ct.repeat(3, 1, 1)
    assert MultiCropTransform(cfg, 3).is_grey_rgb(image)
    assert _max_difference(cfg, image) == 0.0


def test_grey_rgb_views_with_label_guided_crops_and_per_view_windows(ct_hu: torch.Tensor) -> None:
    """Per-view HU windows (DINO-X) give a grey RGB image per view: each view takes the one-channel path."""
    cfg = CropsConfig(**SMALL, **DINOV2, region_crop_prob=1.0)
    assert _max_difference(cfg, apply_window(ct_hu, -600, 1500).repeat(3, 1, 1), region=(30, 40, 90, 100)) == 0.0
    data = DataConfig(intensity="window", windows=["lung"], channels=3, random_window_prob=1.0,
                      random_window_per_view=True)
    per_view = build_intensity_transform(data)
    fast = MultiCropTransform(cfg, 3, view_intensity=per_view)
    ref = MultiCropTransform(cfg, 3, view_intensity=per_view, grey_fast_path=False)
    for seed in range(8):
        a, b = _views(fast, ct_hu, seed)[0], _views(ref, ct_hu, seed)[0]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_blurred_grey_rgb_views_agree_to_float_rounding(ct: torch.Tensor) -> None:
    """The blur's convolution may round differently on one channel than on three (oneDNN picks its algorithm per
    shape), by a few float32 ulps; everything else stays exact."""
    cfg = CropsConfig(**SMALL, **DINOV2, **BLUR)
    assert _max_difference(cfg, ct.repeat(3, 1, 1)) <= 4e-6  # normalised: ulps of [0, 1] values / std 0.225
    x = torch.rand(1, 96, 96, generator=torch.Generator().manual_seed(0))
    for k, sigma in ((3, 0.4), (9, 1.4), (13, 2.0)):
        one = TF.gaussian_blur(x, [k, k], [sigma, sigma])
        torch.testing.assert_close(one.expand(3, -1, -1), TF.gaussian_blur(x.repeat(3, 1, 1), [k, k], [sigma, sigma]),
                                   atol=1e-6, rtol=0)


def test_a_broken_grey_shortcut_is_caught(ct: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Taking saturation and greyscale as the identity on grey pictures (they blend with torchvision's luma, whose
    weights sum to 0.9999) changes the views, and the equality check sees it."""
    cfg = CropsConfig(**SMALL, **{**DINOV2, "color_jitter_prob": 1.0, "grayscale_prob": 0.5})
    image = ct.repeat(3, 1, 1)
    monkeypatch.setattr(color_jitter, "luma_of_grey", lambda img: img.clone())
    monkeypatch.setattr(multicrop, "luma_of_grey", lambda img: img.clone())
    assert _max_difference(cfg, image) > 0.0


def test_hue_shift_is_the_identity_on_grey_pixels() -> None:
    """What skipping the hue jitter on grey pictures relies on: torchvision's RGB -> HSV -> RGB round trip returns
    grey pixels in [0, 1] unchanged for every shift."""
    x = torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(1))
    x[0, 0, :4] = torch.tensor([0.0, 1.0, 0.5, 1e-8])
    grey = x.repeat(3, 1, 1)
    for hue in (-0.5, -0.1, -1e-3, 0.03, 0.1, 0.5):
        assert torch.equal(TF.adjust_hue(grey, hue), grey)
    colour = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(TF.adjust_hue(colour, 0.1), colour)  # it does change colours


def test_colour_hed_and_one_channel_inputs_keep_their_path(ct: torch.Tensor) -> None:
    cfg = CropsConfig(**SMALL, **DINOV2)
    colour = torch.stack([ct[0], ct[0].flip(0), ct[0].flip(1)])
    assert not MultiCropTransform(cfg, 3).is_grey_rgb(colour)
    assert _max_difference(cfg, colour, seeds=range(4)) == 0.0  # the same code runs
    assert not MultiCropTransform(CropsConfig(**SMALL, hed_prob=0.5), 3).grey_fast_path  # HED makes colour
    assert not MultiCropTransform(CropsConfig(**SMALL, mean=[0.5], std=[0.25]), 1).grey_fast_path
    assert not MultiCropTransform(cfg, 3, grey_fast_path=False).is_grey_rgb(ct.repeat(3, 1, 1))


# --- uint8_resize: not exact; compared as paired crops and as distributions ---------------------------------------

N_SAMPLES = 120
KS_N = 4000
KS_CRIT = 1.95 * math.sqrt(2 / KS_N)  # two-sample Kolmogorov-Smirnov critical value at alpha = 0.001
UINT8_CROPS = CropsConfig(n_global=2, global_size=48, n_local=2, local_size=24, mean=[0.0], std=[1.0])


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size).max())


def _uint8_statistics(fast: MultiCropTransform, image: torch.Tensor) -> dict[str, float]:
    """Global crops of ``N_SAMPLES`` seeds by ``fast`` and by the float path under the same draws (in 1/255 units
    except ``ks``): the mean and 99th percentile of the paired differences, the largest difference of the per-pixel
    mean and std maps, and the KS statistic of pixel values against the float path's on the same 8-bit grid. The
    float path's crops are clamped to [0, 1], as 8-bit crops are by construction."""
    ref = MultiCropTransform(UINT8_CROPS, 1)
    got, want = [], []
    for seed in range(N_SAMPLES):
        (a, state_a), (b, state_b) = _views(fast, image, seed), _views(ref, image, seed)
        assert torch.equal(state_a, state_b)
        got.append(torch.stack(a[:2]))
        want.append(torch.stack(b[:2]).clamp(0.0, 1.0))
    got, want = torch.stack(got), torch.stack(want)
    diff = (got - want) * 255
    rng = np.random.default_rng(0)
    x = (want * 255).round().flatten().numpy()
    y = (got * 255).round().flatten().numpy()
    return {"bias": float(diff.mean()), "p99": float(diff.abs().flatten().quantile(0.99)),
            "mean_map": float((got.mean(0) - want.mean(0)).abs().max()) * 255,
            "std_map": float((got.std(0) - want.std(0)).abs().max()) * 255,
            "ks": _ks(rng.choice(x, KS_N, replace=False), rng.choice(y, KS_N, replace=False))}


def _within_bounds(s: dict[str, float]) -> bool:
    """The documented trade-off of ``uint8_resize``: unbiased, 99 % of pixels within 2/255 of the float path, the
    mean and spread of every pixel over the samples within 0.5/255, the same distribution of 8-bit values."""
    return abs(s["bias"]) < 0.15 and s["p99"] < 2.0 and s["mean_map"] < 0.5 and s["std_map"] < 0.5 and s["ks"] < KS_CRIT


class _FloorQuantised(MultiCropTransform):
    """Broken: quantises by flooring (a -0.5/255 bias)."""

    def _prepared(self, img: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return super()._prepared((img - 0.5 / 255).clamp(0.0, 1.0))


class _Bilinear(MultiCropTransform):
    """Broken: resizes bilinearly although the configuration says bicubic."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.interp = InterpolationMode.BILINEAR


@pytest.mark.parametrize("eight_bit", [True, False], ids=["8-bit-input", "windowed-float-input"])
def test_uint8_resize_keeps_the_augmentation_distribution(ct: torch.Tensor, eight_bit: bool) -> None:
    image = (ct * 255).round() / 255 if eight_bit else ct
    stats = _uint8_statistics(MultiCropTransform(UINT8_CROPS, 1, uint8_resize=True), image)
    assert _within_bounds(stats), stats


@pytest.mark.parametrize("broken", [_FloorQuantised, _Bilinear])
def test_uint8_resize_checks_catch_a_broken_variant(ct: torch.Tensor, broken: type) -> None:
    stats = _uint8_statistics(broken(UINT8_CROPS, 1, uint8_resize=True), (ct * 255).round() / 255)
    assert not _within_bounds(stats), stats


def test_uint8_resize_on_grey_rgb_with_photometric_augmentations(ct: torch.Tensor) -> None:
    """Both fast paths together: three channels out, the same draws, photometric steps in float after the resize."""
    cfg = CropsConfig(**SMALL, **DINOV2, **BLUR)
    fast = MultiCropTransform(cfg, 3, uint8_resize=True)
    ref = MultiCropTransform(cfg, 3, grey_fast_path=False)
    for seed in range(6):
        (a, state_a), (b, state_b) = _views(fast, ct.repeat(3, 1, 1), seed), _views(ref, ct.repeat(3, 1, 1), seed)
        assert torch.equal(state_a, state_b)
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape and x.dtype == torch.float32
            assert float((x - y).abs().mean()) < 2 / 255 / 0.225
