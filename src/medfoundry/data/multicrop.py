"""Multi-crop views for DINO-family training (Caron et al. 2020 SwAV; 2021 DINO).

Global crops (seen by teacher and student) and local crops (student only), each a random resized
crop with optional flip. Photometric augmentations follow DINOv2's ``DataAugmentationDINO``
(``dinov2/data/augmentations.py``): colour jitter of configurable strengths (on grey input its
grey-valid part, brightness and contrast; see :mod:`medfoundry.data.transforms.color_jitter`), random
greyscale (RGB only; refused on other input rather than silently doing nothing), a
Gaussian blur whose probability is set per crop type (DINOv2: 1.0 for the first global crop, 0.1 for
the second, 0.5 for local crops) and solarisation on the second global crop only. They are off in the
medical recipes: they change Hounsfield-unit semantics. For H&E pictures, HED stain augmentation
(``crops.hed_prob``, ``crops.hed_sigma``; Tellez et al. 2018, :mod:`medfoundry.data.transforms.hed`) perturbs
each crop's haematoxylin, eosin and DAB amounts after the flip and before the colour jitter (RGB only).

With a per-view intensity transform (``data.random_window_per_view``, DINO-X's random HU window drawn
afresh for every view) the transform receives the image in source units and maps it to [0, 1] once per
crop before cropping, as DINO-X windows the slice and then augments it. All randomness comes from
torch's global RNG, which :mod:`medfoundry.data.views` seeds per sample for exact resume.

**Fast paths** (docs/performance.md, "CPU multi-crop"):

* *grey pictures as RGB* (exact, on by default): an RGB input whose three channels are equal (a CT slice or
  radiograph repeated for an RGB backbone) is cropped, resized, jittered, greyed, blurred and solarised on one
  channel and repeated to three before normalisation. Every step works per channel or, for contrast,
  saturation and greyscale, is computed on the one channel with torchvision's own arithmetic
  (:func:`~medfoundry.data.transforms.color_jitter.luma_of_grey`); the hue shift, the identity on grey
  pixels, is skipped. The random draws are the same and the views are bit for bit those of the three-channel
  path, except after a Gaussian blur, whose convolution oneDNN may compute with another algorithm for one channel
  than for three (a few float32 ulps; ``tests/data/test_data_multicrop_fast.py``). Off when HED stain
  augmentation is on (it makes colour).
* *uint8 resize* (``uint8_resize=True``, off by default, not exact): the [0, 1] image is quantised to 8 bits
  once per sample and resized by torchvision's native uint8 kernel (what PIL-based pipelines such as dinov2's
  do); the crop returns to float right after the flip. On 8-bit pictures the quantisation is lossless, but the
  kernel rounds to 1/255 between its two separable passes and clamps the bicubic overshoot to [0, 1] (99 % of
  pixels within about 1/255 of the float path's clamped crop, single edge pixels several /255 off); on 16-bit
  or HU-windowed images the input itself loses its finer levels (a lung window, 1500 HU wide, keeps 5.9-HU
  steps). The interpolation stays ``crops.interpolation``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from medfoundry.config.schema import CropsConfig
from medfoundry.data.transforms.color_jitter import (
    apply_color_jitter,
    check_jitter_channels,
    luma_of_grey,
    sample_color_jitter,
)
from medfoundry.data.transforms.hed import random_hed
from medfoundry.data.transforms.label_guided import sample_crop_size

_RATIO = (3 / 4, 4 / 3)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in ``scale`` and aspect ratio in [3/4, 4/3].

    Inception-style sampling (Szegedy et al. 2015) as torchvision does it, with a centre-crop fallback.
    """
    size = sample_crop_size(height, width, scale, _RATIO)
    if size is not None:
        h, w = size
        top = int(torch.randint(0, height - h + 1, (1,)))
        left = int(torch.randint(0, width - w + 1, (1,)))
        return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


class MultiCropTransform:
    """Image (C, H, W) in [0, 1] -> ``{"global": [n_global x (C, S, S)], "local": [n_local x (C, s, s)]}``.

    Args:
        cfg: the ``crops`` section.
        channels: channels of the model input.
        view_intensity: optional per-view intensity transform (source units -> [0, 1]); when given, the
            input is in source units and each crop is cut from its own freshly mapped copy.
        grey_fast_path: crop grey pictures given as RGB (three equal channels) on one channel (exact; see the
            module docstring). ``False`` runs the three-channel path, the reference the tests compare with.
        uint8_resize: resize 8-bit quantised copies (faster, not exact; see the module docstring).
    """

    def __init__(self, cfg: CropsConfig, channels: int,
                 view_intensity: Callable[[Tensor], Tensor] | None = None, grey_fast_path: bool = True,
                 uint8_resize: bool = False) -> None:
        if len(cfg.color_jitter) != 4 or any(v < 0 for v in cfg.color_jitter) or cfg.color_jitter[3] > 0.5:
            raise ValueError(f"crops.color_jitter={cfg.color_jitter} must be [brightness, contrast, saturation, "
                             "hue] strengths >= 0 with hue <= 0.5 (DINOv2: [0.4, 0.4, 0.2, 0.1])")
        if cfg.color_jitter_prob > 0:
            check_jitter_channels(channels, "crops.color_jitter_prob")  # grey gets brightness/contrast only
        if cfg.grayscale_prob > 0 and channels != 3:
            raise ValueError(f"crops.grayscale_prob={cfg.grayscale_prob} has no effect on {channels}-channel input "
                             "(greyscale conversion needs RGB); set it to 0")
        if cfg.hed_prob > 0 and channels != 3:
            raise ValueError(f"crops.hed_prob={cfg.hed_prob} needs RGB (H&E) input, not {channels} channel(s) "
                             "(stain deconvolution is defined for RGB); set it to 0")
        self.cfg = cfg
        self.channels = channels
        self.view_intensity = view_intensity
        self.interp = InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else InterpolationMode.BILINEAR
        self.mean = _per_channel(cfg.mean, channels, "crops.mean")
        self.std = _per_channel(cfg.std, channels, "crops.std")
        # HED turns grey into colour, so the one-channel path would be wrong after it
        self.grey_fast_path = bool(grey_fast_path) and channels == 3 and cfg.hed_prob == 0
        self.uint8_resize = bool(uint8_resize)

    def blur_prob(self, index: int, is_global: bool) -> float:
        """Blur probability of a crop: ``global1_blur_prob`` for the first global crop, ``global2_blur_prob``
        for the others, ``local_blur_prob`` for local crops (DINOv2's 1.0 / 0.1 / 0.5)."""
        c = self.cfg
        if not is_global:
            return c.local_blur_prob
        return c.global1_blur_prob if index == 0 else c.global2_blur_prob

    def is_grey_rgb(self, img: Tensor) -> bool:
        """Whether ``img`` takes the exact one-channel path: the fast path is on (RGB model input, no HED) and the
        image's three channels are equal, i.e. a grey picture given as RGB."""
        return (self.grey_fast_path and img.shape[0] == 3 and torch.equal(img[0], img[1])
                and torch.equal(img[1], img[2]))

    def _prepared(self, img: Tensor) -> tuple[Tensor, bool]:
        """The image the crops are cut from (one channel when it is grey RGB; 8-bit with ``uint8_resize``) and
        whether it stands for a grey RGB image."""
        grey = self.is_grey_rgb(img)
        if grey:
            img = img[:1]
        if self.uint8_resize:
            img = img.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
        return img, grey

    def _crop(self, img: Tensor, size: int, scale: list[float], region, index: int, is_global: bool,
              grey: bool = False) -> Tensor:
        c = self.cfg
        if self.view_intensity is not None:
            img, grey = self._prepared(self._checked(self.view_intensity(img)))
        h, w = img.shape[-2:]
        if region is not None:
            from medfoundry.data.transforms.label_guided import label_guided_crop_box

            top, left, ch, cw = label_guided_crop_box(h, w, tuple(scale), _RATIO, region, c.region_crop_prob)
        else:
            top, left, ch, cw = random_resized_crop_box(h, w, (scale[0], scale[1]))
        out = TF.resized_crop(img, top, left, ch, cw, [size, size], interpolation=self.interp, antialias=True)
        if c.hflip_prob > 0 and float(torch.rand(1)) < c.hflip_prob:
            out = TF.horizontal_flip(out)
        if out.dtype == torch.uint8:
            out = out.float().div_(255.0)
        if c.hed_prob > 0 and float(torch.rand(1)) < c.hed_prob:
            out = random_hed(out.clamp(0.0, 1.0), c.hed_sigma)
        if c.color_jitter_prob > 0 and float(torch.rand(1)) < c.color_jitter_prob:
            order, factors = sample_color_jitter(c.color_jitter)
            out = apply_color_jitter(out.clamp(0.0, 1.0), order, factors, c.color_jitter, grey_rgb=grey)
        if c.grayscale_prob > 0 and float(torch.rand(1)) < c.grayscale_prob:
            # grey RGB: torchvision's luma of the three equal channels, computed on the one
            out = luma_of_grey(out) if grey else TF.rgb_to_grayscale(out, num_output_channels=3)
        blur_prob = self.blur_prob(index, is_global)
        if blur_prob > 0 and float(torch.rand(1)) < blur_prob:
            sigma = float(torch.empty(1).uniform_(0.1, 2.0))
            k = max(3, int(2 * math.ceil(3 * sigma) + 1))
            out = TF.gaussian_blur(out, [k, k], [sigma, sigma])
        if is_global and index == 1 and c.solarize_prob > 0 and float(torch.rand(1)) < c.solarize_prob:
            out = torch.where(out >= 0.5, 1.0 - out, out)
        out = out.clamp(0.0, 1.0) if (c.color_jitter_prob > 0 or blur_prob > 0) else out
        if grey:
            out = out.repeat(3, 1, 1)
        return TF.normalize(out, self.mean, self.std)

    def _checked(self, img: Tensor) -> Tensor:
        if img.shape[0] != self.channels:
            raise ValueError(f"image has {img.shape[0]} channels, transform expects {self.channels}")
        return img

    def __call__(self, img: Tensor, region=None) -> dict[str, list[Tensor]]:
        """The global and local views of one image."""
        grey = False
        if self.view_intensity is None:
            img, grey = self._prepared(self._checked(img))
        c = self.cfg
        glob = [self._crop(img, c.global_size, c.global_scale, region, i, True, grey) for i in range(c.n_global)]
        loc = [self._crop(img, c.local_size, c.local_scale, region, i, False, grey) for i in range(c.n_local)]
        return {"global": glob, "local": loc}


def _per_channel(values: list[float], channels: int, key: str) -> list[float]:
    if len(values) == channels:
        return list(values)
    if len(values) == 1:
        return list(values) * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise ValueError(f"'{key}' has {len(values)} values but the data has {channels} channels")
