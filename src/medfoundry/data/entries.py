"""Entries of the medical sources: one volume, folder of slices, slide, or prepared item each.

An entry has a ``kind`` (``volume`` or ``tiles``), a ``depth`` (slices or tiles), ``meta`` for the
samples, ``read`` (slices by index for volumes, one tile for tiles), ``region`` (label box of a
slice, if any) and ``describe`` (the file a failure should name). Per-process state (open files,
decoded volumes, memory maps) is created lazily and not pickled, so DataLoader workers, forked or
spawned, open their own.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medfoundry.config.data import DataConfig
from medfoundry.data.readers import Reader, ReaderError, ValueMapping, Volume, open_slide, reader_for, reader_labels
from medfoundry.data.readers.dicom import DicomSeries
from medfoundry.data.readers.slices import read_slice
from medfoundry.data.sources import array_to_chw
from medfoundry.data.transforms.label_guided import region_from_mask

Region = tuple[int, int, int, int]


def regions_of_mask(mask: np.ndarray) -> np.ndarray:
    """(Z, 4) int32 end-exclusive boxes (y0, x0, y1, x1) of each slice of a (Z, Y, X) mask; -1 where empty."""
    out = np.full((mask.shape[0], 4), -1, dtype=np.int32)
    for z in range(mask.shape[0]):
        box = region_from_mask(mask[z])
        if box is not None:
            out[z] = box
    return out


def _region_at(regions: np.ndarray | None, z: int) -> Region | None:
    if regions is None or regions[z, 0] < 0:
        return None
    return tuple(int(v) for v in regions[z])  # type: ignore[return-value]


class _PerProcess:
    """Lazily created per-process state (file handles, caches), dropped when pickled for workers."""

    def _local(self) -> dict:
        state = self.__dict__.get("_proc")
        if state is None or state["pid"] != os.getpid():
            state = {"pid": os.getpid()}
            self.__dict__["_proc"] = state
        return state

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}


class VolumeEntry(_PerProcess):
    """A stack of slices; subclasses implement :meth:`read`."""

    kind = "volume"

    def __init__(self, name: str, depth: int, meta: dict | None = None, regions: np.ndarray | None = None) -> None:
        self.name = name
        self.depth = int(depth)
        self.meta = dict(meta or {})
        self.regions = regions

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """float32 (n, Y, X) (or (n, Y, X, C)) slices in the volume's units."""
        raise NotImplementedError

    def region(self, z: int) -> Region | None:
        return _region_at(self.regions, z)

    def describe(self, z: int | None) -> str:
        return self.name if z is None else f"{self.name} [slice {z}]"


class DicomEntry(VolumeEntry):
    """A DICOM series, read file by file (only the slices a sample needs are decoded)."""

    def __init__(self, series: DicomSeries, meta: dict | None = None, regions: np.ndarray | None = None) -> None:
        base = {"patient_id": series.meta.get("patient_id", ""), "series_id": series.uid,
                "modality": series.meta.get("modality", "")}
        super().__init__(str(Path(series.slices[0].path).parent), series.depth, {**base, **(meta or {})}, regions)
        self.series = series

    def read(self, indices: Sequence[int]) -> np.ndarray:
        return self.series.read(list(indices))

    def describe(self, z: int | None) -> str:
        return self.name if z is None else self.series.describe(z)


class LoadedVolumeEntry(VolumeEntry):
    """A volume file (a reader of kind ``volume``: NIfTI, NRRD, ...) decoded whole, in a small per-process LRU cache.

    ``reader`` is the one that claims ``path`` unless given; it is kept (and pickled) with the entry, so
    workers read with the same reader whatever their own registry holds.
    """

    def __init__(self, path: str, cache_size: int = 2, meta: dict | None = None, mask: str | None = None,
                 reader: Reader | None = None) -> None:
        self.reader = reader or volume_reader(path)
        super().__init__(path, self.reader.depth(path), meta)
        self.cache_size = max(1, int(cache_size))
        self.mask = mask

    def _volume(self) -> tuple[np.ndarray, np.ndarray | None]:
        cache = self._local().setdefault("cache", OrderedDict())
        if self.name in cache:
            cache.move_to_end(self.name)
            return cache[self.name]
        vol = self.reader.read(self.name)
        regions = None
        if self.mask:
            mask = read_array_volume(self.mask).array
            if mask.shape[:3] != vol.array.shape[:3]:
                raise ReaderError(f"{self.mask}: mask shape {mask.shape} != image shape {vol.array.shape}")
            regions = regions_of_mask(mask > 0)
        cache[self.name] = (vol.array, regions)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return cache[self.name]

    def read(self, indices: Sequence[int]) -> np.ndarray:
        return self._volume()[0][list(indices)]

    def region(self, z: int) -> Region | None:
        return _region_at(self._volume()[1], z) if self.mask else None


def volume_reader(path: str | Path) -> Reader:
    """The reader of kind ``volume`` that claims ``path``; :class:`ReaderError` when none does."""
    reader = reader_for(path, kinds=("volume",))
    if reader is None:
        raise ReaderError(f"{path}: not a volume file ({reader_labels(kinds=('volume',))})")
    return reader


def read_array_volume(path: str | Path) -> Volume:
    """A volume file (NIfTI, NRRD or another reader of kind ``volume``) as a :class:`Volume`."""
    return volume_reader(path).read(path)


class SliceFilesEntry(VolumeEntry):
    """PNG/TIFF slice files of one folder, in name order, as a volume (values through their value mapping)."""

    def __init__(self, files: Sequence[str], mapping: ValueMapping | None, require_mapping: bool = True,
                 meta: dict | None = None, region: Region | None = None, unmapped_16bit: str = "refuse") -> None:
        name = str(Path(files[0]).parent) if len(files) > 1 else str(files[0])
        regions = np.asarray([region] * len(files), dtype=np.int32) if region is not None else None
        super().__init__(name, len(files), meta, regions)
        self.files = [str(f) for f in files]
        self.mapping = mapping
        self.require_mapping = require_mapping
        self.unmapped_16bit = unmapped_16bit  # plain pictures (require_mapping off): 16-bit files without a mapping

    def read(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([read_slice(self.files[z], self.mapping, self.require_mapping, self.unmapped_16bit)[0]
                         for z in indices])

    def describe(self, z: int | None) -> str:
        return self.name if z is None else self.files[z]


class PreparedVolumeEntry(VolumeEntry):
    """A volume written by ``medfoundry prepare``: a memory-mapped ``.npy`` (Z, Y, X) plus its value mapping."""

    def __init__(self, path: str, depth: int, slope: float, intercept: float, source: str = "",
                 regions_path: str | None = None, meta: dict | None = None, units: str = "",
                 modality: str = "") -> None:
        regions = np.load(regions_path) if regions_path else None
        super().__init__(path, depth, meta, regions)
        self.slope, self.intercept = float(slope), float(intercept)
        self.source = source
        self.units, self.modality = units, modality  # from the prepared manifest (modality: DICOM-derived items)

    def read(self, indices: Sequence[int]) -> np.ndarray:
        local = self._local()
        if "array" not in local:
            local["array"] = np.load(self.name, mmap_mode="r")
        arr = np.asarray(local["array"][list(indices)], dtype=np.float32)
        if self.slope != 1.0 or self.intercept != 0.0:
            arr = arr * np.float32(self.slope) + np.float32(self.intercept)
        return arr

    def describe(self, z: int | None) -> str:
        where = f"{self.name} (from {self.source})" if self.source else self.name
        return where if z is None else f"{where} [slice {z}]"


class SlideEntry(_PerProcess):
    """The tissue tiles of a whole-slide image at a fixed µm/px."""

    kind = "tiles"

    def __init__(self, path: str, cfg: DataConfig, meta: dict | None = None) -> None:
        self.name = path
        self.size, self.mpp = int(cfg.tile_size), float(cfg.tile_mpp)
        self.backend, self.slide_mpp = cfg.wsi_backend, cfg.slide_mpp
        with open_slide(path, self.backend, self.slide_mpp) as slide:
            self.coords = slide.tile_grid(self.size, self.mpp, cfg.min_tissue)
            base_mpp = slide.mpp
        self.depth = len(self.coords)
        self.meta = {**(meta or {}), "slide_mpp": base_mpp, "tile_mpp": self.mpp}

    def read(self, t: int) -> torch.Tensor:
        local = self._local()
        if "slide" not in local:
            local["slide"] = open_slide(self.name, self.backend, self.slide_mpp)
        x, y = self.coords[t]
        tile = local["slide"].read_tile(float(x), float(y), self.size, self.mpp)
        return array_to_chw(tile) / 255.0

    def region(self, t: int) -> None:
        return None

    def describe(self, t: int | None) -> str:
        if t is None:
            return self.name
        x, y = self.coords[t]
        return f"{self.name} [tile x={x} y={y} at {self.mpp} µm/px]"


class PreparedTilesEntry(_PerProcess):
    """Tiles written by ``medfoundry prepare``: uint8 (N, S, S, 3) ``.npy``, memory-mapped."""

    kind = "tiles"

    def __init__(self, path: str, n: int, source: str = "", meta: dict | None = None) -> None:
        self.name, self.depth, self.source = path, int(n), source
        self.meta = dict(meta or {})

    def read(self, t: int) -> torch.Tensor:
        local = self._local()
        if "array" not in local:
            local["array"] = np.load(self.name, mmap_mode="r")
        return array_to_chw(np.asarray(local["array"][t])) / 255.0

    def region(self, t: int) -> None:
        return None

    def describe(self, t: int | None) -> str:
        where = f"{self.name} (from {self.source})" if self.source else self.name
        return where if t is None else f"{where} [tile {t}]"
