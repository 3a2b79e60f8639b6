"""Medical image sources (``data.kind``): dicom, nifti, slices, hdf5, wsi, manifest, prepared.

Every source is a list of *entries* (a volume, a folder of slice files, a slide, ...) each offering
sample *positions* (the slices that can be centres of a 2.5D stack, or a slide's tissue tiles):

* ``data.slice_sampling=all``: every position of every entry is one item;
* ``data.slice_sampling=one_per_volume``: item ``i`` is entry ``i`` at a random position (torch RNG), so
  a batch drawn without replacement holds at most one slice per series.

Volume samples hold ``data.slices`` slices (z - s, z, z + s for 3) in the volume's units (HU for
CT) as channels; :mod:`medfoundry.data.intensity` then maps them to [0, 1]. Slide tiles and plain
pictures are RGB/grey in [0, 1]. Entries that cannot be opened when the source is built are left
out and listed in ``source.skipped`` (path, reason) and in the log. A manifest row becomes the entry of the
kind of the reader that claims its path (:data:`_ENTRY_BUILDERS`, see :mod:`medfoundry.data.readers.interface`).

DICOM series (``dicom``, DICOM rows of a ``manifest``, ``prepared`` items made from DICOM) are also selected by
their values' meaning (:func:`series_problem`): ``data.modalities`` keeps only the listed Modality tags, and
with ``data.intensity=window`` a series whose values are not Hounsfield units (not CT and no ``RescaleType``
HU, as :class:`~medfoundry.data.readers.dicom.DicomSeries` decides) is left out, never windowed: an HU lung
window over MR signal or radiograph counts gives a picture with no meaning. Left-out series are logged once
(count, reason, first paths) and listed in ``source.skipped``; when nothing usable is left,
:class:`UnusableSeriesError` names ``data.root``, the modalities found and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfoundry.config.data import DataConfig
from medfoundry.data.entries import (
    DicomEntry,
    LoadedVolumeEntry,
    PreparedTilesEntry,
    PreparedVolumeEntry,
    SliceFilesEntry,
    SlideEntry,
    read_array_volume,
    regions_of_mask,
)
from medfoundry.data.readers import HDF5Images, Reader, ReaderError, ValueMapping, reader_for, reader_labels
from medfoundry.data.readers.dicom import DicomSeries, find_series, read_header
from medfoundry.data.readers.hdf5 import HDF5_SUFFIXES
from medfoundry.data.readers.interface import has_suffix
from medfoundry.data.readers.slices import read_stored
from medfoundry.data.readers.wsi import VENDOR_SUFFIXES
from medfoundry.data.sources import Sample, array_to_chw, list_files, register_source
from medfoundry.data.transforms.label_guided import region_from_mask
from medfoundry.data.transforms.stack25d import neighbour_indices, valid_centres
from medfoundry.errors import UserError

log = logging.getLogger("medfoundry.data")


class EntrySource:
    """An :class:`~medfoundry.data.sources.ImageSource` over volume and tile entries (see module doc)."""

    def __init__(self, entries: Sequence[Any], cfg: DataConfig, skipped: Sequence[tuple[str, str]] = (),
                 selection: SeriesSelection | None = None) -> None:
        if cfg.slices < 1 or cfg.slices % 2 == 0:
            raise ValueError(f"data.slices={cfg.slices} must be odd (1 or 3 for z-s, z, z+s)")
        if cfg.slice_stride < 1:
            raise ValueError(f"data.slice_stride={cfg.slice_stride} must be >= 1")
        self.cfg = cfg
        self.skipped = list(skipped)
        self.entries, self.positions = [], []
        for entry in entries:
            if entry.kind == "volume":
                pos = valid_centres(entry.depth, cfg.slices, cfg.slice_stride, cfg.slice_edge)
            else:
                pos = range(entry.depth)
            if len(pos) == 0:
                self.skipped.append((entry.describe(None), "no usable slice or tile (too few slices or no tissue)"))
                continue
            self.entries.append(entry)
            self.positions.append(pos)
        for path, reason in self.skipped:
            log.warning("data: skipped %s", reason if reason.startswith(path) else f"{path}: {reason}")
        if selection is not None:
            selection.log()
            self.skipped += selection.excluded
            if not self.entries and selection.excluded:
                raise UnusableSeriesError(selection.nothing_left_message(cfg))
        if not self.entries:
            first = f"; first problem: {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""
            raise FileNotFoundError(f"data.root '{cfg.root}' (kind {cfg.kind}) yields no usable image{first}")
        self.per_entry = cfg.slice_sampling == "one_per_volume"
        self.offsets = np.cumsum([0] + [len(p) for p in self.positions])

    def __len__(self) -> int:
        return len(self.entries) if self.per_entry else int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[Any, int | None]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.per_entry:
            return self.entries[index], None
        e = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.entries[e], self.positions[e][index - int(self.offsets[e])]

    def describe(self, index: int) -> str:
        entry, pos = self._locate(index)
        return entry.describe(pos)

    def __getitem__(self, index: int) -> Sample:
        entry, pos = self._locate(index)
        if pos is None:
            choices = self.positions[index]
            pos = choices[int(torch.randint(len(choices), (1,)))]
        if entry.kind == "tiles":
            image = entry.read(pos)
        else:
            c = self.cfg
            arr = entry.read(neighbour_indices(pos, entry.depth, c.slices, c.slice_stride, c.slice_edge))
            if arr.ndim == 4:  # colour slices: channels of the one slice
                if c.slices != 1:
                    raise ValueError(f"{entry.describe(pos)}: colour volumes cannot be stacked (data.slices=1)")
                image = array_to_chw(arr[0])
            else:
                image = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        meta = {**entry.meta, "position": int(pos)}
        return Sample(image=image, path=entry.describe(pos), region=entry.region(pos), meta=meta)


def _slice_mapping(cfg: DataConfig) -> ValueMapping | None:
    from medfoundry.data.image_folder import configured_mapping

    return configured_mapping(cfg)


# ---------------------------------------------------------------- DICOM series by modality and units


class UnusableSeriesError(UserError, ValueError):
    """Every DICOM series under ``data.root`` was left out by ``data.modalities`` or the HU-units rule."""


def series_problem(modality: str, units: str, cfg: DataConfig) -> str | None:
    """Why a DICOM series of ``modality`` whose values are in ``units`` is left out under ``cfg``, or None.

    ``data.modalities`` (when not empty) keeps the listed Modality tags only; with ``data.intensity=window``
    a series must be in Hounsfield units (``units == "HU"``: CT, or a ``RescaleType`` of HU).
    """
    shown = modality or "(no Modality tag)"
    wanted = [m.upper() for m in cfg.modalities]
    if wanted and modality.upper() not in wanted:
        return f"modality {shown} is not in data.modalities={list(cfg.modalities)}"
    if cfg.intensity == "window" and units != "HU":
        return (f"modality {shown} with values in '{units}' units, not Hounsfield units (not CT, no RescaleType HU): "
                "data.intensity=window would apply HU windows to them")
    return None


@dataclass
class SeriesSelection:
    """The DICOM series kept and left out by :func:`series_problem`, and what was found (for the messages)."""

    root: str
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (series folder/file, reason)
    found: dict[str, int] = field(default_factory=dict)  # modality -> number of series
    units: dict[str, set] = field(default_factory=dict)  # modality -> units of its series

    def keep(self, name: str, modality: str, units: str, cfg: DataConfig) -> bool:
        """Record one series; True when it is used."""
        key = modality or "(none)"
        self.found[key] = self.found.get(key, 0) + 1
        self.units.setdefault(key, set()).add(units)
        problem = series_problem(modality, units, cfg)
        if problem is not None:
            self.excluded.append((name, problem))
        return problem is None

    def log(self, shown: int = 3) -> None:
        """One warning per reason: how many series were left out, the first paths."""
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.excluded:
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            log.warning("data: left out %d DICOM series under %s: %s (%s%s)", len(names), self.root, reason,
                        ", ".join(names[:shown]), more)

    def nothing_left_message(self, cfg: DataConfig) -> str:
        """The one-line error when no series is left: data.root, the modalities found and the fix."""
        found = ", ".join(f"{m} ({n} series, units {'/'.join(sorted(self.units.get(m, ())))})"
                          for m, n in sorted(self.found.items()))
        wanted = {m.upper() for m in cfg.modalities}
        if wanted and not any(m.upper() in wanted for m in self.found):
            why = f"none of its series has a modality in data.modalities={list(cfg.modalities)}"
            fix = f"set data.modalities to the modalities to train on (found: {sorted(self.found)}) or [] for all"
        else:
            why = "none of its series is in Hounsfield units, so data.intensity=window cannot be applied"
            fix = ("set data.modalities=[CT] if the folder is meant to give CT, or data.intensity=range with "
                   "data.value_range=[low, high] for non-CT values")
        return f"data.root '{cfg.root}' (kind {cfg.kind}): {why}; modalities found: {found}; {fix}"


def _select_dicom(entries: Sequence[DicomEntry], cfg: DataConfig) -> tuple[list[DicomEntry], SeriesSelection]:
    """The series entries :func:`series_problem` keeps, and the selection record."""
    selection = SeriesSelection(cfg.root)
    kept = [e for e in entries
            if selection.keep(e.describe(None), str(e.series.meta.get("modality", "")), e.series.units, cfg)]
    return kept, selection


def _collect(build: Callable[[str], Any], paths: Sequence[str]) -> tuple[list, list]:
    entries, skipped = [], []
    for path in paths:
        try:
            entries.append(build(path))
        except (ReaderError, OSError, ValueError) as err:
            skipped.append((path, str(err)))
    return entries, skipped


def _files(root: str, test: Callable[[str], bool]) -> list[str]:
    p = Path(root)
    if not p.exists():
        raise FileNotFoundError(f"data.root '{root}' does not exist")
    if p.is_file():
        return [str(p)]
    return [str(f) for f in sorted(p.rglob("*")) if f.is_file() and test(str(f))]


@register_source("dicom")
def build_dicom(cfg: DataConfig) -> EntrySource:
    """``data.kind=dicom``: every DICOM series under ``data.root`` (or the one file given)."""
    root = Path(cfg.root)
    if not root.exists():
        raise FileNotFoundError(f"data.root '{root}' does not exist")
    if root.is_file():
        series, skipped = [DicomSeries(read_header(root))], []
    else:
        series, skipped = find_series(root)
    kept, selection = _select_dicom([DicomEntry(s) for s in series], cfg)
    return EntrySource(kept, cfg, skipped, selection)


@register_source("nifti")
def build_nifti(cfg: DataConfig) -> EntrySource:
    """``data.kind=nifti``: every volume file under ``data.root``: NIfTI (``.nii``, ``.nii.gz``), NRRD, and the
    files of any other registered reader of kind ``volume``."""
    files = _files(cfg.root, lambda f: reader_for(f, kinds=("volume",)) is not None)
    entries, skipped = _collect(lambda f: LoadedVolumeEntry(f, cfg.volume_cache), files)
    return EntrySource(entries, cfg, skipped)


@register_source("slices")
def build_slices(cfg: DataConfig) -> EntrySource:
    """``data.kind=slices``: PNG/TIFF slices with a value mapping; each folder's files (name order) form a volume."""
    mapping = _slice_mapping(cfg)
    files = list_files(cfg.root, cfg.extensions) if Path(cfg.root).is_dir() else [Path(cfg.root)]
    folders: dict[str, list[str]] = {}
    for f in files:
        folders.setdefault(str(f.parent), []).append(str(f))
    entries = [SliceFilesEntry(sorted(fs), mapping, meta={"series_id": d}) for d, fs in sorted(folders.items())]
    return EntrySource(entries, cfg)


class HDF5Source:
    """``data.kind=hdf5``: the rows of one HDF5 dataset (e.g. CheXzero's ``cxr``), with aligned reports."""

    def __init__(self, cfg: DataConfig) -> None:
        self.images = HDF5Images(cfg.root, cfg.hdf5_dataset)
        self.reports: list[str] | None = None
        if cfg.hdf5_reports:
            import pandas as pd

            table = pd.read_csv(cfg.hdf5_reports)
            if cfg.text_column not in table.columns:
                raise ValueError(
                    f"data.hdf5_reports '{cfg.hdf5_reports}' has no column '{cfg.text_column}' "
                    f"(data.text_column); columns: {list(table.columns)}"
                )
            if len(table) != len(self.images):
                raise ValueError(
                    f"data.hdf5_reports has {len(table)} rows but '{cfg.root}' holds {len(self.images)} images"
                )
            self.reports = table[cfg.text_column].fillna("").astype(str).tolist()

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return f"{self.images.path}[{self.images.dataset}][{index}]"

    def __getitem__(self, index: int) -> Sample:
        image = array_to_chw(self.images.read(index))
        meta: dict[str, Any] = {"position": int(index)}
        if self.reports is not None:
            meta["report"] = self.reports[index]
        return Sample(image=image, path=self.describe(index), meta=meta)


@register_source("hdf5")
def build_hdf5(cfg: DataConfig) -> HDF5Source:
    """``data.kind=hdf5``: images in ``data.hdf5_dataset`` of the file ``data.root``."""
    if not has_suffix(cfg.root, HDF5_SUFFIXES) and not Path(cfg.root).is_file():
        raise FileNotFoundError(f"data.root '{cfg.root}' is not an HDF5 file")
    return HDF5Source(cfg)


@register_source("wsi")
def build_wsi(cfg: DataConfig) -> EntrySource:
    """``data.kind=wsi``: tissue tiles (``data.tile_size`` px at ``data.tile_mpp``) of the slides in ``data.root``."""
    files = _files(cfg.root, lambda f: Path(f).suffix.lower() in VENDOR_SUFFIXES + (".tif", ".tiff"))
    entries, skipped = _collect(lambda f: SlideEntry(f, cfg), files)
    return EntrySource(entries, cfg, skipped)


def _row_meta(row: dict) -> dict:
    keys = ("patient_id", "series_id", "split", "label", "report")
    return {k: (v if isinstance(v, (int, float)) else str(v)) for k, v in row.items() if k in keys}


@dataclass
class _Row:
    """A manifest row: its image path, the sample metadata, its mask file and all its fields."""

    path: str
    meta: dict = field(default_factory=dict)
    mask: str | None = None
    fields: dict = field(default_factory=dict)

    @staticmethod
    def of(row: dict) -> _Row:
        return _Row(str(row["path"]), _row_meta(row), str(row["mask"]) if row.get("mask") else None, row)

    def box(self) -> tuple[int, int, int, int] | None:
        """The (y0, x0, y1, x1) label box given in the row's columns, if any."""
        keys = ("y0", "x0", "y1", "x1")
        if all(self.fields.get(k) is not None for k in keys):
            return tuple(int(self.fields[k]) for k in keys)  # type: ignore[return-value]
        return None


def _series_entry(reader: Reader, row: _Row, cfg: DataConfig, mapping: ValueMapping | None) -> DicomEntry:
    """A DICOM file, or a folder holding exactly one series."""
    if Path(row.path).is_file():
        series = DicomSeries(read_header(row.path))
    else:
        found, errors = find_series(row.path)
        if len(found) != 1:
            raise ReaderError(f"{row.path}: {len(found)} DICOM series here (need exactly one per row); {errors[:1]}")
        series = found[0]
    regions = regions_of_mask(read_array_volume(row.mask).array > 0) if row.mask else None
    return DicomEntry(series, row.meta, regions)


def _volume_entry(reader: Reader, row: _Row, cfg: DataConfig, mapping: ValueMapping | None) -> LoadedVolumeEntry:
    """A volume file, decoded whole when first sampled."""
    return LoadedVolumeEntry(row.path, cfg.volume_cache, row.meta, row.mask, reader)


def _slice_entry(reader: Reader, row: _Row, cfg: DataConfig, mapping: ValueMapping | None) -> SliceFilesEntry:
    """A single slice, its label box from a mask picture or the row's y0/x0/y1/x1."""
    if row.mask:
        stored = read_stored(row.mask)[0]  # a mask needs no value mapping: non-zero is inside
        region = region_from_mask((stored.max(axis=-1) if stored.ndim == 3 else stored) > 0)
    else:
        region = row.box()
    return SliceFilesEntry([row.path], mapping, require_mapping=False, meta=row.meta, region=region,
                           unmapped_16bit=cfg.unmapped_16bit)


def _slide_entry(reader: Reader, row: _Row, cfg: DataConfig, mapping: ValueMapping | None) -> SlideEntry:
    """The tissue tiles of a slide."""
    return SlideEntry(row.path, cfg, row.meta)


# How a manifest row becomes an entry, by the kind of the reader that claims its path.
_ENTRY_BUILDERS: dict[str, Callable[[Reader, _Row, DataConfig, ValueMapping | None], Any]] = {
    "series": _series_entry,
    "volume": _volume_entry,
    "slice": _slice_entry,
    "slide": _slide_entry,
}


def _manifest_entry(row: dict, cfg: DataConfig, mapping: ValueMapping | None):
    item = _Row.of(row)
    reader = reader_for(item.path)
    build = _ENTRY_BUILDERS.get(reader.kind) if reader is not None else None
    if build is None:
        raise ReaderError(f"{item.path}: not a recognised image ({reader_labels(kinds=tuple(_ENTRY_BUILDERS))})")
    return build(reader, item, cfg, mapping)


@register_source("manifest")
def build_manifest(cfg: DataConfig) -> EntrySource:
    """``data.kind=manifest``: the rows of split ``data.split`` of a CSV/Parquet manifest (see :mod:`.manifest`)."""
    from medfoundry.data.manifest import read_manifest, rows_as_dicts, select_split

    df = select_split(read_manifest(cfg.root, cfg.text_column), cfg.split)
    mapping = _slice_mapping(cfg)
    rows = rows_as_dicts(df, list(df.columns))
    entries, skipped = [], []
    for row in rows:
        try:
            entries.append(_manifest_entry(row, cfg, mapping))
        except (ReaderError, OSError, ValueError) as err:
            skipped.append((str(row["path"]), str(err)))
    dicom, selection = _select_dicom([e for e in entries if isinstance(e, DicomEntry)], cfg)
    kept = set(map(id, dicom))
    entries = [e for e in entries if not isinstance(e, DicomEntry) or id(e) in kept]
    return EntrySource(entries, cfg, skipped, selection if selection.found else None)


@register_source("prepared")
def build_prepared(cfg: DataConfig) -> EntrySource:
    """``data.kind=prepared``: the output folder of ``medfoundry prepare`` (its ``manifest.csv``)."""
    from medfoundry.data.manifest import read_manifest, rows_as_dicts, select_split

    manifest = Path(cfg.root) / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"data.root '{cfg.root}' has no manifest.csv; run `medfoundry prepare SRC --out {cfg.root}` first"
        )
    df = select_split(read_manifest(manifest, cfg.text_column), cfg.split)
    entries = []
    selection = SeriesSelection(cfg.root)
    for row in rows_as_dicts(df, list(df.columns)):
        meta = _row_meta(row)
        if row["kind"] == "tiles":
            entries.append(PreparedTilesEntry(row["path"], int(row["depth"]), str(row.get("source", "")), meta))
            continue
        regions = str(Path(cfg.root) / row["regions"]) if row.get("regions") else None
        units, modality = _text(row.get("units")), _text(row.get("modality"))
        entry = PreparedVolumeEntry(row["path"], int(row["depth"]), float(row["slope"]), float(row["intercept"]),
                                    str(row.get("source", "")), regions, meta, units, modality)
        # items made from DICOM carry its Modality tag; only they are selected by modality and units
        if not modality or selection.keep(entry.describe(None), modality, units, cfg):
            entries.append(entry)
    return EntrySource(entries, cfg, (), selection if selection.found else None)


def _text(value: Any) -> str:
    """A manifest cell as text ("" for empty / NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


__all__ = ["EntrySource", "HDF5Source", "SeriesSelection", "UnusableSeriesError", "series_problem"]
