"""What every reader returns: :class:`Volume`, the reader errors, and patient-geometry helpers.

Geometry convention (all readers): ``Volume.array[z, y, x]``; ``Volume.affine`` maps the voxel
index ``(x, y, z, 1)`` to patient coordinates in millimetres in the DICOM/ITK **LPS** frame
(+x = patient's left, +y = posterior, +z = superior). ``Volume.orientation`` names, for the
x, y and z voxel axes in turn, the patient direction each one increases towards, e.g. ``"LPS"`` for
an axial series displayed the radiological way (anterior at the top, the patient's right on the
image's left).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfoundry.errors import UserError


class ReaderError(UserError, RuntimeError):
    """A file could not be read; the message names the file, the cause and, where one exists, the fix."""


class MissingDecoderError(ReaderError):
    """The pixel data are compressed with a codec whose decoder package is not installed."""


@dataclass
class Volume:
    """A 3-D image with its metadata resolved at load time."""

    array: np.ndarray  # (Z, Y, X) float32 (or (Z, Y, X, C) for colour) in ``units``
    spacing: tuple[float, float, float]  # voxel size (z, y, x) in mm (or µm-free 1.0 when unknown)
    affine: np.ndarray  # 4x4: voxel (x, y, z, 1) -> patient LPS mm
    units: str = "stored"  # "HU" for CT after the modality LUT, "stored" when no mapping is known
    path: str = ""  # file or folder it came from
    meta: dict[str, Any] = field(default_factory=dict)  # modality, patient/series ids, ...

    @property
    def orientation(self) -> str:
        """LPS axis codes of the x, y, z voxel axes (e.g. ``"LPS"``)."""
        return axis_codes(self.affine)

    @property
    def depth(self) -> int:
        """Number of slices along z."""
        return int(self.array.shape[0])


def check_finite(array: np.ndarray, where: str) -> None:
    """Raise :class:`ReaderError` when a float image holds NaN or infinite values (integer images cannot).

    Such pixels would turn every loss they reach into NaN; the message counts them and says how to fix the file.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nan = int(np.isnan(array).sum())
    inf = int(array.size - finite.sum()) - nan
    raise ReaderError(
        f"{where}: {nan} NaN and {inf} infinite pixel values of {array.size} ({(nan + inf) / array.size:.2%}); "
        "replace them in the file (e.g. numpy.nan_to_num with the background value) before using it"
    )


def axis_codes(affine: np.ndarray) -> str:
    """For each voxel axis (x, y, z), the LPS letter of the patient direction it increases towards."""
    letters = (("R", "L"), ("A", "P"), ("I", "S"))  # (negative, positive) of LPS world x, y, z
    out = []
    for col in range(3):
        v = np.asarray(affine, dtype=float)[:3, col]
        world = int(np.argmax(np.abs(v)))
        out.append(letters[world][1 if v[world] >= 0 else 0])
    return "".join(out)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """(z, y, x) voxel size in mm from the column norms of an affine."""
    norms = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    return float(norms[2]), float(norms[1]), float(norms[0])


def reorient_to_lps(data_xyz: np.ndarray, affine_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose an array indexed ``[x, y, z, ...]`` so its axes run L, P, S; returns (data, affine).

    Only axis permutations and flips (no resampling): an oblique volume gets the closest LPS order.
    """
    from nibabel import orientations as ornt

    current = ornt.io_orientation(affine_lps)  # world axes here are LPS, so "positive" = L, P, S
    target = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    transform = ornt.ornt_transform(current, target)
    out = ornt.apply_orientation(data_xyz, transform)
    new_affine = affine_lps @ ornt.inv_ornt_aff(transform, data_xyz.shape[:3])
    return np.ascontiguousarray(out), new_affine


def xyz_to_zyx(data_xyz: np.ndarray) -> np.ndarray:
    """``[x, y, z, ...]`` -> ``[z, y, x, ...]`` (contiguous)."""
    return np.ascontiguousarray(np.swapaxes(data_xyz, 0, 2))
