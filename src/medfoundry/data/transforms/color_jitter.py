"""Colour jitter with torchvision ``ColorJitter`` semantics, valid on grey images too.

Used by the DINO multi-crop views (DINOv2's ``DataAugmentationDINO``: jitter strengths 0.4, 0.4, 0.2,
0.1 with probability 0.8) and the CLIP training transform. A 1-channel image gets the grey-valid part
(brightness and contrast; saturation and hue are undefined for it) instead of a silent no-op.
Randomness comes from torch's global RNG, which the training datasets seed per sample.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor


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


def apply_color_jitter(img: Tensor, order: list[int], factors: list[float], strengths: list[float]) -> Tensor:
    """Adjust brightness/contrast/saturation/hue of a [0, 1] image in ``order`` (zero strengths skipped).

    A 1-channel (grey) image gets brightness and contrast only: saturation and hue are undefined for it.
    """
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    grey = img.shape[0] == 1
    for i in order:
        if strengths[i] == 0 or (grey and i >= 2):
            continue
        img = ops[i](img, factors[i])
    return img
