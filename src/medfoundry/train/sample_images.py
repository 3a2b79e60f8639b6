"""A grid of the model's input crops, for TensorBoard: what the network is actually fed.

Augmentation bugs (a window that blanks CT, crops all background, flipped channels) are invisible in the loss
curve but obvious in a picture. The loop hands its first batch, already drawn, to :func:`input_grid`; nothing
here draws random numbers, so the run's RNG stream is untouched.
"""

from __future__ import annotations

import torch
from torchvision.utils import make_grid

#: batch keys holding model inputs, in order of preference, with the layout of their tensors
_INPUT_KEYS = (("global_crops", "views"), ("images", "batch"))


def input_grid(batch: dict, max_images: int = 8) -> tuple[str, torch.Tensor] | None:
    """``(name, grid)``: up to ``max_images`` input crops of ``batch`` as one float ``(3, H, W)`` image in [0, 1].

    ``global_crops`` ``(n_views, B, C, h, w)`` (the DINO family) are laid out one sample per row, its global views
    side by side; ``images`` ``(B, C, h, w)`` (CLIP) four to a row. Each crop is min-max scaled on its own (the
    inputs are normalised, so their range is arbitrary); grey crops stay grey, and crops of another channel count
    than 1 or 3 (stacked slices, HU windows) show their middle channel. ``None`` when the batch holds no image
    tensor under a known key.
    """
    for key, layout in _INPUT_KEYS:
        t = batch.get(key)
        if not isinstance(t, torch.Tensor) or t.ndim != (5 if layout == "views" else 4) or t.numel() == 0:
            continue
        t = t.detach()
        if layout == "views":
            n_views = t.shape[0]
            crops = t.transpose(0, 1).reshape(-1, *t.shape[2:])  # sample-major: sample 0's views, then sample 1's
            per_row = min(n_views, max_images)
        else:
            crops, per_row = t, 4
        crops = crops[:max_images].float().cpu()
        if crops.shape[1] not in (1, 3):
            mid = crops.shape[1] // 2
            crops = crops[:, mid:mid + 1]
        grid = make_grid(crops, nrow=per_row, padding=2, normalize=True, scale_each=True)
        return key, grid.clamp(0, 1)
    return None
