"""NIfTI reader: canonical (LPS) orientation and spacing from files written with nibabel in odd orientations."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from medical_testdata import write_ct_series

from medfoundry.data.readers import ReaderError, read_dicom, read_nifti, read_volume


def _world_lps(vol, z: int, y: int, x: int) -> np.ndarray:
    return (vol.affine @ np.array([x, y, z, 1.0]))[:3]


def test_marker_lands_where_the_affine_says(tmp_path: Path) -> None:
    data = np.zeros((7, 5, 4), dtype=np.int16)  # file axes (i, j, k)
    data[1, 3, 2] = 500
    # i runs towards the patient's right (flipped x), j anterior, k inferior: an "RAI" file
    affine = np.array([[-0.8, 0, 0, 10.0], [0, 0.7, 0, -5.0], [0, 0, -2.5, 40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    vol = read_nifti(tmp_path / "v.nii.gz")
    assert vol.orientation == "LPS" and vol.meta["orientation_on_disk"] != "LPS"
    assert vol.array.shape == (4, 5, 7)  # (Z, Y, X)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.8))
    z, y, x = np.argwhere(vol.array == 500)[0]
    ras = affine @ np.array([1, 3, 2, 1.0])
    np.testing.assert_allclose(_world_lps(vol, z, y, x), [-ras[0], -ras[1], ras[2]])


def test_scaling_applied_and_matches_dicom(tmp_path: Path) -> None:
    """The same CT written as a DICOM series and as a flipped, scaled NIfTI reads back identically."""
    hu = write_ct_series(tmp_path / "dcm", slope=1.0, intercept=-1024.0)
    dicom = read_dicom(tmp_path / "dcm")
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ dicom.affine
    xyz = np.swapaxes(hu, 0, 2)[::-1, :, ::-1]  # store x and z reversed...
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, xyz.shape[0] - 1
    flip[2, 2], flip[2, 3] = -1, xyz.shape[2] - 1
    img = nib.Nifti1Image(((xyz + 1024) / 2).astype(np.float32).round().astype(np.int16), ras @ flip)
    img.header.set_slope_inter(2.0, -1024.0)  # ... as scaled integers
    nib.save(img, tmp_path / "ct.nii")
    vol = read_volume(tmp_path / "ct.nii")
    np.testing.assert_allclose(vol.array, np.round((hu + 1024) / 2) * 2 - 1024)
    np.testing.assert_allclose(vol.affine, dicom.affine, atol=1e-5)
    assert vol.spacing == pytest.approx(dicom.spacing)


def test_four_d_takes_one_frame_and_wrong_dimensions_fail(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2)
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "t.nii")  # LPS on disk
    vol = read_nifti(tmp_path / "t.nii", frame=1)
    np.testing.assert_array_equal(vol.array, np.swapaxes(data[..., 1], 0, 2))
    assert vol.meta["frames"] == 2
    nib.save(nib.Nifti1Image(np.zeros((4, 5), dtype=np.float32), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(ReaderError, match="wrong dimensions"):
        read_nifti(tmp_path / "flat.nii")
    (tmp_path / "junk.nii.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ReaderError, match="junk.nii.gz"):
        read_nifti(tmp_path / "junk.nii.gz")
