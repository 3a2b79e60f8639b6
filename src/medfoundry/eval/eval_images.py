"""Evaluation images: reading a labelled item (file or volume slice) and the deterministic eval transform."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medfoundry.eval.labelled_set import IMAGE_SUFFIXES, LabelledItem

if TYPE_CHECKING:
    from medfoundry.config.data import DataConfig
    from medfoundry.data.readers.slices import ValueMapping
    from medfoundry.eval.sections import FrozenEvalSections

_INTENSITY_KEYS = ("intensity", "value_range", "windows", "channels", "slices")  # data keys deciding the mapping


def read_eval_image(item: LabelledItem, slices: int = 1, slice_stride: int = 1,
                    mapping: ValueMapping | None = None, unmapped_16bit: str = "refuse") -> Tensor:
    """The item's image as a float32 (C, H, W) tensor in source units (pictures in [0, 1], CT in HU).

    A row of a MedMNIST ``.npz`` (``item.index`` set) is its stored value / 255; a 3-D row gives its central
    slice across ``item.axis`` (with ``slices // 2`` neighbours each side for 2.5D models).
    PNG/JPEG/TIFF files are read like ``data.kind=image_folder`` reads them (their recorded value mapping, else
    ``mapping`` = the run's ``data.slice_slope``/``slice_intercept``; a 16-bit picture with neither is refused
    unless ``unmapped_16bit="full_range"``, see :mod:`medfoundry.data.image_folder`); volume files (DICOM,
    NIfTI, NRRD, DICOM folders) through :func:`medfoundry.data.readers.read_volume`, taking slice
    ``slice_index`` (default: the middle one) and, for 2.5D models (``slices`` > 1), its neighbours
    ``z - stride, z, z + stride ...`` as channels (replicated at the volume's ends). A grey 2-D
    picture is repeated ``slices`` times so it has the channel count a 2.5D model expects.
    """
    from medfoundry.data.sources import array_to_chw

    path = Path(item.path)
    if item.index is not None:  # a row of an array file (MedMNIST .npz): [0, 1], a volume's central slice(s)
        from medfoundry.data.readers.medmnist import open_medmnist

        f = open_medmnist(path)
        if f.volumetric:
            return torch.from_numpy(f.central_slice(item.split, item.index, item.axis or 0, slices, slice_stride))
        image = array_to_chw(f.image(item.split, item.index))
        return image.expand(slices, -1, -1).clone() if slices > 1 and image.shape[0] == 1 else image
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from medfoundry.data.image_folder import read_image_file

        image = array_to_chw(read_image_file(path, mapping, unmapped_16bit))
        if slices > 1 and image.shape[0] == 1:
            image = image.expand(slices, -1, -1).clone()
        return image
    from medfoundry.data.readers import read_volume

    vol = read_volume(path)
    z = vol.depth // 2 if item.slice_index is None else item.slice_index
    if not 0 <= z < vol.depth:
        raise IndexError(f"{path}: slice {z} out of range (depth {vol.depth})")
    half = slices // 2
    zs = [min(max(z + (k - half) * slice_stride, 0), vol.depth - 1) for k in range(slices)]
    arr = vol.array[zs]  # (slices, Y, X) or (slices, Y, X, C)
    if arr.ndim == 4:  # colour volume: channels of the centre slice
        return array_to_chw(arr[half])
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


@dataclass
class EvalTransform:
    """Whole-image evaluation preprocessing: intensity mapping (deterministic), resize + centre crop, normalisation.

    ``intensity`` maps source units to [0, 1] and to ``channels`` channels (the run's
    ``data.intensity`` with random HU windows switched off); without it the image is only matched
    to ``channels`` (grey repeated, RGB averaged).
    """

    img_size: int
    mean: list[float]
    std: list[float]
    channels: int = 1
    intensity: Callable[[Tensor], Tensor] | None = None
    intensity_desc: str = ""  # stable description of ``intensity`` for cache keys
    slices: int = 1  # 2.5D: slices stacked as channels before the intensity mapping
    slice_stride: int = 1
    picture_mapping: ValueMapping | None = None  # data.slice_slope/slice_intercept for pictures without a recorded one
    unmapped_16bit: str = "refuse"  # data.unmapped_16bit: 16-bit pictures with no mapping at all

    def map_intensity(self, image: Tensor) -> Tensor:
        """Source units -> [0, 1] with ``channels`` channels (before resizing and normalisation)."""
        from medfoundry.data.sources import to_channels

        if self.intensity is not None:
            return self.intensity(image)
        return to_channels(image, self.channels, "evaluation image")

    def __call__(self, image: Tensor) -> Tensor:
        image = resize_center_crop(self.map_intensity(image), self.img_size)
        c = image.shape[0]
        mean = torch.tensor(_per_channel(self.mean, c), dtype=image.dtype).view(c, 1, 1)
        std = torch.tensor(_per_channel(self.std, c), dtype=image.dtype).view(c, 1, 1)
        return (image - mean) / std

    def load(self, item: LabelledItem) -> Tensor:
        """Read and preprocess one item."""
        return self(self.read(item))

    def read(self, item: LabelledItem) -> Tensor:
        """The item in source units, read with this transform's picture rules (before :meth:`__call__`)."""
        return read_eval_image(item, self.slices, self.slice_stride, self.picture_mapping, self.unmapped_16bit)

    def settings(self) -> dict:
        """What determines the output (for cache keys)."""
        desc = self.intensity_desc or ("" if self.intensity is None else type(self.intensity).__name__)
        out = {"img_size": self.img_size, "mean": list(self.mean), "std": list(self.std), "channels": self.channels,
               "intensity": desc, "slices": self.slices, "slice_stride": self.slice_stride}
        if self.picture_mapping is not None or self.unmapped_16bit != "refuse":  # else: keys as before, caches valid
            m = self.picture_mapping
            out["pictures"] = {"mapping": [m.slope, m.intercept] if m else None, "unmapped_16bit": self.unmapped_16bit}
        return out


def resize_center_crop(image: Tensor, size: int) -> Tensor:
    """Resize (C, H, W) so the shorter side is ``size`` (bilinear, antialiased), then centre-crop to a square."""
    _, h, w = image.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[:, top : top + size, left : left + size].contiguous()


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    if len(values) == channels:
        return list(values)
    if len(values) == 1:
        return list(values) * channels
    if channels == 1:
        return [float(np.mean(values))]
    raise ValueError(f"{len(values)} normalisation values for {channels} channels")


def build_eval_intensity(data: DataConfig, deterministic: bool = True) -> tuple[Callable[[Tensor], Tensor], str]:
    """The ``data`` section's intensity transform (random HU windows off when ``deterministic``) and a stable
    description.

    The description (the ``data`` keys that decide the mapping) goes into feature-cache keys.
    """
    from medfoundry.data.intensity import build_intensity_transform

    data = replace(data, random_window_prob=0.0) if deterministic else data
    desc = json.dumps({k: getattr(data, k) for k in _INTENSITY_KEYS}, sort_keys=True)
    return build_intensity_transform(data), desc


def eval_transform_from_config(sections: FrozenEvalSections, img_size: int = 0) -> EvalTransform:
    """The evaluation transform of a run's ``data``/``crops``/``eval`` sections: its intensity mapping and
    normalisation, size ``img_size`` or ``eval.img_size`` (else the global crop size).

    A DINO-family run config has the three sections itself and may be passed as it is.
    """
    data, crops = sections.data, sections.crops
    size = img_size or sections.eval.img_size or crops.global_size
    intensity, desc = build_eval_intensity(data)
    from medfoundry.data.image_folder import configured_mapping

    return EvalTransform(size, list(crops.mean), list(crops.std), data.channels, intensity, desc,
                         data.slices, data.slice_stride, configured_mapping(data), data.unmapped_16bit)


class EvalImages(torch.utils.data.Dataset):
    """Labelled items read and preprocessed on access (for a ``DataLoader``)."""

    def __init__(self, items: Sequence[LabelledItem], transform: EvalTransform) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform.load(self.items[i])
