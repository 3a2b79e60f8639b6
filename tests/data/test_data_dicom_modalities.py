"""A mixed DICOM folder (a CT series and an MR series, real files written with pydicom): ``data.modalities`` selects
series by their Modality tag, and HU windows are never applied to values that are not Hounsfield units."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from medical_testdata import axial_slice, write_ct_series

from medfoundry.config.data import DataConfig
from medfoundry.data.medical_sources import UnusableSeriesError
from medfoundry.data.prepare import PrepareOptions, prepare
from medfoundry.data.sources import build_source
from medfoundry.errors import UserError


def write_mr_series(folder: Path, depth: int = 4, rows: int = 24, cols: int = 28, seed: int = 0) -> np.ndarray:
    """An axial MR series (uint16 signal, no rescale, no RescaleType): values are not Hounsfield units."""
    import pydicom
    from pydicom.uid import MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    stored = np.random.default_rng(seed).integers(0, 900, size=(depth, rows, cols)).astype(np.uint16)
    series_uid, study_uid = generate_uid(), generate_uid()
    for z in range(depth):
        ds = axial_slice(MRImageStorage, "MR", "PAT-MR", study_uid, series_uid, z + 1, [0.0, 0.0, 4.0 * z])
        ds.PixelSpacing = [0.9, 0.9]
        ds.SliceThickness = 4.0
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(stored[z], dtype="<u2").tobytes()
        pydicom.dcmwrite(folder / f"mr{z:03d}.dcm", ds, enforce_file_format=True)
    return stored.astype(np.float32)


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    write_ct_series(root / "ct")  # 6 slices, RescaleType HU
    write_mr_series(root / "mr")  # 4 slices
    return root


def _series(src) -> set[str]:
    return {Path(e.name).name for e in src.entries}


def test_window_leaves_the_mr_series_out_and_reports_it_once(mixed: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="medfoundry.data")
    src = build_source(DataConfig(kind="dicom", root=str(mixed), channels=1, intensity="window"))
    assert _series(src) == {"ct"} and len(src) == 6
    skipped = [(p, r) for p, r in src.skipped if "mr" in Path(p).name]
    assert len(skipped) == 1 and "not Hounsfield units" in skipped[0][1] and "MR" in skipped[0][1]
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 1 and "left out 1 DICOM series" in lines[0] and str(mixed / "mr") in lines[0]
    assert float(src[0].image.min()) < -500  # what is kept is CT in HU


def test_without_windows_every_series_is_used(mixed: Path) -> None:
    src = build_source(DataConfig(kind="dicom", root=str(mixed), channels=1, intensity="range",
                                  value_range=[0.0, 1000.0]))
    assert _series(src) == {"ct", "mr"} and len(src) == 10 and not src.skipped


def test_modalities_select_series_by_their_tag(mixed: Path) -> None:
    ct = build_source(DataConfig(kind="dicom", root=str(mixed), channels=1, modalities=["ct"], intensity="range"))
    assert _series(ct) == {"ct"} and "not in data.modalities" in ct.skipped[0][1]
    mr = build_source(DataConfig(kind="dicom", root=str(mixed), channels=1, modalities=["MR"], intensity="range"))
    assert _series(mr) == {"mr"}


def test_nothing_usable_is_one_line_naming_root_modalities_and_fix(mixed: Path) -> None:
    with pytest.raises(UnusableSeriesError) as err:
        build_source(DataConfig(kind="dicom", root=str(mixed / "mr"), channels=1, intensity="window"))
    message = str(err.value)
    assert "\n" not in message and str(mixed / "mr") in message and "MR (1 series" in message
    assert "data.modalities=[CT]" in message and "data.intensity=range" in message
    assert issubclass(UnusableSeriesError, UserError)  # one line on stderr, exit code 2
    with pytest.raises(UnusableSeriesError, match="data.modalities=\\['PT'\\].*found: \\['CT', 'MR'\\]"):
        build_source(DataConfig(kind="dicom", root=str(mixed), channels=1, modalities=["PT"], intensity="range"))


def test_manifest_rows_of_dicom_follow_the_same_rule(mixed: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "rows.csv"
    pd.DataFrame({"path": [str(mixed / "ct"), str(mixed / "mr")], "patient_id": ["a", "b"]}).to_csv(manifest,
                                                                                                   index=False)
    src = build_source(DataConfig(kind="manifest", root=str(manifest), channels=1, intensity="window"))
    assert _series(src) == {"ct"} and any("not Hounsfield units" in r for _, r in src.skipped)


def test_prepared_dicom_items_keep_their_units_and_are_selected_when_read(mixed: Path, tmp_path: Path) -> None:
    """``medfoundry prepare`` converts every series (MR losslessly, CT as int16 HU) and records units and modality;
    the prepared source then applies the same rule, so a prepared MR volume is never windowed either."""
    out = tmp_path / "prepared"
    report = prepare(mixed, out, PrepareOptions(progress=False, fractions={"train": 1.0}))
    assert len(report.written) == 2
    table = pd.read_csv(out / "manifest.csv")
    assert sorted(zip(table["modality"], table["units"])) == [("CT", "HU"), ("MR", "stored")]
    src = build_source(DataConfig(kind="prepared", root=str(out), channels=1, intensity="window"))
    assert len(src.entries) == 1 and src.entries[0].modality == "CT" and len(src) == 6
    assert any("MR" in r and "not Hounsfield units" in r for _, r in src.skipped)
    both = build_source(DataConfig(kind="prepared", root=str(out), channels=1, intensity="range"))
    assert len(both.entries) == 2
    mr_only = tmp_path / "prepared_mr"
    prepare(mixed / "mr", mr_only, PrepareOptions(progress=False, fractions={"train": 1.0}))
    with pytest.raises(UnusableSeriesError, match="modalities found: MR"):
        build_source(DataConfig(kind="prepared", root=str(mr_only), channels=1, intensity="window"))
