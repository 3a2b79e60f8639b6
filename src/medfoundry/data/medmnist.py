"""``data.kind=medmnist``: the images of a MedMNIST ``.npz`` as a training source (``data.root=FILE.npz``).

The file's layout and what is relied on are described in :mod:`medfoundry.data.readers.medmnist`. Items are the
rows of split ``data.split`` (``""``: train, val and test in that order; pretraining on the val and test images
leaks nothing of their labels, but keep ``data.split=train`` when those images must stay unseen). A 2-D row is one
item, a 3-D volume gives one item per slice along its first axis (``data.slices`` > 1 stacks its neighbours
``data.slice_stride`` apart as channels, edges replicated, like the volume sources). Images are ``value / 255``
in [0, 1] (grey ``(1, H, W)`` or RGB ``(3, H, W)``), so ``data.intensity=identity`` is the mapping to use.
``Sample.meta`` holds ``split``, ``label`` (the class index, or the 0/1 labels joined by ``,`` for a multi-label
file), ``position`` (the row) and ``series_id`` (``split/row``, one per image or volume).
"""

from __future__ import annotations

import numpy as np
import torch

from medfoundry.config.data import DataConfig
from medfoundry.data.readers.medmnist import SPLITS, MedMNISTFile, open_medmnist
from medfoundry.data.sources import Sample, array_to_chw, register_source


class MedMNISTSource:
    """The images of one MedMNIST ``.npz`` (see the module doc), in source units = [0, 1]."""

    def __init__(self, cfg: DataConfig) -> None:
        self.file: MedMNISTFile = open_medmnist(cfg.root)
        split = cfg.split.strip().lower()
        if split and split not in SPLITS:
            raise ValueError(f"data.split '{cfg.split}' is not one of {SPLITS} (or '' for all) for data.kind=medmnist")
        self.splits = [split] if split else list(SPLITS)
        if cfg.slices < 1 or cfg.slices % 2 == 0:
            raise ValueError(f"data.slices={cfg.slices} must be odd (1 or 3 for z-s, z, z+s)")
        self.slices, self.stride = int(cfg.slices), max(1, int(cfg.slice_stride))
        self.per_row = self.file.depth()
        self.offsets = np.cumsum([0] + [self.file.size(s) * self.per_row for s in self.splits])
        if self.offsets[-1] == 0:
            raise FileNotFoundError(f"data.root '{cfg.root}' (kind medmnist) holds no {'/'.join(self.splits)} images")
        self._labels = {s: self.file.labels(s) for s in self.splits}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[str, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        row, z = divmod(index - int(self.offsets[k]), self.per_row)
        return self.splits[k], row, z

    def describe(self, index: int) -> str:
        """``FILE[split_images][row]`` (``[z=..]`` for a volume's slice), for error messages."""
        split, row, z = self._locate(index)
        return f"{self.file.path}[{split}_images][{row}]" + (f"[z={z}]" if self.file.volumetric else "")

    def __getitem__(self, index: int) -> Sample:
        split, row, z = self._locate(index)
        if self.file.volumetric:
            vol = self.file.image(split, row)
            depth = vol.shape[0]
            half = self.slices // 2
            zs = [min(max(z + (k - half) * self.stride, 0), depth - 1) for k in range(self.slices)]
            image = torch.from_numpy(np.ascontiguousarray(vol[zs]))
        else:
            image = array_to_chw(self.file.image(split, row))
            if self.slices > 1 and image.shape[0] == 1:
                image = image.expand(self.slices, -1, -1).clone()
        labels = self._labels[split][row]
        meta = {"split": split, "position": int(row), "series_id": f"{split}/{row}",
                "label": ",".join(str(int(v)) for v in labels) if self.file.multi_label else str(int(labels[0]))}
        return Sample(image=image, path=self.describe(index), meta=meta)


@register_source("medmnist")
def build_medmnist(cfg: DataConfig) -> MedMNISTSource:
    """``data.kind=medmnist``: the images of the MedMNIST ``.npz`` ``data.root`` (rows of ``data.split``)."""
    return MedMNISTSource(cfg)
