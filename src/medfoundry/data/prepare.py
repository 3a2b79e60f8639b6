"""``medfoundry prepare``: raw DICOM/NIfTI/NRRD/PNG/TIFF/whole-slide data -> a fast training folder.

Output folder ``OUT``::

    OUT/manifest.csv            one row per item: path, kind, depth, value mapping, spacing, patient, split ...
    OUT/items/<id>.npy          volume (Z, Y, X) (int16 HU for CT) or tiles (N, S, S, 3) uint8, memory-mappable
    OUT/items/<id>.json         the item's finished-record (written last: its presence means "done")
    OUT/items/<id>.coords.npy   level-0 (x, y) of each tile (slides)
    OUT/items/<id>.regions.npy  per-slice label boxes (y0, x0, y1, x1), -1 = none (when a mask was given)
    OUT/report.json, report.txt what was written, what was already done, what was skipped and why

Each item's data are written to a temporary file and renamed into place, and its record is written
after that, so a run killed at any moment leaves only complete items (and stray ``*.tmp`` files,
removed by the next run). Re-running skips items whose record exists and whose source files are
unchanged (same names, sizes and modification times, same tile options); ``force=True`` redoes them.
Anything unreadable (corrupt file, wrong dimensions, NaN or infinite pixels, non-image file,
unreadable slide, a 16-bit slice without a recorded value mapping unless ``unmapped_16bit="full_range"``, ...)
is skipped and listed with its reason; the run still finishes and writes the good
items. What is converted with a caveat is listed as a note (a 4-D NIfTI file: only its first frame is
kept, and the note says how many frames were dropped).

Each file goes the way of the kind of the reader that claims it (:mod:`medfoundry.data.readers.registry`):
series files are grouped into series, volume files, slices and slides are one item each, and kinds without a
converter here (HDF5 image arrays) are listed as skipped. ``SRC`` is a folder (searched recursively), a
single file, or a CSV/Parquet manifest whose rows name the files (their ``patient_id``, ``split``,
``label``, ``report`` and ``mask`` columns are kept). Splits are assigned per patient (stable hash, see
:mod:`medfoundry.data.manifest`) each time the manifest is written, so changing ``--split``/``--seed``
needs no reconversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.data.entries import read_array_volume, regions_of_mask
from medfoundry.data.manifest import DEFAULT_SPLITS, check_patient_splits, read_manifest, split_of, write_table
from medfoundry.data.readers import Reader, ReaderError, get_reader, reader_for
from medfoundry.data.readers.base import Volume, check_finite
from medfoundry.data.readers.dicom import DicomSeries, DicomSlice, list_dicom_files, scan_dicom_files
from medfoundry.data.readers.slices import UnmappedImageError, read_stored, unmapped_message

MANIFEST_COLUMNS = [
    "item_id", "path", "kind", "source", "patient_id", "series_id", "split", "depth", "height", "width",
    "channels", "dtype", "slope", "intercept", "units", "spacing_z", "spacing_y", "spacing_x", "tile_mpp",
    "slide_mpp", "modality", "label", "report", "regions",
]
_IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass
class PrepareOptions:
    """How items are converted."""

    tile_mpp: float = 0.5  # slide tiles: microns per pixel
    tile_size: int = 224  # slide tiles: side in pixels
    min_tissue: float = 0.25  # slide tiles: smallest tissue fraction (Otsu thumbnail mask)
    max_tiles: int = 0  # slide tiles: keep at most this many per slide, evenly spread (0 = all)
    slide_mpp: float | None = None  # level-0 µm/px for slides without the metadata
    wsi_backend: str = "auto"  # auto | openslide | tifffile
    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))  # patient-level splits
    seed: int = 0  # seed of the split hash
    force: bool = False  # redo finished items
    progress: bool = True  # show progress bars
    unmapped_16bit: str = "refuse"  # >8-bit PNG/TIFF slices without a recorded mapping: refuse, or full_range (/65535)


@dataclass
class Item:
    """One unit of work: a DICOM series, a volume file, a picture or a slide."""

    item_id: str
    fmt: str  # the name of the reader that claimed it: dicom | nifti | nrrd | slice | slide | a registered one
    source: str  # what the report and manifest name (path relative to SRC where possible)
    files: list[str]  # every file it reads (for the fingerprint)
    meta: dict[str, Any] = field(default_factory=dict)  # from a manifest row: patient_id, split, label ...
    dicom: list[DicomSlice] | None = None


@dataclass
class PrepareReport:
    """What a run did."""

    out: Path
    written: list[str] = field(default_factory=list)  # sources converted in this run
    already_done: list[str] = field(default_factory=list)  # sources skipped because they were finished
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of what could not be used
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, note) of what was converted with a caveat
    interrupted: bool = False

    def summary(self) -> str:
        lines = [
            f"prepare: {len(self.written)} written, {len(self.already_done)} already done, "
            f"{len(self.failed)} skipped -> {self.out / 'manifest.csv'}"
            + (" (interrupted: re-run to finish)" if self.interrupted else "")
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.failed]
        lines += [f"  note {path}: {note}" for path, note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------- discovery


def _item_id(key: str, label: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")[-40:] or "item"
    return f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _rel(path: str | Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def discover(src: str | Path) -> tuple[list[Item], list[tuple[str, str]]]:
    """The items under ``src`` and the paths that cannot be items, with reasons."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"source '{src}' does not exist")
    if src.is_file() and src.suffix.lower() in (".csv", ".tsv", ".parquet", ".pq"):
        return _discover_manifest(src)
    root = src if src.is_dir() else src.parent
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    items: list[Item] = []
    failed: list[tuple[str, str]] = []
    series_files: dict[str, list[Path]] = {}  # reader name -> its files, grouped into series below
    for f in files:
        if f.name in _IGNORED_NAMES or f.name.endswith(".tmp"):
            continue
        if f.name.lower().endswith((".png.json", ".tif.json", ".tiff.json")):
            continue  # value-mapping sidecars belong to their slice
        reader = reader_for(f)
        if reader is None:
            failed.append((_rel(f, root), f"not an image file (unrecognised type '{f.suffix or f.name}')"))
        elif reader.kind == "series":
            series_files.setdefault(reader.name, []).append(f)
        elif reader.kind in _CONVERTERS:
            rel = _rel(f, root)
            items.append(Item(_item_id(rel, rel), reader.name, rel, [str(f)]))
        else:
            failed.append((_rel(f, root), _not_converted(reader)))
    for name, paths in series_files.items():
        groups, errors = scan_dicom_files(paths)
        failed += [(_rel(p, root), reason) for p, reason in errors]
        for uid, slices in sorted(groups.items()):
            folder = _rel(Path(slices[0].path).parent, root)
            label = f"{folder}_{slices[0].meta.get('modality', '')}"
            files_ = sorted({s.path for s in slices})
            items.append(Item(_item_id(uid, label), name, f"{folder} (series {uid})", files_, dicom=slices))
    return items, failed


def _not_converted(reader: Reader) -> str:
    """Why prepare leaves the files of ``reader`` (a kind it has no converter for) as they are."""
    return f"{reader.label} image arrays are read directly (data.kind={reader.name}); not converted"


def _discover_manifest(path: Path) -> tuple[list[Item], list[tuple[str, str]]]:
    try:
        df = read_manifest(path)
        check_patient_splits(df)
    except ValueError as err:  # no 'path' column, unknown suffix, unparsable table, a patient in two splits
        raise ReaderError(f"manifest {path}: {err} (a manifest has a 'path' column naming one image file or "
                          "DICOM folder per row; 'split', if given, is the same for all rows of a patient)") from err
    items, failed = [], []
    keep = ("patient_id", "series_id", "split", "label", "report", "mask")
    for rec in df.to_dict("records"):
        p = Path(str(rec["path"]))
        meta = {k: rec[k] for k in keep if k in rec and rec[k] is not None and str(rec[k]) not in ("", "nan")}
        rel = _rel(p, path.parent)
        if not p.exists():
            failed.append((rel, "no such file or folder"))
            continue
        reader = reader_for(p)
        if reader is None or reader.kind not in _CONVERTERS:
            failed.append((rel, f"not an image file or DICOM folder (type '{p.suffix or p.name}')"))
            continue
        files = [str(p)]
        dicom = None
        if reader.kind == "series":
            candidates = [p] if p.is_file() else list_dicom_files(p)
            groups, errors = scan_dicom_files(candidates)
            if len(groups) != 1:
                reason = errors[0][1] if errors and not groups else f"{len(groups)} DICOM series (need exactly one)"
                failed.append((rel, reason))
                continue
            dicom = next(iter(groups.values()))
            files = sorted({s.path for s in dicom})
        items.append(Item(_item_id(rel, rel), reader.name, rel, files, meta, dicom))
    return items, failed


# ---------------------------------------------------------------- conversion


def _fingerprint(item: Item, opts: PrepareOptions) -> str:
    h = hashlib.sha1()
    for f in sorted(item.files):
        st = os.stat(f)
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    if _kind(item) == "slide":
        h.update(f"{opts.tile_mpp}|{opts.tile_size}|{opts.min_tissue}|{opts.max_tiles}|{opts.slide_mpp}".encode())
    if _kind(item) == "slice":  # a slice prepared before unmapped 16-bit files were refused is checked again
        h.update(f"slice|unmapped_16bit={opts.unmapped_16bit}".encode())
    if item.meta.get("mask"):
        st = os.stat(item.meta["mask"])
        h.update(f"mask|{item.meta['mask']}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def encode_volume(array: np.ndarray, units: str) -> tuple[np.ndarray, float, float]:
    """(stored array, slope, intercept): int16 HU for CT, else the smallest lossless integer type, else float32."""
    if units == "HU":
        return np.clip(np.rint(array), -32768, 32767).astype(np.int16), 1.0, 0.0
    if np.all(np.isfinite(array)) and np.array_equal(array, np.rint(array)):
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        for dtype in (np.uint8, np.int16, np.uint16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return array.astype(dtype), 1.0, 0.0
    return array.astype(np.float32), 1.0, 0.0


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def _write_record(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def _kind(item: Item) -> str:
    """The kind of the reader that claimed ``item`` ("" when that reader is no longer registered)."""
    try:
        return get_reader(item.fmt).kind
    except KeyError:
        return ""


def _convert_series(reader: Reader, item: Item, items_dir: Path, opts: PrepareOptions) -> dict:
    """A DICOM series (its slices were found by :func:`discover`) as an int16-HU or lossless integer volume."""
    vol = DicomSeries(item.dicom).volume()
    extra = {"patient_id": vol.meta.get("patient_id", ""), "series_id": vol.meta.get("series_uid", ""),
             "modality": vol.meta.get("modality", "")}
    return _volume_record(item, items_dir, vol, extra)


def _convert_volume(reader: Reader, item: Item, items_dir: Path, opts: PrepareOptions) -> dict:
    """A volume file, decoded whole by its reader."""
    return _volume_record(item, items_dir, reader.read(item.files[0]), {})


def _volume_record(item: Item, items_dir: Path, vol: Volume, extra: dict) -> dict:
    """Encode and write ``vol``; its record (units, spacing, a note on dropped frames, ``extra``)."""
    check_finite(vol.array, item.source)
    note = dropped_frames_note(vol.meta)
    if note:
        extra["note"] = note
    stored, slope, intercept = encode_volume(vol.array, vol.units)
    record = {"units": vol.units, "spacing_z": vol.spacing[0], "spacing_y": vol.spacing[1],
              "spacing_x": vol.spacing[2], **extra}
    return _finish_array(item, items_dir, stored, slope, intercept, record, vol_shape=vol.array.shape)


def dropped_frames_note(meta: dict) -> str:
    """The report note for a 4-D volume of which one frame is kept ("" for a 3-D one)."""
    frames, frame = int(meta.get("frames", 1)), int(meta.get("frame", 0))
    if frames <= 1:
        return ""
    return (f"4-D volume with {frames} frames: kept frame {frame} only, dropped the other {frames - 1} "
            "(to use them, split the file into 3-D volumes first, e.g. nibabel.funcs.four_to_three)")


def _convert_slice(reader: Reader, item: Item, items_dir: Path, opts: PrepareOptions) -> dict:
    """A PNG/TIFF slice kept as stored, with its value mapping as the record's slope and intercept."""
    stored, mapping = read_stored(item.files[0])
    check_finite(stored, item.source)
    if stored.ndim not in (2, 3) or min(stored.shape[:2]) < 2 or (stored.ndim == 3 and stored.shape[2] > 4):
        raise ReaderError(f"{item.source}: wrong dimensions {stored.shape}; expected a 2-D grey or RGB image")
    if stored.ndim == 3 and stored.shape[2] == 4:
        stored = stored[..., :3]
    if mapping is not None:
        slope, intercept, units = mapping.slope, mapping.intercept, mapping.units
    elif stored.dtype == np.uint16 and opts.unmapped_16bit != "full_range":
        raise UnmappedImageError(unmapped_message(item.source, stored.dtype, config_keys=False)
                                 + "; or run prepare with --unmapped-16bit full_range if it stores a [0, 1] picture")
    elif stored.dtype in (np.uint8, np.uint16):
        slope, intercept, units = 1.0 / float(np.iinfo(stored.dtype).max), 0.0, "unit"
    elif np.issubdtype(stored.dtype, np.floating):
        slope, intercept, units = 1.0, 0.0, "stored"
    else:
        raise ReaderError(f"{item.source}: pixel type {stored.dtype} needs a recorded value mapping")
    arr = np.ascontiguousarray(stored[None])
    return _finish_array(item, items_dir, arr, slope, intercept, {"units": units}, vol_shape=arr.shape)


def _finish_array(item: Item, items_dir: Path, stored: np.ndarray, slope: float, intercept: float,
                  record: dict, vol_shape: tuple) -> dict:
    if len(vol_shape) not in (3, 4) or min(vol_shape[:3]) < 1:
        raise ReaderError(f"{item.source}: wrong dimensions {vol_shape}")
    regions = None
    if item.meta.get("mask"):
        regions = _mask_regions(item.meta["mask"], vol_shape, item.source)
        _save_npy(items_dir / f"{item.item_id}.regions.npy", regions)
    _save_npy(items_dir / f"{item.item_id}.npy", stored)
    return {
        **record,
        "kind": "volume",
        "depth": int(vol_shape[0]),
        "height": int(vol_shape[1]),
        "width": int(vol_shape[2]),
        "channels": int(vol_shape[3]) if len(vol_shape) == 4 else 1,
        "dtype": str(stored.dtype),
        "slope": slope,
        "intercept": intercept,
        "regions": f"items/{item.item_id}.regions.npy" if regions is not None else "",
    }


def _mask_regions(mask_path: str, shape: tuple, source: str) -> np.ndarray:
    if reader_for(mask_path, kinds=("volume",)) is not None:
        mask = read_array_volume(mask_path).array
    else:
        mask = read_stored(mask_path)[0][None]
    if mask.shape[:3] != tuple(shape[:3]):
        raise ReaderError(f"{source}: mask {mask_path} has shape {mask.shape}, image {tuple(shape[:3])}")
    return regions_of_mask(mask > 0)


def _convert_slide(reader: Reader, item: Item, items_dir: Path, opts: PrepareOptions) -> dict:
    """The tissue tiles of a slide (opened by its reader) at ``opts.tile_mpp``, as uint8 (N, S, S, 3)."""
    from numpy.lib.format import open_memmap

    with reader.read(item.files[0], backend=opts.wsi_backend, mpp=opts.slide_mpp) as slide:
        coords = slide.tile_grid(opts.tile_size, opts.tile_mpp, opts.min_tissue)
        if opts.max_tiles and len(coords) > opts.max_tiles:
            coords = coords[np.linspace(0, len(coords) - 1, opts.max_tiles).round().astype(int)]
        if len(coords) == 0:
            raise ReaderError(f"{item.source}: no tile with >= {opts.min_tissue:.0%} tissue at {opts.tile_mpp} µm/px")
        final = items_dir / f"{item.item_id}.npy"
        tmp = final.with_name(final.name + ".tmp")
        tiles = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(coords), opts.tile_size, opts.tile_size, 3))
        for i, (x, y) in enumerate(coords):
            tiles[i] = slide.read_tile(float(x), float(y), opts.tile_size, opts.tile_mpp)
        tiles.flush()
        del tiles
        os.replace(tmp, final)
        _save_npy(items_dir / f"{item.item_id}.coords.npy", coords)
        return {"kind": "tiles", "depth": len(coords), "height": opts.tile_size, "width": opts.tile_size,
                "channels": 3, "dtype": "uint8", "slope": 1.0 / 255.0, "intercept": 0.0, "units": "unit",
                "tile_mpp": opts.tile_mpp, "slide_mpp": slide.mpp, "regions": ""}


# How an item is converted, by the kind of the reader that claimed it (kind "images" is not converted).
_CONVERTERS: dict[str, Callable[[Reader, Item, Path, PrepareOptions], dict]] = {
    "series": _convert_series,
    "volume": _convert_volume,
    "slice": _convert_slice,
    "slide": _convert_slide,
}


def convert_item(item: Item, items_dir: Path, opts: PrepareOptions) -> dict:
    """Convert one item and return its record (manifest row) without committing it."""
    convert = _CONVERTERS.get(_kind(item))
    if convert is None:
        raise ReaderError(f"{item.source}: cannot prepare format '{item.fmt}'")
    record = convert(get_reader(item.fmt), item, items_dir, opts)
    record.update({"item_id": item.item_id, "path": f"items/{item.item_id}.npy", "source": item.source})
    for key, value in item.meta.items():
        if key != "mask" and value not in (None, ""):
            record[key] = value
    if not record.get("patient_id"):
        record["patient_id"] = record.get("series_id") or item.source
    return record


# ---------------------------------------------------------------- the run


def _load_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _with_split(record: dict, item: Item, opts: PrepareOptions) -> dict:
    """The record with its split: the manifest's, else the patient's hash split under the current options."""
    split = item.meta.get("split") or split_of(str(record["patient_id"]), opts.fractions, opts.seed)
    return {**record, "split": split}


def prepare(src: str | Path, out: str | Path, options: PrepareOptions | None = None) -> PrepareReport:
    """Convert everything under ``src`` into ``out`` (see module doc); returns what was done."""
    from tqdm import tqdm

    opts = options or PrepareOptions()
    out = Path(out)
    items_dir = out / "items"
    items_dir.mkdir(parents=True, exist_ok=True)
    for stale in items_dir.glob("*.tmp"):  # left by an interrupted run
        stale.unlink(missing_ok=True)
    report = PrepareReport(out=out)
    items, report.failed = discover(src)
    records: dict[str, dict] = {}
    try:
        for item in tqdm(items, desc="prepare", unit="item", disable=not opts.progress):
            record_path = items_dir / f"{item.item_id}.json"
            try:
                fingerprint = _fingerprint(item, opts)
            except OSError as err:
                report.failed.append((item.source, f"cannot read: {err}"))
                continue
            old = _load_record(record_path) if record_path.exists() else None
            if old and not opts.force and old.get("fingerprint") == fingerprint:
                records[item.item_id] = _with_split(old, item, opts)
                report.already_done.append(item.source)
                if old.get("note"):
                    report.notes.append((item.source, old["note"]))
                continue
            try:
                record = convert_item(item, items_dir, opts)
            except (ReaderError, OSError, ValueError, MemoryError) as err:
                report.failed.append((item.source, str(err)))
                continue
            record["fingerprint"] = fingerprint
            _write_record(record_path, record)
            if record.get("note"):
                report.notes.append((item.source, record["note"]))
            records[item.item_id] = _with_split(record, item, opts)
            report.written.append(item.source)
    except KeyboardInterrupt:
        report.interrupted = True
    _write_outputs(out, records, report)
    return report


def _write_outputs(out: Path, records: dict[str, dict], report: PrepareReport) -> None:
    import pandas as pd

    rows = [records[k] for k in sorted(records)]
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS) if rows else pd.DataFrame(columns=MANIFEST_COLUMNS)
    if rows:
        check_patient_splits(df)
    write_table(df, out / "manifest.csv")
    data = {
        "written": report.written,
        "already_done": report.already_done,
        "failed": [{"path": p, "reason": r} for p, r in report.failed],
        "notes": [{"path": p, "note": n} for p, n in report.notes],
        "items": len(rows),
        "interrupted": report.interrupted,
    }
    _write_record(out / "report.json", data)
    tmp = out / "report.txt.tmp"
    tmp.write_text(report.summary() + "\n")
    os.replace(tmp, out / "report.txt")
