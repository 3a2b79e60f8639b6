"""Readers: one interface over DICOM, NIfTI/NRRD, PNG/TIFF slices, HDF5 arrays and whole-slide images.

:func:`read_volume` turns any volume-like path (a DICOM series folder or file, a NIfTI/NRRD file, a
PNG/TIFF slice with a recorded value mapping) into a :class:`Volume`: a float32 ``(Z, Y, X)`` array in
its units (Hounsfield units for CT) with spacing, an LPS affine and metadata resolved at load time.
Whole-slide images have their own reader (:func:`open_slide`, tiles at a requested µm/px) and HDF5
image stacks theirs (:class:`HDF5Images`). Readers raise :class:`ReaderError` naming the file and,
where one exists, the fix.

Each format module exposes a :class:`Reader` object (:mod:`.interface`); :data:`READERS`
(:mod:`.registry`) is the one ordered list of them that :func:`detect_format`, :func:`read_volume`, the
training sources and ``medfoundry prepare`` consult. A new format is one module with a ``Reader`` subclass
plus one :func:`register_reader` call.
"""

from __future__ import annotations

from pathlib import Path

from medfoundry.data.readers.base import MissingDecoderError, ReaderError, Volume, axis_codes
from medfoundry.data.readers.dicom import DicomSeries, find_series, is_dicom_file, read_dicom
from medfoundry.data.readers.hdf5 import HDF5Images
from medfoundry.data.readers.interface import Reader, ReaderKind
from medfoundry.data.readers.nifti import read_nifti, read_nrrd
from medfoundry.data.readers.registry import (
    READERS,
    get_reader,
    reader_for,
    reader_labels,
    register_reader,
    unregister_reader,
)
from medfoundry.data.readers.slices import (
    FULL_RANGE_UINT16,
    HU_INT16,
    HU_UINT16,
    MappingMismatchError,
    UnmappedImageError,
    ValueMapping,
    read_slice,
    write_slice,
    write_stored,
)
from medfoundry.data.readers.wsi import Slide, open_slide

__all__ = [
    "FULL_RANGE_UINT16",
    "HDF5Images",
    "HU_INT16",
    "HU_UINT16",
    "DicomSeries",
    "MappingMismatchError",
    "MissingDecoderError",
    "READERS",
    "Reader",
    "ReaderError",
    "ReaderKind",
    "Slide",
    "UnmappedImageError",
    "ValueMapping",
    "Volume",
    "axis_codes",
    "detect_format",
    "find_series",
    "get_reader",
    "is_dicom_file",
    "open_slide",
    "read_dicom",
    "read_nifti",
    "read_nrrd",
    "read_slice",
    "read_volume",
    "reader_for",
    "reader_labels",
    "register_reader",
    "unregister_reader",
    "write_slice",
    "write_stored",
]


def detect_format(path: str | Path) -> str | None:
    """The name of the first registered reader that can read ``path`` (see :data:`READERS`), or None.

    Built-in answers: ``dicom`` (a DICOM file, or a folder containing DICOM files), ``nifti``, ``nrrd``,
    ``slide`` (a tiled pyramidal TIFF, SVS, NDPI ...), ``slice`` (PNG/JPEG, or a TIFF that is no slide),
    ``hdf5``. Decided from suffixes and magic bytes, not by decoding.
    """
    reader = reader_for(path)
    return reader.name if reader is not None else None


def read_volume(path: str | Path, slice_mapping: ValueMapping | None = None, series_uid: str | None = None) -> Volume:
    """Read any volume-like path into a :class:`Volume` with the reader that claims it (see :func:`detect_format`).

    ``slice_mapping`` is used by slice readers, ``series_uid`` by series readers; the others ignore them.
    """
    path = Path(path)
    if not path.exists():
        raise ReaderError(f"{path}: no such file or folder")
    reader = reader_for(path)
    if reader is None:
        raise ReaderError(f"{path}: not a recognised image ({reader_labels(returns=Volume)})")
    if not issubclass(reader.returns, Volume):
        raise ReaderError(f"{path}: a {reader.name} is not a single image or volume; cut it into tiles first "
                          f"(medfoundry prepare {path} --out TILES/ --tile-mpp 0.5) and pass a tile, or read it "
                          "with data.kind=wsi for training")
    return reader.read(path, slice_mapping=slice_mapping, series_uid=series_uid)
