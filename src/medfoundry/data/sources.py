"""Image sources: map-style collections of images in their native units, one interface for all formats.

A source returns a :class:`Sample` per index: a float32 tensor (C, H, W) in the units the data
comes in (Hounsfield units for CT, [0, 1] for 8/16-bit pictures) plus optional metadata such as a
labelled region for label-guided cropping. Intensity mapping (e.g. HU windows) and augmentation
happen afterwards, under a per-sample seed, in :mod:`medfoundry.data.views`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from medfoundry.config.data import DataConfig
from medfoundry.config.names import register_names


@dataclass
class Sample:
    """One image and what is known about it."""

    image: Tensor  # (C, H, W) float32 in source units
    path: str = ""  # where it came from (for error messages and reports)
    region: tuple[int, int, int, int] | None = None  # (y0, x0, y1, x1) labelled box, if any
    meta: dict[str, Any] = field(default_factory=dict)  # spacing, patient id, label ...


class ImageSource(Protocol):
    """What the training and evaluation datasets need from a data source."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def describe(self, index: int) -> str:
        """A human-readable name for item ``index`` (a file path), for error messages."""
        ...


SOURCE_BUILDERS: dict[str, Callable[[DataConfig], ImageSource]] = {}


def register_source(kind: str) -> Callable:
    """Decorator registering a builder ``DataConfig -> ImageSource`` under ``data.kind``."""

    def deco(fn: Callable[[DataConfig], ImageSource]) -> Callable[[DataConfig], ImageSource]:
        SOURCE_BUILDERS[kind] = fn
        return fn

    return deco


def build_source(cfg: DataConfig) -> ImageSource:
    """The image source configured by ``cfg.kind``; the error lists the known kinds."""
    _import_builtin_sources()
    if cfg.kind not in SOURCE_BUILDERS:
        raise ValueError(f"unknown data.kind '{cfg.kind}'; known kinds: {sorted(SOURCE_BUILDERS)}")
    return SOURCE_BUILDERS[cfg.kind](cfg)


def _import_builtin_sources() -> None:
    import importlib

    for module in ("medfoundry.data.image_folder", "medfoundry.data.medical_sources", "medfoundry.data.medmnist"):
        importlib.import_module(module)  # each registers its source kinds on import


def _source_kinds() -> list[str]:
    _import_builtin_sources()
    return list(SOURCE_BUILDERS)


register_names("data.kind", _source_kinds)  # config checks data.kind against this (config/names.py)


def to_channels(image: Tensor, channels: int, where: str = "") -> Tensor:
    """Make a (C, H, W) image have ``channels`` channels: repeat grey, average RGB to grey."""
    c = image.shape[0]
    if c == channels:
        return image
    if c == 1:
        return image.expand(channels, -1, -1).clone()
    if channels == 1:
        return image.mean(dim=0, keepdim=True)
    raise ValueError(f"{where}: image has {c} channels but data.channels={channels}; cannot convert")


def array_to_chw(array: np.ndarray) -> Tensor:
    """(H, W), (H, W, C) or (C, H, W) array -> float32 (C, H, W) tensor (channels-last if C<=4 last)."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4):
        a = np.moveaxis(a, -1, 0)
    elif a.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {a.shape}")
    if a.shape[0] == 4:
        a = a[:3]
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def list_files(root: str | Path, extensions: list[str]) -> list[Path]:
    """Files under ``root`` (recursive, sorted) whose suffix is in ``extensions`` (case-insensitive)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data.root '{root}' does not exist")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
