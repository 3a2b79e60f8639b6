"""Hounsfield-unit windows: named presets, fixed windows and a random window per sample (DINO-X).

A window (centre ``c``, width ``w``) maps HU linearly so that ``c - w/2`` goes to the low end of the
output range and ``c + w/2`` to the high end, clamping outside. (This is the plain linear window; the
DICOM VOI formula's half-pixel offsets are deliberately left out so the bounds map exactly.)
Randomness comes from torch's global RNG, which the training dataset seeds per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medfoundry.config.windows import WINDOW_PRESETS, parse_window

__all__ = ["WINDOW_PRESETS", "parse_window", "apply_window", "HUWindows", "random_window"]


def apply_window(
    hu: Tensor, center: float, width: float, out_range: tuple[float, float] = (0.0, 1.0)
) -> Tensor:
    """Map HU in [center - width/2, center + width/2] linearly onto ``out_range``, clamped."""
    lo = center - width / 2.0
    scaled = ((hu - lo) / width).clamp(0.0, 1.0)
    a, b = out_range
    return scaled * (b - a) + a if (a, b) != (0.0, 1.0) else scaled


def random_window(center_range: tuple[float, float], width_range: tuple[float, float]) -> tuple[float, float]:
    """A window with centre and width drawn uniformly from the ranges (torch's global RNG)."""
    c = float(torch.empty(1).uniform_(float(center_range[0]), float(center_range[1])))
    w = float(torch.empty(1).uniform_(float(width_range[0]), float(width_range[1])))
    return c, max(w, 1e-3)


class HUWindows:
    """(C, H, W) HU -> (C * n_windows, H, W) in [0, 1], window-major (all channels of window 1, then 2...).

    Args:
        windows: presets or ``"centre:width"`` strings; one output group per window.
        random_prob: chance per sample of replacing each window by a random one drawn from the ranges.
        center_range, width_range: the ranges of the random window (HU).
    """

    def __init__(
        self,
        windows: list[str] | tuple[str, ...] = ("lung",),
        random_prob: float = 0.0,
        center_range: tuple[float, float] = (-600.0, 400.0),
        width_range: tuple[float, float] = (300.0, 2000.0),
    ) -> None:
        if not windows:
            raise ValueError("at least one HU window is needed (data.windows)")
        self.windows = [parse_window(w) for w in windows]
        self.random_prob = float(random_prob)
        self.center_range = (float(center_range[0]), float(center_range[1]))
        self.width_range = (float(width_range[0]), float(width_range[1]))
        if self.center_range[0] > self.center_range[1] or not 0 < self.width_range[0] <= self.width_range[1]:
            raise ValueError(
                f"random window ranges centre {self.center_range}, width {self.width_range} must be "
                "[low, high] with 0 < width low"
            )

    def sample_windows(self) -> list[tuple[float, float]]:
        """The windows for one sample (random ones drawn here when ``random_prob`` > 0)."""
        if self.random_prob <= 0:
            return list(self.windows)
        out = []
        for fixed in self.windows:
            if self.random_prob >= 1 or float(torch.rand(1)) < self.random_prob:
                out.append(random_window(self.center_range, self.width_range))
            else:
                out.append(fixed)
        return out

    def __call__(self, hu: Tensor) -> Tensor:
        groups = [apply_window(hu, c, w) for c, w in self.sample_windows()]
        return groups[0] if len(groups) == 1 else torch.cat(groups, dim=0)
