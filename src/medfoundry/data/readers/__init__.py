"""Readers: one interface over DICOM, NIfTI/NRRD, PNG/TIFF slices, HDF5 arrays and whole-slide images.

:func:`read_volume` turns any volume-like path (a DICOM series folder or file, a NIfTI/NRRD file, a
PNG/TIFF slice with a recorded value mapping) into a :class:`Volume`: a float32 ``(Z, Y, X)`` array in
its units (Hounsfield units for CT) with spacing, an LPS affine and metadata resolved at load time.
Whole-slide images have their own reader (:func:`open_slide`, tiles at a requested µm/px) and HDF5
image stacks theirs (:class:`HDF5Images`). Readers raise :class:`ReaderError` naming the file and,
where one exists, the fix.
"""

from __future__ import annotations

from pathlib import Path

from medfoundry.data.readers.base import MissingDecoderError, ReaderError, Volume, axis_codes
from medfoundry.data.readers.dicom import DicomSeries, find_series, is_dicom_file, read_dicom
from medfoundry.data.readers.hdf5 import HDF5_SUFFIXES, HDF5Images
from medfoundry.data.readers.nifti import NIFTI_SUFFIXES, NRRD_SUFFIXES, has_suffix, read_nifti, read_nrrd
from medfoundry.data.readers.slices import (
    HU_INT16,
    HU_UINT16,
    SLICE_SUFFIXES,
    MappingMismatchError,
    ValueMapping,
    read_slice,
    read_slice_volume,
    write_slice,
)
from medfoundry.data.readers.wsi import WSI_SUFFIXES, Slide, is_pyramidal_tiff, open_slide

__all__ = [
    "HDF5Images",
    "HU_INT16",
    "HU_UINT16",
    "DicomSeries",
    "MappingMismatchError",
    "MissingDecoderError",
    "ReaderError",
    "Slide",
    "ValueMapping",
    "Volume",
    "axis_codes",
    "detect_format",
    "find_series",
    "is_dicom_file",
    "open_slide",
    "read_dicom",
    "read_nifti",
    "read_nrrd",
    "read_slice",
    "read_volume",
    "write_slice",
]


def detect_format(path: str | Path) -> str | None:
    """``dicom``, ``nifti``, ``nrrd``, ``slide``, ``slice``, ``hdf5`` or None for what a path holds.

    Folders are ``dicom`` when they contain DICOM files. TIFFs are ``slide`` when tiled and
    pyramidal (or SVS/NDPI), else ``slice``. Decided from suffixes and magic bytes, not by decoding.
    """
    path = Path(path)
    if path.is_dir():
        from medfoundry.data.readers.dicom import list_dicom_files

        return "dicom" if list_dicom_files(path) else None
    name = path.name.lower()
    if has_suffix(name, NIFTI_SUFFIXES):
        return "nifti"
    if has_suffix(name, NRRD_SUFFIXES):
        return "nrrd"
    if has_suffix(name, HDF5_SUFFIXES):
        return "hdf5"
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return "slide" if is_pyramidal_tiff(path) else "slice"
    if suffix in WSI_SUFFIXES:
        return "slide"
    if suffix in SLICE_SUFFIXES:
        return "slice"
    if is_dicom_file(path):
        return "dicom"
    return None


def read_volume(path: str | Path, slice_mapping: ValueMapping | None = None, series_uid: str | None = None) -> Volume:
    """Read any volume-like path into a :class:`Volume` (see :func:`detect_format`)."""
    path = Path(path)
    if not path.exists():
        raise ReaderError(f"{path}: no such file or folder")
    fmt = detect_format(path)
    if fmt == "dicom":
        return read_dicom(path, series_uid=series_uid)
    if fmt == "nifti":
        return read_nifti(path)
    if fmt == "nrrd":
        return read_nrrd(path)
    if fmt == "slice":
        return read_slice_volume(path, slice_mapping)
    if fmt in ("slide", "hdf5"):
        raise ReaderError(f"{path}: a {fmt} is not a volume; use open_slide() or HDF5Images")
    raise ReaderError(f"{path}: not a recognised image (DICOM, NIfTI, NRRD, PNG/TIFF slice)")
