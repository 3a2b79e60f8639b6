"""The intensity transform: source units (HU, stored values, [0, 1]) -> model input in [0, 1].

Chosen by ``data.intensity``:

* ``identity``: the source already delivers [0, 1] (picture files, slide tiles, X-ray PNGs); values
  clearly outside (HU, 0-255) raise an error naming the setting to change instead of being clamped.
* ``range``: ``data.value_range = [low, high]`` mapped linearly onto [0, 1], clamped (e.g. [0, 255]
  for CheXzero's float HDF5, or an MR intensity range).
* ``window``: Hounsfield-unit windows ``data.windows`` (presets such as ``lung``, ``mediastinum``,
  ``soft_tissue``, ``bone``, ``brain``, or ``"centre:width"``), each giving one group of channels;
  with ``data.random_window_prob`` > 0 a window is replaced, per sample, by a random one with centre in
  ``data.window_center_range`` and width in ``data.window_width_range`` (DINO-X's random HU window).

The input's channels are the stacked slices (``data.slices``, 2.5D); windows multiply them
(window-major: all slices through window 1, then window 2, ...). The result is finally matched to
``data.channels`` (a single channel is repeated; otherwise the counts must agree), which must equal
``model.in_chans``. Randomness uses torch's global RNG, seeded per sample by the training dataset.
"""

from __future__ import annotations

from torch import Tensor

from medfoundry.config.data import DataConfig
from medfoundry.data.sources import to_channels
from medfoundry.data.transforms.hu import HUWindows


class IntensityTransform:
    """Picklable ``Tensor (C, H, W) -> Tensor (data.channels, H, W)`` built by :func:`build_intensity_transform`."""

    def __init__(self, cfg: DataConfig) -> None:
        self.mode = cfg.intensity
        self.channels = int(cfg.channels)
        self.windows: HUWindows | None = None
        if self.mode == "window":
            self.windows = HUWindows(
                cfg.windows, cfg.random_window_prob, tuple(cfg.window_center_range), tuple(cfg.window_width_range)
            )
        elif self.mode == "range":
            if len(cfg.value_range) != 2 or not cfg.value_range[1] > cfg.value_range[0]:
                raise ValueError(f"data.value_range={cfg.value_range} must be [low, high] with high > low")
            self.low, self.high = float(cfg.value_range[0]), float(cfg.value_range[1])
        elif self.mode != "identity":
            raise ValueError(f"unknown data.intensity '{self.mode}' (identity, range, window)")
        groups = len(self.windows.windows) if self.windows else 1
        self.out_channels_per_input = groups
        if self.mode == "window" and cfg.slices * groups not in (1, self.channels):
            raise ValueError(
                f"data.slices={cfg.slices} x {groups} window(s) gives {cfg.slices * groups} channels but "
                f"data.channels={self.channels}; set data.channels (and model.in_chans) to {cfg.slices * groups}"
            )

    def __call__(self, image: Tensor) -> Tensor:
        if self.mode == "window":
            out = self.windows(image)
        elif self.mode == "range":
            out = ((image - self.low) / (self.high - self.low)).clamp(0.0, 1.0)
        else:
            lo, hi = float(image.min()), float(image.max())
            if lo < -0.01 or hi > 1.01:
                raise ValueError(
                    f"data.intensity=identity expects values in [0, 1] but the sample spans [{lo:g}, {hi:g}]; "
                    "set data.intensity=window for Hounsfield units or data.intensity=range with data.value_range"
                )
            out = image.clamp(0.0, 1.0)
        return to_channels(out, self.channels, "intensity transform")


def build_intensity_transform(cfg: DataConfig) -> IntensityTransform:
    """The transform mapping a source's :class:`~medfoundry.data.sources.Sample` image to [0, 1] (see module doc)."""
    return IntensityTransform(cfg)
