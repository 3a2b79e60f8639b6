"""`medfoundry prepare`: good items written, bad ones reported, resumable after a kill, idempotent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from medical_testdata import ct_phantom, render_level, write_ct_series

from medfoundry.config.data import DataConfig
from medfoundry.data.prepare import PrepareOptions, prepare
from medfoundry.data.readers import HU_UINT16, write_slice
from medfoundry.data.sources import build_source

QUIET = PrepareOptions(progress=False)


@pytest.fixture()
def raw(tmp_path: Path) -> dict:
    """Two good CT series, a NIfTI, a 16-bit PNG slice; a corrupt DICOM, a truncated PNG, a text file."""
    src = tmp_path / "raw"
    hu_a = write_ct_series(src / "pat_a" / "ct", patient_id="A", seed=1)
    hu_b = write_ct_series(src / "pat_b" / "ct", stored=ct_phantom(depth=4, seed=2), patient_id="B", seed=2)
    vol = np.random.default_rng(0).integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)  # (x, y, z) on disk
    nib.save(nib.Nifti1Image(vol, np.diag([-1.0, -1.0, 2.0, 1.0])), src / "vol.nii.gz")
    png_hu = np.random.default_rng(1).integers(-1024, 2000, size=(20, 24)).astype(np.float32)
    (src / "slices").mkdir()
    write_slice(src / "slices" / "good.png", png_hu, HU_UINT16)
    (src / "broken").mkdir()
    (src / "broken" / "corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(200))
    write_slice(src / "broken" / "cut.png", png_hu, HU_UINT16)
    data = (src / "broken" / "cut.png").read_bytes()
    (src / "broken" / "cut.png").write_bytes(data[: len(data) // 2])
    (src / "notes.txt").write_text("scanner notes, not an image\n")
    return {"src": src, "out": tmp_path / "out", "hu_a": hu_a, "hu_b": hu_b, "png_hu": png_hu,
            "nifti": np.swapaxes(vol, 0, 2).astype(np.float32)}


def test_good_items_written_bad_ones_reported(raw) -> None:
    report = prepare(raw["src"], raw["out"], QUIET)
    assert len(report.written) == 4 and not report.already_done
    reasons = dict(report.failed)
    assert set(reasons) == {"broken/corrupt.dcm", "broken/cut.png", "notes.txt"}
    assert "corrupt" in reasons["broken/corrupt.dcm"]
    assert "truncated" in reasons["broken/cut.png"]
    assert "not an image file" in reasons["notes.txt"]
    saved = json.loads((raw["out"] / "report.json").read_text())
    assert {f["path"] for f in saved["failed"]} == set(reasons) and saved["items"] == 4
    assert "notes.txt" in (raw["out"] / "report.txt").read_text()

    df = pd.read_csv(raw["out"] / "manifest.csv")
    assert len(df) == 4 and set(df["kind"]) == {"volume"}
    ct = df[df["modality"] == "CT"].sort_values("depth", ascending=False)
    assert list(ct["patient_id"]) == ["A", "B"] and list(ct["units"]) == ["HU", "HU"]
    a = np.load(raw["out"] / ct.iloc[0]["path"])
    assert a.dtype == np.int16  # HU stored as int16 ...
    np.testing.assert_array_equal(a, np.rint(raw["hu_a"]))  # ... rounded to whole HU (slope 0.5 gave halves)
    png_row = df[df["source"] == "slices/good.png"].iloc[0]
    png = np.load(raw["out"] / png_row["path"])
    np.testing.assert_array_equal(png[0] * png_row["slope"] + png_row["intercept"], raw["png_hu"])
    nii = df[df["source"] == "vol.nii.gz"].iloc[0]
    assert nii["spacing_z"] == pytest.approx(2.0)
    np.testing.assert_array_equal(np.load(raw["out"] / nii["path"]), raw["nifti"])
    assert set(df["split"]) <= {"train", "val", "test"}


def test_prepared_source_gives_hu_stacks(raw) -> None:
    prepare(raw["src"], raw["out"], QUIET)
    cfg = DataConfig(kind="prepared", root=str(raw["out"]), slices=3, slice_stride=1, intensity="window",
                     windows=["lung"], channels=3)
    src = build_source(cfg)
    assert len(src) == 6 + 4 + 7 + 1  # every slice of every volume (replicate edges)
    hu_a = np.rint(raw["hu_a"])
    found = [i for i in range(len(src)) if src[i].meta.get("patient_id") == "A" and src[i].meta["position"] == 2]
    assert len(found) == 1
    np.testing.assert_array_equal(src[found[0]].image.numpy(), hu_a[[1, 2, 3]])
    assert "(from pat_a/ct (series" in src.describe(found[0])  # errors name the original files


def test_killed_midway_then_rerun_completes_without_redoing(raw) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import medfoundry.data.prepare as p
        from medfoundry_cli.cli import main
        done = []
        write_record, save_npy = p._write_record, p._save_npy
        def record(path, rec):
            write_record(path, rec)
            if path.parent.name == "items":
                done.append(path)
        def save(path, arr):
            if len(done) == 2:  # third item: die while its data are half written
                path.with_name(path.name + ".tmp").write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            save_npy(path, arr)
        p._write_record, p._save_npy = record, save
        sys.exit(main(["prepare", {str(raw["src"])!r}, "--out", {str(raw["out"])!r}, "--no-progress"]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    items = raw["out"] / "items"
    finished = sorted(items.glob("*.json"))
    assert len(finished) == 2 and list(items.glob("*.tmp"))
    stamps = {p: p.stat().st_mtime_ns for p in items.iterdir() if not p.name.endswith(".tmp")}

    report = prepare(raw["src"], raw["out"], QUIET)
    assert len(report.already_done) == 2 and len(report.written) == 2 and len(report.failed) == 3
    assert not list(items.glob("*.tmp"))
    for path, stamp in stamps.items():
        assert path.stat().st_mtime_ns == stamp, f"{path.name} was rewritten"
    assert len(pd.read_csv(raw["out"] / "manifest.csv")) == 4

    again = prepare(raw["src"], raw["out"], QUIET)  # idempotent
    assert len(again.already_done) == 4 and not again.written
    # a changed source is redone
    f = sorted((raw["src"] / "pat_b" / "ct").iterdir())[0]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    third = prepare(raw["src"], raw["out"], QUIET)
    assert len(third.written) == 1 and third.written[0].startswith("pat_b/ct")


def test_cli_reports_and_exit_code(raw) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "medfoundry_cli", "prepare", str(raw["src"]), "--out", str(raw["out"]), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 written, 0 already done, 3 skipped" in proc.stdout
    assert "broken/cut.png" in proc.stdout


def test_slides_and_manifest_source_with_mask(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    img = render_level(256.0, 192.0, 0.5)
    img[:, :200] = 245  # glass on the left
    tifffile.imwrite(src / "slide.tif", img, tile=(128, 128), photometric="rgb", metadata=None,
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    (src / "dead.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    vol = np.zeros((8, 9, 6), dtype=np.int16)  # (x, y, z)
    mask = np.zeros_like(vol)
    mask[2:5, 3:7, 1:3] = 1
    nib.save(nib.Nifti1Image(vol, np.diag([-1.0, -1.0, 1.0, 1.0])), src / "ct.nii")
    nib.save(nib.Nifti1Image(mask, np.diag([-1.0, -1.0, 1.0, 1.0])), src / "ct_mask.nii")
    pd.DataFrame({"path": ["slide.tif", "dead.svs", "ct.nii"], "patient_id": ["p1", "p2", "p3"],
                  "split": ["train", "train", "val"], "report": ["h&e", "", "ct"],
                  "mask": ["", "", "ct_mask.nii"]}).to_csv(src / "m.csv", index=False)
    opts = PrepareOptions(progress=False, tile_size=64, tile_mpp=0.5, min_tissue=0.5)
    report = prepare(src / "m.csv", tmp_path / "out", opts)
    assert [p for p, _ in report.failed] == ["dead.svs"] and "unreadable slide" in report.failed[0][1]
    df = pd.read_csv(tmp_path / "out" / "manifest.csv")
    tiles = df[df["kind"] == "tiles"].iloc[0]
    coords = np.load(tmp_path / "out" / tiles["path"].replace(".npy", ".coords.npy"))
    assert tiles["depth"] == len(coords) > 0 and (coords[:, 0] >= 200 - 64).all()  # no glass-only tiles
    train = build_source(DataConfig(kind="prepared", root=str(tmp_path / "out"), split="train", channels=3))
    assert len(train) == tiles["depth"] and train[0].image.shape == (3, 64, 64)
    assert train[0].meta["report"] == "h&e"
    val = build_source(DataConfig(kind="prepared", root=str(tmp_path / "out"), split="val", channels=1))
    regions = [val[i].region for i in range(len(val))]
    assert regions[1] == (3, 2, 7, 5) and regions[0] is None  # (y0, x0, y1, x1) of slices 1-2 only
    # the same CSV as a training manifest, without preparing
    direct = build_source(DataConfig(kind="manifest", root=str(src / "m.csv"), split="val", channels=1))
    assert [direct[i].region for i in range(len(direct))] == regions
    assert torch.equal(direct[1].image, val[1].image)
