"""Issue 12's bad-input corpus, ``medfoundry prepare``: a bad file is listed among the skipped items (or notes)
of ``report.json`` with its reason while the good files are written; a missing source or a manifest without
its column exits 2 with one line; a failing ``prepare`` into a finished output changes none of its files.

Case table (id -> what it checks):

=================================  ===================================================================
prepare_png_truncated              ``prepare`` skips a truncated PNG with the reason
prepare_dicom_without_pixels       ``prepare`` skips a DICOM file that holds no pixel data
prepare_nifti_nan                  ``prepare`` skips a NIfTI with NaN/inf voxels, counting them
prepare_nifti_4d                   ``prepare`` converts a 4-D NIfTI and notes frame 0 kept, 2 dropped
prepare_nifti_truncated            ``prepare`` skips a truncated ``.nii.gz``
prepare_source_missing             ``prepare`` of a missing source: exit 2
prepare_manifest_missing_column    ``prepare`` of a CSV manifest without a ``path`` column: exit 2
prior_prepare_kept                 a failing ``prepare`` into a finished output folder changes none of its files
=================================  ===================================================================
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from bad_input_testutil import assert_user_error, cli, digests, nifti_volume
from PIL import Image

from medfoundry.safe_load import TRUST_ENV
from medfoundry_cli.cli import main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in a fresh folder (the CLI's fallback ``medfoundry-error.log`` lands there), no pickle trust."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(TRUST_ENV, raising=False)


def _dicom_without_pixels(folder: Path) -> Path:
    """A real two-slice CT series whose first file has its pixel data removed."""
    import pydicom

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    medical = importlib.import_module("medical_testdata")
    medical.write_ct_series(folder, stored=medical.ct_phantom(depth=2))
    first = sorted(folder.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    del ds.PixelData
    ds.save_as(first, enforce_file_format=True)
    return first


def _prepare_input(src: Path, case: str) -> str:
    """Write the bad file of a prepare case into ``src``; returns its name as the report gives it."""
    src.mkdir(parents=True, exist_ok=True)
    if case == "prepare_png_truncated":
        buf = src / "cut.png"
        Image.fromarray((np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)).save(buf)
        buf.write_bytes(buf.read_bytes()[:200])
        return "cut.png"
    if case == "prepare_dicom_without_pixels":
        _dicom_without_pixels(src / "ct")
        return "ct (series"
    if case == "prepare_nifti_nan":
        nifti_volume(src / "nan.nii.gz", nan=True)
        return "nan.nii.gz"
    if case == "prepare_nifti_4d":
        nifti_volume(src / "fmri.nii.gz", frames=3)
        return "fmri.nii.gz"
    if case == "prepare_nifti_truncated":
        whole = nifti_volume(src / "whole.nii.gz").read_bytes()
        (src / "whole.nii.gz").unlink()
        (src / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
        return "cut.nii.gz"
    raise AssertionError(case)


PREPARE_CASES = [
    ("prepare_png_truncated", "failed", ["truncated"]),
    ("prepare_dicom_without_pixels", "failed", ["no pixel data"]),
    ("prepare_nifti_nan", "failed", ["2 NaN and 1 infinite", "nan_to_num"]),
    ("prepare_nifti_4d", "notes", ["3 frames", "kept frame 0", "dropped the other 2"]),
    ("prepare_nifti_truncated", "failed", ["cut.nii.gz"]),
]


@pytest.mark.parametrize("case,section,needles", [pytest.param(c, s, n, id=c) for c, s, n in PREPARE_CASES])
def test_prepare_reports_a_bad_file(case: str, section: str, needles: list[str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    name = _prepare_input(tmp_path / "raw", case)
    good = tmp_path / "raw" / "good.nii.gz"
    nifti_volume(good)
    rc = main(["prepare", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    key = "reason" if section == "failed" else "note"
    entries = [e for e in report[section] if e["path"].startswith(name)]
    assert len(entries) == 1, report
    for needle in needles:
        assert needle in entries[0][key], entries[0]
    assert "good.nii.gz" in report["written"], "a bad file must not stop the good ones"
    listed = "skipped" if section == "failed" else "note"
    assert f"{listed} {entries[0]['path']}" in capsys.readouterr().out


def test_prepare_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """prepare_source_missing"""
    rc, err = cli(["prepare", str(tmp_path / "raw_missing"), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert_user_error(rc, err, "prepare", "raw_missing", "does not exist")


def test_prepare_manifest_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """prepare_manifest_missing_column"""
    (tmp_path / "list.csv").write_text("file,patient_id\nvol.nii.gz,A\n")
    rc, err = cli(["prepare", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert_user_error(rc, err, "prepare", "list.csv", "'path'")


def test_failing_prepare_leaves_a_finished_output_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """prior_prepare_kept"""
    (tmp_path / "raw").mkdir()
    nifti_volume(tmp_path / "raw" / "vol.nii.gz")
    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "raw"), "--out", str(out), "--no-progress"]) == 0
    before = digests(out)
    (tmp_path / "list.csv").write_text("file\nvol.nii.gz\n")
    for src in (tmp_path / "list.csv", tmp_path / "missing"):
        rc, err = cli(["prepare", str(src), "--out", str(out), "--no-progress"], capsys)
        assert_user_error(rc, err, "prepare", str(src.name), f"[traceback: {out / 'error.log'}]")
        after = digests(out)
        after.pop("error.log")
        assert after == before, f"prepare {src} changed the finished output"


def test_docstring_table_lists_every_case() -> None:
    """The module docstring's table and the cases above stay in step."""
    lines = (__doc__ or "").splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("====")]
    table = {line.split()[0] for line in lines[rules[0] + 1:rules[-1]] if line.strip()}
    named_tests = {"prepare_source_missing", "prepare_manifest_missing_column", "prior_prepare_kept"}
    assert table == {c for c, *_ in PREPARE_CASES} | named_tests
