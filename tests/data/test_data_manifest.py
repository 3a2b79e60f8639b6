"""Manifests (CSV/Parquet), patient-level splits, and the volume/slice source kinds."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from medical_testdata import write_ct_series

from medfoundry.config.data import DataConfig
from medfoundry.data.manifest import (
    assign_splits,
    check_patient_splits,
    parse_fractions,
    read_manifest,
    select_split,
    split_of,
)
from medfoundry.data.readers import HU_UINT16, write_slice
from medfoundry.data.sources import build_source


def test_patient_level_splits_never_leak() -> None:
    rows = [{"path": f"img_{i}.png", "patient_id": f"P{i % 37}"} for i in range(400)]
    df = assign_splits(pd.DataFrame(rows), parse_fractions("0.7,0.15,0.15"), seed=3)
    check_patient_splits(df)
    per_patient = df.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()
    shares = df.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert set(shares.index) == {"train", "val", "test"} and shares["train"] > 0.5
    # stable: the same patient gets the same split whatever else is in the table
    assert split_of("P5", parse_fractions("0.7,0.15,0.15"), 3) == df[df["patient_id"] == "P5"]["split"].iloc[0]
    leak = pd.DataFrame({"path": ["a", "b"], "patient_id": ["X", "X"], "split": ["train", "test"]})
    with pytest.raises(ValueError, match="X in"):
        check_patient_splits(leak)
    with pytest.raises(ValueError, match="more than one split"):
        assign_splits(leak)


def test_manifest_csv_and_parquet(tmp_path: Path) -> None:
    df = pd.DataFrame({"path": ["a/x.png", "/abs/y.png"], "series_id": ["s1", "s2"], "split": ["train", "val"],
                       "report": ["no finding", "effusion"]})
    df.to_csv(tmp_path / "m.csv", index=False)
    df.to_parquet(tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        m = read_manifest(tmp_path / name)
        assert m["path"].tolist() == [str(tmp_path / "a/x.png"), "/abs/y.png"]
        assert m["patient_id"].tolist() == ["s1", "s2"]  # falls back to series_id
        assert select_split(m, "val")["report"].tolist() == ["effusion"]
    with pytest.raises(ValueError, match="splits present"):
        select_split(read_manifest(tmp_path / "m.csv"), "test")
    pd.DataFrame({"file": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="no 'path' column"):
        read_manifest(tmp_path / "bad.csv")


def test_manifest_source_mixes_dicom_nifti_and_slices(tmp_path: Path) -> None:
    hu = write_ct_series(tmp_path / "dcm", patient_id="A")
    vol = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    nib.save(nib.Nifti1Image(vol, np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "v.nii.gz")
    write_slice(tmp_path / "s.png", hu[0], HU_UINT16)
    pd.DataFrame({
        "path": ["dcm", "v.nii.gz", "s.png", "missing.nii"],
        "patient_id": ["A", "B", "C", "D"],
        "split": ["train"] * 4,
        "label": [1, 0, 1, 0],
    }).to_csv(tmp_path / "m.csv", index=False)
    src = build_source(DataConfig(kind="manifest", root=str(tmp_path / "m.csv"), split="train", channels=1))
    assert len(src) == hu.shape[0] + 3 + 1
    assert [p for p, _ in src.skipped] == [str(tmp_path / "missing.nii")]
    first = src[0]
    np.testing.assert_array_equal(first.image[0].numpy(), hu[0])
    assert first.meta["label"] == 1 and first.meta["patient_id"] == "A"
    np.testing.assert_array_equal(src[len(src) - 1].image[0].numpy(), np.rint(hu[0]))  # the PNG, in whole HU


def test_nifti_and_slices_kinds(tmp_path: Path) -> None:
    for i in range(2):
        vol = np.full((6, 5, 4), i * 100, dtype=np.int16) + np.arange(4, dtype=np.int16)  # z = last axis
        nib.save(nib.Nifti1Image(vol, np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / f"v{i}.nii.gz")
    src = build_source(DataConfig(kind="nifti", root=str(tmp_path), slices=3, channels=3))
    assert len(src) == 8
    s = src[5]  # second volume, slice 1
    assert s.image[:, 0, 0].tolist() == [100.0, 101.0, 102.0]
    folder = tmp_path / "pngs" / "series1"
    folder.mkdir(parents=True)
    for z in range(5):
        write_slice(folder / f"{z:03d}.png", np.full((8, 8), z * 10.0 - 1000), HU_UINT16)
    src = build_source(DataConfig(kind="slices", root=str(tmp_path / "pngs"), slices=3, slice_stride=2,
                                  slice_edge="reflect", channels=3))
    assert len(src) == 5
    assert src[0].image[:, 0, 0].tolist() == [-980.0, -1000.0, -980.0]
    assert src[2].image[:, 0, 0].tolist() == [-1000.0, -980.0, -960.0]
