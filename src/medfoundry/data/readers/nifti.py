"""NIfTI (``.nii``/``.nii.gz``) with nibabel and NRRD (``.nrrd``/``.nhdr``, needs ``pynrrd``).

Volumes are reoriented (axis flips and permutations only, no resampling) so that their voxel axes
run towards the patient's left, posterior and superior (LPS, see :mod:`.base`): an array read from
NIfTI then lies the same way as one read from the equivalent axial DICOM series. The scaling in the
NIfTI header (``scl_slope``/``scl_inter``) is applied; 4-D files give one frame (``frame=``, recorded with
the number of frames in ``Volume.meta`` so that ``medfoundry prepare`` can report the dropped ones). NaN or
infinite voxels raise :class:`ReaderError` (see :func:`.base.check_finite`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.data.readers.base import (
    ReaderError,
    Volume,
    axis_codes,
    check_finite,
    reorient_to_lps,
    spacing_from_affine,
    xyz_to_zyx,
)
from medfoundry.data.readers.interface import Reader

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _finish(data_xyz: np.ndarray, affine_lps: np.ndarray, path: str, meta: dict) -> Volume:
    if data_xyz.ndim != 3:
        raise ReaderError(f"{path}: wrong dimensions {data_xyz.shape}; expected a 3-D volume")
    if min(data_xyz.shape) < 1:
        raise ReaderError(f"{path}: empty volume {data_xyz.shape}")
    check_finite(data_xyz, path)
    meta = dict(meta)
    meta["orientation_on_disk"] = axis_codes(affine_lps)
    data_xyz, affine = reorient_to_lps(data_xyz, affine_lps)
    return Volume(
        array=xyz_to_zyx(data_xyz.astype(np.float32, copy=False)),
        spacing=spacing_from_affine(affine),
        affine=affine,
        units=meta.pop("units", "stored"),
        path=path,
        meta=meta,
    )


def read_nifti(path: str | Path, frame: int = 0) -> Volume:
    """A NIfTI volume in LPS voxel order, values with the header scaling applied (float32).

    A 4-D file gives its frame ``frame``; ``meta["frames"]`` says how many it has.
    """
    import nibabel as nib

    path = str(path)
    try:
        img = nib.load(path)
    except FileNotFoundError as err:
        raise ReaderError(f"{path}: no such file") from err
    except Exception as err:  # nibabel raises many types on corrupt input
        raise ReaderError(f"{path}: corrupt or unreadable NIfTI ({type(err).__name__}: {err})") from err
    shape = img.shape
    if len(shape) not in (3, 4):
        raise ReaderError(f"{path}: wrong dimensions {shape}; expected a 3-D volume (or 4-D with frame=)")
    frames = int(shape[3]) if len(shape) == 4 else 1
    if not 0 <= frame < frames:
        raise ReaderError(f"{path}: frame {frame} requested but the file has {frames} frame(s)")
    try:
        data = np.asarray(img.dataobj[..., frame] if len(shape) == 4 else img.dataobj, dtype=np.float32)
    except Exception as err:  # truncated data block, bad compression ...
        raise ReaderError(f"{path}: corrupt or unreadable NIfTI ({type(err).__name__}: {err})") from err
    meta = {"frames": frames, "frame": frame, "format": "nifti"}
    return _finish(data, _RAS_TO_LPS @ img.affine, path, meta)


def _import_nrrd(path: str | Path):
    """The optional ``pynrrd`` module, or a :class:`ReaderError` saying how to install it."""
    try:
        import nrrd
    except ImportError as err:
        raise ReaderError(f"{path}: reading NRRD needs the pynrrd package: pip install pynrrd") from err
    return nrrd


def read_nrrd(path: str | Path) -> Volume:
    """An NRRD volume (e.g. the pyradiomics CT cases) in LPS voxel order; needs ``pip install pynrrd``."""
    nrrd = _import_nrrd(path)
    path = str(path)
    try:
        data, header = nrrd.read(path)
    except FileNotFoundError as err:
        raise ReaderError(f"{path}: no such file") from err
    except Exception as err:
        raise ReaderError(f"{path}: corrupt or unreadable NRRD ({type(err).__name__}: {err})") from err
    if data.ndim != 3:
        raise ReaderError(f"{path}: wrong dimensions {data.shape}; expected a 3-D volume")
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        affine[:3, :3] = np.asarray(directions, dtype=float).T
    elif header.get("spacings") is not None:
        affine[:3, :3] = np.diag(np.asarray(header["spacings"], dtype=float))
    origin = header.get("space origin")
    if origin is not None:
        affine[:3, 3] = np.asarray(origin, dtype=float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("right-anterior-superior", "ras"):
        affine = _RAS_TO_LPS @ affine
    elif space not in ("left-posterior-superior", "lps"):
        raise ReaderError(f"{path}: NRRD space '{space}' is not supported (need LPS or RAS)")
    return _finish(np.asarray(data, dtype=np.float32), affine, path, {"format": "nrrd"})


def _depth_after_reorientation(path: str, sizes: list[int], affine: np.ndarray) -> int:
    """Slices along z once the voxel axes are put in LPS order (what :func:`_finish` does), from header facts."""
    from nibabel.orientations import io_orientation

    if len(sizes) not in (3, 4):
        raise ReaderError(f"{path}: wrong dimensions {tuple(sizes)}; expected a 3-D volume")
    z_axis = int(np.flatnonzero(io_orientation(affine)[:, 0] == 2)[0])
    return int(sizes[z_axis])


class NiftiReader(Reader):
    """``.nii``/``.nii.gz`` files, one volume each (4-D files: one frame, ``frame=``)."""

    name = "nifti"
    label = "NIfTI"
    kind = "volume"
    returns = Volume
    suffixes = NIFTI_SUFFIXES

    def read(self, path: str | Path, frame: int = 0, **options: Any) -> Volume:
        return read_nifti(path, frame=frame)

    def depth(self, path: str | Path) -> int:
        """Slices after LPS reorientation, from the header only."""
        import nibabel as nib

        path = str(path)
        try:
            img = nib.load(path)
            sizes, affine = list(img.shape), img.affine
        except Exception as err:  # noqa: BLE001 - any header failure makes the file unusable
            raise ReaderError(f"{path}: unreadable header ({type(err).__name__}: {err})") from err
        return _depth_after_reorientation(path, sizes, affine)


class NrrdReader(Reader):
    """``.nrrd``/``.nhdr`` files, one volume each (needs ``pynrrd``)."""

    name = "nrrd"
    label = "NRRD"
    kind = "volume"
    returns = Volume
    suffixes = NRRD_SUFFIXES

    def read(self, path: str | Path, **options: Any) -> Volume:
        return read_nrrd(path)

    def depth(self, path: str | Path) -> int:
        """Slices after LPS reorientation, from the header only."""
        path = str(path)
        nrrd = _import_nrrd(path)
        try:
            header = nrrd.read_header(path)
            sizes = [int(s) for s in header["sizes"]]
            directions = header.get("space directions")
            affine = np.eye(4)
            if directions is not None:
                affine[:3, :3] = np.asarray(directions, dtype=float).T
        except Exception as err:  # noqa: BLE001 - any header failure makes the file unusable
            raise ReaderError(f"{path}: unreadable header ({type(err).__name__}: {err})") from err
        return _depth_after_reorientation(path, sizes, affine)


NIFTI_READER = NiftiReader()
NRRD_READER = NrrdReader()
