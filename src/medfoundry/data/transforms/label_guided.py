"""Label-guided crop sampling (DINO-MX): crops drawn to contain a labelled region with a set probability.

A region is a box ``(y0, x0, y1, x1)`` in pixels of the image, end-exclusive (``image[y0:y1, x0:x1]``),
e.g. the bounding box of a tumour mask (:func:`region_from_mask`). With probability ``probability``
a crop is *guided*: its size is drawn as for a random resized crop, and its position is drawn among
those where the crop contains the whole region; when the crop is smaller than the region along an
axis, it is placed inside the region along that axis instead (it then shows only labelled tissue).
Otherwise the crop is an ordinary random resized crop. All draws use torch's global RNG.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def region_from_mask(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """End-exclusive bounding box ``(y0, x0, y1, x1)`` of the non-zero pixels of a 2-D mask, or None."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a region mask must be 2-D, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def sample_crop_size(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int] | None:
    """(h, w) of a crop with area fraction in ``scale`` and aspect ratio w/h in ``ratio`` (log-uniform).

    Ten tries as in Inception-style random resized crops; None when none fits the image.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return h, w
    return None


def _randint(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return lo if hi <= lo else int(torch.randint(lo, hi + 1, (1,)))


def _guided_start(size: int, r0: int, r1: int, extent: int) -> int:
    """Start of a segment of ``size`` in [0, extent) containing [r0, r1), or inside it when too short."""
    if size >= r1 - r0:
        return _randint(max(0, r1 - size), min(r0, extent - size))
    return _randint(r0, r1 - size)


def label_guided_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    region: tuple[int, int, int, int] | None,
    probability: float,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop that contains ``region`` with chance ``probability``.

    ``region`` is clipped to the image; an empty or missing region gives an ordinary random crop.
    """
    guided = region is not None and probability > 0 and (probability >= 1 or float(torch.rand(1)) < probability)
    size = sample_crop_size(height, width, scale, ratio)
    if guided:
        y0, x0, y1, x1 = (int(v) for v in region)
        y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
        x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
        guided = y1 > y0 and x1 > x0
    if size is None:  # centre square fallback, moved to hold the region when guided
        side = min(height, width)
        h = w = side
        top, left = (height - side) // 2, (width - side) // 2
        if guided:
            top, left = _guided_start(h, y0, y1, height), _guided_start(w, x0, x1, width)
        return top, left, h, w
    h, w = size
    if guided:
        return _guided_start(h, y0, y1, height), _guided_start(w, x0, x1, width), h, w
    return _randint(0, height - h), _randint(0, width - w), h, w
