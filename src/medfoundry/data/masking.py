"""iBOT block masks for global crops (Zhou et al. 2022; block-wise masking as in BEiT, Bao et al. 2021)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def block_mask(grid: tuple[int, int], ratio: float, min_block: int = 4, max_attempts: int = 10) -> Tensor:
    """A (H*W,) bool mask covering about ``ratio`` of a ``grid`` with random rectangles.

    Rectangles of random area (at least ``min_block`` patches) and aspect ratio in [0.3, 1/0.3] are
    added until the target count is reached or no rectangle adds new patches; then single patches
    top it up so the masked count is exactly ``round(ratio * H * W)``. Uses torch's global RNG.
    """
    h, w = grid
    n = h * w
    target = int(round(ratio * n))
    mask = torch.zeros(h, w, dtype=torch.bool)
    if target <= 0:
        return mask.flatten()
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    stalls = 0
    while int(mask.sum()) < target and stalls < max_attempts:
        remaining = target - int(mask.sum())
        area = float(torch.empty(1).uniform_(min_block, max(min_block, remaining)).item())
        aspect = math.exp(float(torch.empty(1).uniform_(*log_aspect).item()))
        bh = max(1, min(h, int(round(math.sqrt(area * aspect)))))
        bw = max(1, min(w, int(round(math.sqrt(area / aspect)))))
        top = int(torch.randint(0, h - bh + 1, (1,)).item())
        left = int(torch.randint(0, w - bw + 1, (1,)).item())
        block = mask[top : top + bh, left : left + bw]
        new = int((~block).sum())
        if new == 0 or new > remaining:
            stalls += 1
            continue
        block.fill_(True)
        stalls = 0
    flat = mask.flatten()
    missing = target - int(flat.sum())
    if missing > 0:
        free = (~flat).nonzero().flatten()
        flat[free[torch.randperm(len(free))[:missing]]] = True
    return flat


class MaskSampler:
    """Per-crop iBOT masks: with probability ``probability`` a block mask of ratio ~ U(min, max), else none."""

    def __init__(self, probability: float, ratio_min: float, ratio_max: float) -> None:
        if not 0 <= ratio_min <= ratio_max < 1:
            raise ValueError(f"mask ratios must satisfy 0 <= min <= max < 1, got [{ratio_min}, {ratio_max}]")
        self.probability = probability
        self.ratio_min = ratio_min
        self.ratio_max = ratio_max

    def __call__(self, grid: tuple[int, int]) -> Tensor:
        """A (H*W,) bool mask for one crop."""
        if float(torch.rand(1)) >= self.probability:
            return torch.zeros(grid[0] * grid[1], dtype=torch.bool)
        ratio = float(torch.empty(1).uniform_(self.ratio_min, self.ratio_max))
        return block_mask(grid, ratio)
