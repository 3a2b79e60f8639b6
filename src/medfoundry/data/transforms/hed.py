"""HED stain augmentation of H&E pictures (Tellez et al. 2018, 2019) by colour deconvolution.

H&E slides differ between labs and scanners mostly in how much haematoxylin and eosin each pixel holds.
Tellez et al. ("Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to train
distilled stain-invariant convolutional networks", IEEE TMI 2018; "Quantifying the effects of data
augmentation and stain color normalization in convolutional neural networks for computational pathology",
MedIA 2019) therefore augment in stain space: RGB -> HED by colour deconvolution, each stain channel ``s``
perturbed as ``alpha * s + beta`` with ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-sigma, sigma)``
drawn per image and channel, then back to RGB.

Colour deconvolution follows Ruifrok & Johnston ("Quantification of histochemical staining by color
deconvolution", Anal. Quant. Cytol. Histol. 23(4), 2001): optical density ``OD = -log10(I / I0)`` per RGB
channel (here ``I0 = 1``, white, for [0, 1] pictures; ``I`` clamped at 1e-6) is a linear mix of the stains'
OD vectors, ``OD = s @ RGB_FROM_HED`` with one row per stain (haematoxylin, eosin, DAB), so
``s = OD @ inv(RGB_FROM_HED)``. The matrix is scikit-image's ``rgb_from_hed`` (``skimage.color.rgb2hed``),
Ruifrok & Johnston's H&E-DAB vectors to two decimals. Stain concentrations are in OD (log10) units and are
not clipped, so ``sigma = 0`` is the identity up to rounding. scikit-image's ``rgb2hed`` reports the same
concentrations divided by 6 (it divides ``-ln I`` by ``ln 1e6``) with negatives clipped: a shift of 0.05 in
its units (OpenMidnight's shift, ``hed_mod`` in MedARC-AI/OpenMidnight ``dinov2/data/augmentations.py``) is 0.3
here. At ``sigma = 0.05`` a stain's amount changes by at most 5% and shifts by at most 0.05 OD (e.g. +0.05
haematoxylin scales red by ``10 ** -(0.05 * 0.65)`` ~ 0.93).

Randomness comes from torch's global RNG, which the training dataset seeds per sample
(:class:`medfoundry.data.views.SeededViews`), so views stay a pure function of ``(seed, k)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Stain OD vectors, one row per stain: haematoxylin, eosin, DAB (Ruifrok & Johnston 2001; skimage's rgb_from_hed).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29],
                             [0.07, 0.99, 0.11],
                             [0.27, 0.57, 0.78]], dtype=torch.float64)
#: Its inverse: OD (row vector) -> stain concentrations.
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
#: Smallest transmitted intensity (black pixels would have infinite optical density).
MIN_INTENSITY = 1e-6


def _check_rgb(img: Tensor) -> None:
    if img.ndim < 3 or img.shape[-3] != 3:
        raise ValueError(f"HED stain augmentation needs RGB images (..., 3, H, W), got shape {tuple(img.shape)}; "
                         "set crops.hed_prob=0 for grey or multi-channel data")


def rgb_to_hed(img: Tensor) -> Tensor:
    """``(..., 3, H, W)`` RGB in [0, 1] -> ``(..., 3, H, W)`` haematoxylin, eosin and DAB concentrations (OD units,
    Ruifrok & Johnston 2001 colour deconvolution; not clipped)."""
    _check_rgb(img)
    od = -torch.log10(img.clamp_min(MIN_INTENSITY))
    return torch.einsum("...chw,cd->...dhw", od, HED_FROM_RGB.to(img.dtype))


def hed_to_rgb(hed: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hed`: stain concentrations -> RGB ``10 ** -OD``, clamped to [0, 1]."""
    _check_rgb(hed)
    od = torch.einsum("...dhw,dc->...chw", hed, RGB_FROM_HED.to(hed.dtype))
    return torch.pow(10.0, -od).clamp(0.0, 1.0)


def sample_hed(sigma: float) -> tuple[Tensor, Tensor]:
    """Draw Tellez et al.'s per-stain factors from the global torch RNG: ``alpha ~ U(1 - sigma, 1 + sigma)`` and
    ``beta ~ U(-sigma, sigma)``, each of shape ``(3,)`` (haematoxylin, eosin, DAB). Both are always drawn, so the
    random stream does not depend on the image."""
    alpha = torch.empty(3).uniform_(1.0 - sigma, 1.0 + sigma)
    beta = torch.empty(3).uniform_(-sigma, sigma)
    return alpha, beta


def apply_hed(img: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Perturb the stains of an RGB ``(..., 3, H, W)`` picture in [0, 1]: ``s -> alpha * s + beta`` per HED channel
    (Tellez et al. 2018), back to RGB in [0, 1]. ``alpha = 1, beta = 0`` returns the picture up to rounding."""
    hed = rgb_to_hed(img)
    shape = (3, 1, 1)
    hed = hed * alpha.to(hed).view(shape) + beta.to(hed).view(shape)
    return hed_to_rgb(hed)


def random_hed(img: Tensor, sigma: float) -> Tensor:
    """:func:`apply_hed` with factors from :func:`sample_hed` (one draw per call, i.e. per view)."""
    alpha, beta = sample_hed(sigma)
    return apply_hed(img, alpha, beta)


__all__ = ["HED_FROM_RGB", "MIN_INTENSITY", "RGB_FROM_HED", "apply_hed", "hed_to_rgb", "random_hed", "rgb_to_hed",
           "sample_hed"]
