"""Colour jitter with torchvision ``ColorJitter`` semantics, valid on grey images too.

Used by the DINO multi-crop views (DINOv2's ``DataAugmentationDINO``: jitter strengths 0.4, 0.4, 0.2,
0.1 with probability 0.8) and the CLIP training transform. A 1-channel image gets the grey-valid part
(brightness and contrast; saturation and hue are undefined for it) instead of a silent no-op.
Randomness comes from torch's global RNG, which the training datasets seed per sample.

**Grey pictures stored as RGB** (a CT slice repeated to three channels for an RGB backbone) get the RGB
jitter, bit for bit, at a third of the cost: :func:`apply_color_jitter` with ``grey_rgb=True`` takes the one
channel of an RGB image whose three channels are equal and returns the one channel of torchvision's result,
which again has three equal channels. Brightness is per pixel; contrast and saturation blend with
torchvision's luma ``0.2989 R + 0.587 G + 0.114 B``, computed here on the one channel with torchvision's
very operations and order (:func:`luma_of_grey`; the weights sum to 0.9999, so saturation is not exactly
the identity on grey); hue is skipped because on grey pixels in [0, 1] torchvision's RGB -> HSV -> RGB round
trip returns every pixel unchanged (saturation 0 makes ``p = q = t = v``). The random draws are the same
either way (:func:`sample_color_jitter` always draws all four parameters).
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

#: torchvision's luma weights (``_rgb_to_grayscale_image``, ITU-R 601-2 rounded to four digits).
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)


def check_jitter_channels(channels: int, key: str) -> None:
    """Colour jitter is defined for grey (1) and RGB (3) images; other channel counts are refused, naming ``key``."""
    if channels not in (1, 3):
        raise ValueError(f"{key} > 0 needs 1- or 3-channel images, not {channels} (stacked slices or windows are "
                         "not colours); set it to 0")


def sample_color_jitter(strengths: list[float]) -> tuple[list[int], list[float]]:
    """Draw torchvision ``ColorJitter`` parameters from the global torch RNG: ``(order, factors)``.

    ``order`` is a permutation of 0..3 (brightness, contrast, saturation, hue); ``factors`` are the
    brightness/contrast/saturation factors, each uniform in ``[max(0, 1 - s), 1 + s]``, and the hue shift,
    uniform in ``[-h, h]``. All four are always drawn so the random stream does not depend on the image.
    """
    order = torch.randperm(4).tolist()
    factors = [float(torch.empty(1).uniform_(max(0.0, 1.0 - s), 1.0 + s)) for s in strengths[:3]]
    factors.append(float(torch.empty(1).uniform_(-strengths[3], strengths[3])))
    return order, factors


def apply_color_jitter(img: Tensor, order: list[int], factors: list[float], strengths: list[float],
                       grey_rgb: bool = False) -> Tensor:
    """Adjust brightness/contrast/saturation/hue of a [0, 1] image in ``order`` (zero strengths skipped).

    A 1-channel (grey) image gets brightness and contrast only: saturation and hue are undefined for it.
    With ``grey_rgb=True``, ``img`` (1 channel) stands for the RGB image whose three channels all equal it, and
    the result is the one channel of that RGB image's jitter, bit for bit (see the module docstring): the
    cheap path for grey pictures given to an RGB model.
    """
    if grey_rgb:
        return _jitter_grey_rgb(img, order, factors, strengths)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    grey = img.shape[0] == 1
    for i in order:
        if strengths[i] == 0 or (grey and i >= 2):
            continue
        img = ops[i](img, factors[i])
    return img


def luma_of_grey(img: Tensor) -> Tensor:
    """torchvision's luma of the RGB image whose three channels all equal the float ``(1, H, W)`` ``img``.

    The same operations in the same order as ``torchvision.transforms.v2.functional.rgb_to_grayscale``
    (``r * 0.2989 + g * 0.587 + b * 0.114``), so the result equals that function's on the RGB image bit for bit;
    it is ``img * 0.9999`` up to rounding, not ``img``.
    """
    wr, wg, wb = LUMA_WEIGHTS
    return img.mul(wr).add_(img, alpha=wg).add_(img, alpha=wb)


def _blend(img: Tensor, other: Tensor, ratio: float) -> Tensor:
    """torchvision's ``_blend`` for float images: ``ratio * img + (1 - ratio) * other``, clamped to [0, 1]."""
    return img.mul(ratio).add_(other, alpha=1.0 - ratio).clamp_(0.0, 1.0)


def _jitter_grey_rgb(img: Tensor, order: list[int], factors: list[float], strengths: list[float]) -> Tensor:
    """:func:`apply_color_jitter` of ``img.expand(3, H, W)``, computed on the one channel (see the module doc)."""
    if img.shape[0] != 1 or not img.is_floating_point():
        raise ValueError(f"grey_rgb jitter takes the one float channel of a grey RGB image, got {tuple(img.shape)} "
                         f"{img.dtype}")
    for i in order:
        if strengths[i] == 0 or i == 3:  # hue: the identity on grey pixels (module docstring)
            continue
        f = factors[i]
        if f < 0:
            raise ValueError(f"jitter factor {f} must be non-negative")
        if i == 0:
            img = TF.adjust_brightness(img, f)  # per pixel: the same on one channel as on three
        elif i == 1:
            img = _blend(img, torch.mean(luma_of_grey(img), dim=(-3, -2, -1), keepdim=True), f)
        else:
            img = _blend(img, luma_of_grey(img), f)
    return img
