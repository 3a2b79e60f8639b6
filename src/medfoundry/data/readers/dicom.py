"""DICOM with pydicom: series sorted by slice position, modality LUT to Hounsfield units, multi-frame files.

* Slices of a series are ordered by the projection of ``ImagePositionPatient`` on the slice normal
  (the cross product of the two ``ImageOrientationPatient`` direction cosines), whatever the order of
  the files on disk; without positions, by ``InstanceNumber``, then by file name.
* Each slice's own ``RescaleSlope``/``RescaleIntercept`` is applied (they may differ per slice, and
  per frame in enhanced multi-frame files), so CT values come out in Hounsfield units.
* ``MONOCHROME1`` images (many radiographs) are inverted so that larger values are brighter, like
  ``MONOCHROME2``.
* Compressed pixel data whose decoder is missing raise :class:`MissingDecoderError` naming the file,
  the transfer syntax and the package that adds the decoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.data.readers.base import MissingDecoderError, ReaderError, Volume
from medfoundry.data.readers.interface import Reader

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}

# Transfer syntax UID -> the pip packages that give pydicom a decoder for it.
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE lossless
}


def is_dicom_file(path: str | Path) -> bool:
    """True for a file with a DICOM suffix or the ``DICM`` marker after the 128-byte preamble."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


@dataclass
class DicomSlice:
    """Header facts of one 2-D image: a single-frame file or one frame of a multi-frame file."""

    path: str
    frame: int | None  # frame index in a multi-frame file, None for a single-frame file
    rows: int
    cols: int
    samples: int  # samples per pixel (1 grey, 3 colour)
    position: tuple[float, float, float] | None  # ImagePositionPatient (mm, LPS)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row cosines, column cosines
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    thickness: float | None  # SpacingBetweenSlices or SliceThickness, mm
    instance: int  # InstanceNumber (0 when absent)
    slope: float  # RescaleSlope
    intercept: float  # RescaleIntercept
    series_uid: str
    meta: dict[str, Any] = field(default_factory=dict)  # modality, patient id, photometric ...


def _float_list(value: Any) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _functional(ds: Any, frame: int, sequence: str, attr: str) -> Any:
    """``attr`` from the per-frame functional group ``frame``, else from the shared group."""
    for group_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(group_name)
        if not groups or len(groups) <= index:
            continue
        seq = groups[index].get(sequence)
        if seq and attr in seq[0]:
            return seq[0].get(attr)
    return None


def read_header(path: str | Path) -> list[DicomSlice]:
    """The 2-D images a DICOM file holds (one per frame), from its header only.

    Raises :class:`ReaderError` for files that are corrupt or hold no image (e.g. a report or DICOMDIR).
    """
    import pydicom

    path = str(path)
    try:
        with warnings.catch_warnings():  # corrupt files make pydicom warn about every odd value
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as err:  # pydicom raises many types on corrupt input
        raise ReaderError(f"{path}: corrupt or unreadable DICOM ({type(err).__name__}: {err})") from err
    if "Rows" not in ds or "Columns" not in ds:
        sop = ds.get("SOPClassUID")
        what = f"SOP class {sop.name}" if sop is not None else "no DICOM image header"
        raise ReaderError(f"{path}: corrupt or not a DICOM image ({what}; no Rows/Columns)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as err:
        raise ReaderError(f"{path}: corrupt DICOM header ({err})") from err
    if rows < 1 or cols < 1 or frames < 1:
        raise ReaderError(f"{path}: wrong image dimensions (rows={rows}, columns={cols}, frames={frames})")
    transfer = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    meta = {
        "modality": str(ds.get("Modality", "") or ""),
        "patient_id": str(ds.get("PatientID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "photometric": str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2"),
        "bits_stored": int(ds.get("BitsStored", 16) or 16),
        "signed": int(ds.get("PixelRepresentation", 0) or 0) == 1,
        "rescale_type": str(ds.get("RescaleType", "") or ""),
        "transfer_syntax": str(transfer or ""),
        "sop_uid": str(ds.get("SOPInstanceUID", "") or ""),
    }
    series_uid = str(ds.get("SeriesInstanceUID", "") or "") or f"folder:{Path(path).parent}"
    thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    base = dict(
        path=path,
        rows=rows,
        cols=cols,
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        orientation=_float_list(ds.get("ImageOrientationPatient")),
        pixel_spacing=_float_list(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")),
        thickness=float(thickness) if thickness else None,
        instance=int(ds.get("InstanceNumber") or 0),
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        series_uid=series_uid,
        meta=meta,
    )
    position = _float_list(ds.get("ImagePositionPatient"))
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [DicomSlice(frame=None, position=_as3(position), **_tuples(base))]
    out = []
    for f in range(frames):
        item = dict(base)
        pos = _float_list(_functional(ds, f, "PlanePositionSequence", "ImagePositionPatient"))
        ori = _float_list(_functional(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"))
        spacing = _float_list(_functional(ds, f, "PixelMeasuresSequence", "PixelSpacing"))
        thick = _functional(ds, f, "PixelMeasuresSequence", "SpacingBetweenSlices") or _functional(
            ds, f, "PixelMeasuresSequence", "SliceThickness"
        )
        slope = _functional(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        item["orientation"] = ori or item["orientation"]
        item["pixel_spacing"] = spacing or item["pixel_spacing"]
        item["thickness"] = float(thick) if thick else item["thickness"]
        item["slope"] = float(slope) if slope is not None else item["slope"]
        item["intercept"] = float(intercept) if intercept is not None else item["intercept"]
        out.append(DicomSlice(frame=f, position=_as3(pos or (position if f == 0 else None)), **_tuples(item)))
    return out


def _as3(values: list[float] | None) -> tuple[float, float, float] | None:
    return (values[0], values[1], values[2]) if values and len(values) == 3 else None


def _tuples(item: dict) -> dict:
    out = dict(item)
    for key in ("orientation", "pixel_spacing"):
        value = out.get(key)
        out[key] = tuple(value) if value else None
    if out["orientation"] is not None and len(out["orientation"]) != 6:
        out["orientation"] = None
    if out["pixel_spacing"] is not None and len(out["pixel_spacing"]) != 2:
        out["pixel_spacing"] = None
    return out


def missing_decoder_message(path: str, transfer_syntax: str, err: BaseException) -> str:
    """The message for pixel data that no installed plugin can decode: file, syntax and the pip fix."""
    from pydicom.uid import UID

    name = UID(transfer_syntax).name if transfer_syntax else "unknown"
    packages = _DECODER_PACKAGES.get(transfer_syntax)
    if packages:
        fix = f"install a decoder: pip install {packages}"
    else:
        fix = (
            "pydicom has no decoder for it; decompress the files first, e.g. with dcmtk "
            "(`dcmdjpeg`/`dcmdrle`) or gdcm (`gdcmconv --raw`)"
        )
    return (
        f"{path}: pixel data use transfer syntax '{name}' ({transfer_syntax}) with no decoder installed; "
        f"{fix}. ({err})"
    )


def decode_pixels(path: str, frame: int | None = None, transfer_syntax: str = "") -> np.ndarray:
    """Stored pixel values of one file (all frames) or one frame, with decoder errors made explicit."""
    import pydicom
    from pydicom.pixels import pixel_array

    try:
        if frame is None:
            ds = pydicom.dcmread(path, force=True)
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                raise ReaderError(f"{path}: DICOM file holds no pixel data")
            return np.asarray(ds.pixel_array)
        return np.asarray(pixel_array(path, index=frame))
    except ReaderError:
        raise
    except (RuntimeError, NotImplementedError) as err:
        text = str(err)
        if "missing dependencies" in text or "is not supported" in text or "no pixel data decoders" in text:
            raise MissingDecoderError(missing_decoder_message(path, transfer_syntax, err)) from err
        raise ReaderError(f"{path}: cannot decode pixel data ({type(err).__name__}: {err})") from err
    except Exception as err:
        raise ReaderError(f"{path}: corrupt pixel data ({type(err).__name__}: {err})") from err


def _to_units(stored: np.ndarray, info: DicomSlice, invert_monochrome1: bool) -> np.ndarray:
    arr = stored.astype(np.float32)
    if invert_monochrome1 and info.meta.get("photometric") == "MONOCHROME1":
        if info.meta.get("signed"):
            arr = -arr
        else:
            arr = float(2 ** int(info.meta.get("bits_stored", 16)) - 1) - arr
    if info.slope != 1.0 or info.intercept != 0.0:
        arr = arr * np.float32(info.slope) + np.float32(info.intercept)
    return arr


def scan_dicom_files(
    paths: Iterable[str | Path],
) -> tuple[dict[str, list[DicomSlice]], list[tuple[str, str]]]:
    """Group the images of many DICOM files by series; returns ``(series_uid -> slices, [(path, reason)])``."""
    series: dict[str, list[DicomSlice]] = {}
    errors: list[tuple[str, str]] = []
    for path in paths:
        try:
            slices = read_header(path)
        except ReaderError as err:
            errors.append((str(path), str(err)))
            continue
        for s in slices:
            series.setdefault(s.series_uid, []).append(s)
    return series, errors


class DicomSeries:
    """One series, slices sorted along the slice normal; reads any subset of slices in HU.

    Args:
        slices: the images of the series (any order), e.g. from :func:`scan_dicom_files`.
        invert_monochrome1: invert ``MONOCHROME1`` images so that larger is brighter.
    """

    def __init__(self, slices: Sequence[DicomSlice], invert_monochrome1: bool = True) -> None:
        if not slices:
            raise ReaderError("empty DICOM series")
        self.invert_monochrome1 = invert_monochrome1
        first = slices[0]
        sizes = sorted({(s.rows, s.cols, s.samples) for s in slices})
        if len(sizes) > 1:
            where = Path(first.path).parent
            raise ReaderError(
                f"{where}: series {first.series_uid} has slices of different sizes {sizes}; "
                "cannot stack them into one volume"
            )
        unique: dict[tuple, DicomSlice] = {}
        for s in sorted(slices, key=lambda s: (s.path, s.frame or 0)):  # one copy of an instance stored twice
            key = (s.meta.get("sop_uid") or s.path, s.frame)
            unique.setdefault(key, s)
        self.slices = self._sort(list(unique.values()))
        self.uid = first.series_uid
        self.meta = {k: v for k, v in first.meta.items() if k != "sop_uid"}
        self.meta["series_uid"] = self.uid
        self.meta["duplicates_dropped"] = len(slices) - len(unique)
        self._geometry()

    @staticmethod
    def _sort(slices: list[DicomSlice]) -> list[DicomSlice]:
        ori = slices[0].orientation
        if ori is not None and all(s.position is not None for s in slices):
            normal = np.cross(np.array(ori[:3]), np.array(ori[3:]))
            return sorted(slices, key=lambda s: (float(np.dot(s.position, normal)), s.instance, s.path, s.frame or 0))
        return sorted(slices, key=lambda s: (s.instance, s.path, s.frame or 0))

    def _geometry(self) -> None:
        first = self.slices[0]
        row_spacing, col_spacing = first.pixel_spacing or (1.0, 1.0)
        ori = first.orientation or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        row_cos, col_cos = np.array(ori[:3]), np.array(ori[3:])
        normal = np.cross(row_cos, col_cos)
        positions = [s.position for s in self.slices]
        z_spacing = first.thickness or 1.0
        step = normal * z_spacing
        self.meta["irregular_spacing"] = False
        if len(self.slices) > 1 and all(p is not None for p in positions):
            pos = np.array(positions, dtype=float)
            d = np.diff(pos @ normal)
            positive = d[d > 1e-6]
            if len(positive):
                z_spacing = float(np.median(positive))
                step = (pos[-1] - pos[0]) / (len(pos) - 1)
                if np.linalg.norm(step) < 1e-6:
                    step = normal * z_spacing
                self.meta["irregular_spacing"] = bool(
                    len(positive) != len(d) or np.max(np.abs(positive - z_spacing)) > 0.1 * z_spacing
                )
        affine = np.eye(4)
        affine[:3, 0] = row_cos * col_spacing
        affine[:3, 1] = col_cos * row_spacing
        affine[:3, 2] = step
        affine[:3, 3] = np.array(positions[0]) if positions[0] is not None else 0.0
        self.affine = affine
        self.spacing = (float(z_spacing), float(row_spacing), float(col_spacing))
        modality = self.meta.get("modality", "")
        rescaled = any(s.slope != 1.0 or s.intercept != 0.0 for s in self.slices)
        if modality == "CT" or self.meta.get("rescale_type", "").upper() == "HU":
            self.units = "HU"
        else:
            self.units = "rescaled" if rescaled else "stored"

    @property
    def depth(self) -> int:
        """Number of slices."""
        return len(self.slices)

    @property
    def shape(self) -> tuple[int, ...]:
        """(Z, Y, X) or (Z, Y, X, C) for colour."""
        s = self.slices[0]
        return (self.depth, s.rows, s.cols) + ((s.samples,) if s.samples > 1 else ())

    def describe(self, z: int) -> str:
        """File (and frame) of slice ``z``."""
        s = self.slices[z]
        return s.path if s.frame is None else f"{s.path}[frame {s.frame}]"

    def read_slice(self, z: int) -> np.ndarray:
        """Slice ``z`` as float32 (Y, X) (or (Y, X, C)) in :attr:`units`."""
        info = self.slices[z]
        stored = decode_pixels(info.path, info.frame, info.meta.get("transfer_syntax", ""))
        expected = (info.rows, info.cols) + ((info.samples,) if info.samples > 1 else ())
        if stored.shape != expected:
            raise ReaderError(f"{self.describe(z)}: decoded shape {stored.shape} != header {expected}")
        return _to_units(stored, info, self.invert_monochrome1)

    def read(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """Slices ``indices`` (all by default) stacked as float32 (n, Y, X)."""
        indices = range(self.depth) if indices is None else indices
        if indices and self._single_multiframe() and len(indices) > 1:
            return self._read_multiframe(indices)
        return np.stack([self.read_slice(z) for z in indices])

    def _single_multiframe(self) -> bool:
        return all(s.frame is not None for s in self.slices) and len({s.path for s in self.slices}) == 1

    def _read_multiframe(self, indices: Sequence[int]) -> np.ndarray:
        info0 = self.slices[0]
        stored = decode_pixels(info0.path, None, info0.meta.get("transfer_syntax", ""))
        if stored.ndim == 2 or (info0.samples > 1 and stored.ndim == 3):
            stored = stored[None]
        return np.stack([_to_units(stored[self.slices[z].frame], self.slices[z], self.invert_monochrome1)
                         for z in indices])

    def volume(self) -> Volume:
        """The whole series as a :class:`Volume`."""
        meta = dict(self.meta)
        meta["files"] = len({s.path for s in self.slices})
        return Volume(
            array=self.read(),
            spacing=self.spacing,
            affine=self.affine.copy(),
            units=self.units,
            path=str(Path(self.slices[0].path).parent),
            meta=meta,
        )


def list_dicom_files(folder: str | Path) -> list[Path]:
    """Files under ``folder`` (recursive, sorted) that look like DICOM."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_dicom_file(p))


def find_series(folder: str | Path) -> tuple[list[DicomSeries], list[tuple[str, str]]]:
    """Every series under ``folder`` and the files that could not be used, with reasons."""
    groups, errors = scan_dicom_files(list_dicom_files(folder))
    series = []
    for uid in sorted(groups):
        try:
            series.append(DicomSeries(groups[uid]))
        except ReaderError as err:
            errors.extend((s.path, str(err)) for s in groups[uid])
    return series, errors


def read_dicom(path: str | Path, series_uid: str | None = None) -> Volume:
    """A DICOM file (single- or multi-frame) or a folder holding one series (or pick ``series_uid``)."""
    path = Path(path)
    if not path.exists():
        raise ReaderError(f"{path}: no such file or folder")
    if path.is_file():
        return DicomSeries(read_header(path)).volume()
    files = list_dicom_files(path)
    if not files:
        raise ReaderError(f"{path}: no DICOM files in this folder")
    groups, errors = scan_dicom_files(files)
    if not groups:
        raise ReaderError(f"{path}: no readable DICOM image; first problem: {errors[0][1]}")
    if series_uid is None:
        if len(groups) > 1:
            raise ReaderError(
                f"{path}: holds {len(groups)} series {sorted(groups)}; pass series_uid= to pick one "
                "(or prepare the folder with `medfoundry prepare`, which takes each series)"
            )
        series_uid = next(iter(groups))
    if series_uid not in groups:
        raise ReaderError(f"{path}: series {series_uid} not found; series here: {sorted(groups)}")
    return DicomSeries(groups[series_uid]).volume()


class DicomReader(Reader):
    """DICOM files (suffix or the ``DICM`` marker) and folders holding them, grouped into series."""

    name = "dicom"
    label = "DICOM"
    kind = "series"
    returns = Volume
    suffixes = tuple(sorted(DICOM_SUFFIXES))

    def can_read(self, path: str | Path) -> bool:
        """A DICOM file, or a folder with at least one DICOM file somewhere below it."""
        path = Path(path)
        if path.is_dir():
            return any(p.is_file() and is_dicom_file(p) for p in path.rglob("*"))
        return is_dicom_file(path)

    def read(self, path: str | Path, series_uid: str | None = None, **options: Any) -> Volume:
        return read_dicom(path, series_uid=series_uid)


DICOM_READER = DicomReader()
