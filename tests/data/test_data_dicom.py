"""DICOM reader: written series (shuffled files, slope/intercept), multi-frame, pydicom's bundled real files."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from medical_testdata import ct_phantom, write_ct_series, write_multiframe
from pydicom.data import get_testdata_file

from medfoundry.data.readers import MissingDecoderError, ReaderError, read_dicom, read_volume
from medfoundry.data.readers.dicom import DicomSeries, find_series, read_header

# pydicom ships CT_small/MR_small/JPEG2000; RG1_UNCI and emri_small come from the pydicom-data package.
# Without it pydicom would try to download them, so those tests are skipped instead.
HAS_PYDICOM_DATA = importlib.util.find_spec("data_store") is not None
HAS_DECODERS = all(importlib.util.find_spec(m) is not None for m in ("pylibjpeg", "libjpeg", "openjpeg"))
needs_pydicom_data = pytest.mark.skipif(not HAS_PYDICOM_DATA, reason="pip install pydicom-data")


def test_series_sorted_by_position_in_hu(tmp_path: Path) -> None:
    expected = write_ct_series(tmp_path / "s", slope=0.5, intercept=-1000.0, spacing=(2.5, 0.7, 0.8))
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    instances = [int(pydicom.dcmread(tmp_path / "s" / n).InstanceNumber) for n in names]
    positions = [float(pydicom.dcmread(tmp_path / "s" / n).ImagePositionPatient[2]) for n in names]
    assert positions != sorted(positions), "the file order on disk must not be the spatial order"
    by_position = [i for _, i in sorted(zip(positions, instances))]
    assert by_position != sorted(by_position), "instance numbers must not give the spatial order either"

    vol = read_dicom(tmp_path / "s")
    assert vol.units == "HU"
    assert vol.array.dtype == np.float32 and vol.array.shape == expected.shape
    np.testing.assert_array_equal(vol.array, expected)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.8))
    assert vol.orientation == "LPS"
    np.testing.assert_allclose(vol.affine[:3, 3], [-10.0, -20.0, 30.0])
    assert vol.meta["patient_id"] == "PAT-1"
    # air (stored 0) comes out at the intercept, not at 0
    assert vol.array.min() == pytest.approx(-1000.0, abs=10)


def test_read_volume_dispatches_folder_and_single_file(tmp_path: Path) -> None:
    expected = write_ct_series(tmp_path / "s")
    np.testing.assert_array_equal(read_volume(tmp_path / "s").array, expected)
    one = sorted((tmp_path / "s").iterdir())[0]
    single = read_volume(one)
    assert single.array.shape == (1,) + expected.shape[1:]


def test_instance_stored_twice_is_read_once(tmp_path: Path) -> None:
    """pydicom's MR_small.dcm and MR_small_jp2klossless.dcm are one instance in two encodings."""
    import shutil

    for name in ("MR_small.dcm", "MR_small_jp2klossless.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / name)
    vol = read_dicom(tmp_path)
    assert vol.array.shape == (1, 64, 64) and vol.meta["duplicates_dropped"] == 1
    np.testing.assert_array_equal(vol.array[0], pydicom.dcmread(tmp_path / "MR_small.dcm").pixel_array)


def test_per_slice_rescale_is_applied(tmp_path: Path) -> None:
    stored = ct_phantom(depth=3)
    write_ct_series(tmp_path / "s", stored, slope=1.0, intercept=-1024.0, shuffle=False)
    f = sorted((tmp_path / "s").iterdir())[1]  # middle slice gets its own rescale
    ds = pydicom.dcmread(f)
    z = int(round((float(ds.ImagePositionPatient[2]) - 30.0) / 2.5))
    ds.RescaleSlope, ds.RescaleIntercept = 2.0, -2048.0
    ds.save_as(f)
    vol = read_dicom(tmp_path / "s")
    np.testing.assert_array_equal(vol.array[z], stored[z].astype(np.float32) * 2 - 2048)
    other = [i for i in range(3) if i != z][0]
    np.testing.assert_array_equal(vol.array[other], stored[other].astype(np.float32) - 1024)


def test_multiframe_frames_sorted_with_per_frame_rescale(tmp_path: Path) -> None:
    stored = ct_phantom(depth=4)
    slopes, intercepts = [1.0, 2.0, 1.0, 0.5], [-1024.0, -2000.0, -1000.0, -500.0]
    write_multiframe(tmp_path / "mf.dcm", stored, slopes, intercepts, spacing_z=3.0)
    vol = read_dicom(tmp_path / "mf.dcm")
    assert vol.array.shape == stored.shape
    # frame f lies at position (3 - f) * 3 mm, so ascending order is frames 3, 2, 1, 0
    for z, f in enumerate([3, 2, 1, 0]):
        np.testing.assert_allclose(vol.array[z], stored[f].astype(np.float32) * slopes[f] + intercepts[f])
    assert vol.spacing == pytest.approx((3.0, 0.5, 0.5))
    series = DicomSeries(read_header(tmp_path / "mf.dcm"))
    np.testing.assert_allclose(series.read([1]), vol.array[1:2])  # one frame decoded alone


def test_bundled_ct_small_in_hu() -> None:
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol = read_volume(path)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.array[0], expected)
    assert vol.units == "HU" and float(ds.RescaleIntercept) == -1024.0
    assert vol.spacing[1:] == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))


@needs_pydicom_data
@pytest.mark.skipif(not HAS_DECODERS, reason="pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "JPEGLSNearLossless_16.dcm", "emri_small.dcm"])
def test_bundled_compressed_and_multiframe_files(name: str) -> None:
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    vol = read_volume(path)
    frames = int(ds.get("NumberOfFrames") or 1)
    assert vol.array.shape == (frames, int(ds.Rows), int(ds.Columns))
    np.testing.assert_array_equal(vol.array.reshape(ds.pixel_array.shape), ds.pixel_array.astype(np.float32))


@needs_pydicom_data
def test_bundled_radiograph_monochrome1_is_inverted() -> None:
    path = get_testdata_file("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    vol = read_volume(path)
    raw = ds.pixel_array.astype(np.float32)
    np.testing.assert_array_equal(vol.array[0], (2 ** int(ds.BitsStored) - 1) - raw)


def test_missing_decoder_names_package() -> None:
    """With every JPEG 2000 decoder hidden, the error names the file, the syntax and the pip fix."""
    code = (
        "import sys\n"
        "for m in ('pylibjpeg', 'openjpeg', 'libjpeg', 'gdcm', 'PIL'): sys.modules[m] = None\n"
        "from pydicom.data import get_testdata_file\n"
        "from medfoundry.data.readers import read_volume, MissingDecoderError\n"
        "try:\n"
        "    read_volume(get_testdata_file('JPEG2000.dcm'))\n"
        "except MissingDecoderError as err:\n"
        "    print('ERR', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout
    assert "JPEG2000.dcm" in out.stdout and "JPEG 2000" in out.stdout
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in out.stdout


def test_unsupported_transfer_syntax_is_explained(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # H.264 video: pydicom has no decoder
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "video.dcm")
    with pytest.raises(MissingDecoderError, match=r"video\.dcm.*H\.264.*decompress the files first"):
        read_volume(tmp_path / "video.dcm")


def test_corrupt_and_non_image_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"garbage" * 10)
    with pytest.raises(ReaderError, match="bad.dcm"):
        read_volume(bad)
    truncated = tmp_path / "trunc.dcm"
    write_ct_series(tmp_path / "s", shuffle=False)
    data = sorted((tmp_path / "s").iterdir())[0].read_bytes()
    truncated.write_bytes(data[: len(data) - 300])
    with pytest.raises(ReaderError, match="trunc.dcm"):
        read_volume(truncated)


def test_folder_with_two_series_and_mixed_sizes(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "a", patient_id="A", seed=1)
    write_ct_series(tmp_path / "b", stored=ct_phantom(depth=3, rows=16, cols=16), patient_id="B", seed=2)
    with pytest.raises(ReaderError, match="holds 2 series"):
        read_dicom(tmp_path)
    series, errors = find_series(tmp_path)
    assert len(series) == 2 and not errors
    # a slice of another size inside a series is reported, not stacked
    uid = pydicom.dcmread(sorted((tmp_path / "a").iterdir())[0]).SeriesInstanceUID
    write_ct_series(tmp_path / "c", stored=ct_phantom(depth=1, rows=10, cols=10), series_uid=uid)
    series, errors = find_series(tmp_path)
    assert len(series) == 1 and errors and "different sizes" in errors[0][1]
