"""Dataset statistics for normalisation: per-channel mean and std of the model's input in [0, 1].

The values go into ``crops.mean`` / ``crops.std``. They are measured after the intensity transform
(HU window etc.), on a seeded subset of samples, so they describe what the network actually sees.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def channel_stats(
    source,
    transform: Callable[[Tensor], Tensor] | None = None,
    max_samples: int = 256,
    seed: int = 0,
) -> dict:
    """``{"mean": [...], "std": [...], "samples": n}`` over up to ``max_samples`` items of ``source``.

    Items are an evenly spread subset; each transform call runs under its own seed so random windows
    are reproducible. Unreadable items are skipped (counted in ``"skipped"``).
    """
    n = len(source)
    if n == 0:
        raise ValueError("cannot compute statistics of an empty source")
    count = min(n, max_samples)
    indices = np.unique(np.linspace(0, n - 1, count).round().astype(int))
    total = total_sq = None
    pixels = 0
    skipped = 0
    used = 0
    for i in indices:
        try:
            image = source[int(i)].image
        except Exception:  # noqa: BLE001 - statistics skip unreadable items
            skipped += 1
            continue
        if transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + int(i))
                image = transform(image)
        x = image.double().flatten(1)
        s, sq = x.sum(dim=1), (x * x).sum(dim=1)
        if total is None:
            total, total_sq = s, sq
        elif s.shape != total.shape:
            raise ValueError(f"item {int(i)} has {s.numel()} channels, earlier items {total.numel()}")
        else:
            total, total_sq = total + s, total_sq + sq
        pixels += x.shape[1]
        used += 1
    if total is None:
        raise ValueError(f"no readable item among the {len(indices)} sampled")
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std],
            "samples": used, "skipped": skipped}


def dataset_stats(cfg, max_samples: int = 256, seed: int = 0) -> dict:
    """:func:`channel_stats` of the source and intensity transform a :class:`DataConfig` describes."""
    from medfoundry.data.intensity import build_intensity_transform
    from medfoundry.data.sources import build_source

    return channel_stats(build_source(cfg), build_intensity_transform(cfg), max_samples, seed)
