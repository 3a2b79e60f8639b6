"""The slide manifest: configurable columns, splits drawn by patient (seeded, no patient in two splits), and
one-line errors naming the file, the column and the fix."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medfoundry.eval.slide.manifest import load_slide_manifest

COLUMNS = dict(slide_column="slide", label_column="haematoxylin_above_median", patient_column="case")


def _patients_by_split(lset) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for it in lset.items:
        out.setdefault(it.split, set()).add(it.patient)
    return out


def test_split_by_patient_is_seeded_and_keeps_patients_whole(region_manifest: Path) -> None:
    table = pd.read_csv(region_manifest, dtype=str)
    for seed in range(5):
        lset = load_slide_manifest(region_manifest, **COLUMNS, split_fractions=(0.5, 0.2, 0.3), seed=seed)
        assert len(lset) == len(table)
        by_split = _patients_by_split(lset)
        assert set(by_split) == {"train", "val", "test"}
        assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"]) \
            and not (by_split["val"] & by_split["test"]), seed  # no patient in two splits
        assert all(len({it.label for it in lset.items if it.split == s}) == 2 for s in by_split), seed  # stratified
        again = load_slide_manifest(region_manifest, **COLUMNS, split_fractions=(0.5, 0.2, 0.3), seed=seed)
        assert [it.split for it in again.items] == [it.split for it in lset.items]
    other = load_slide_manifest(region_manifest, **COLUMNS, split_fractions=(0.5, 0.2, 0.3), seed=1)
    first = load_slide_manifest(region_manifest, **COLUMNS, split_fractions=(0.5, 0.2, 0.3), seed=0)
    assert [it.split for it in other.items] != [it.split for it in first.items]
    assert all(Path(it.path).is_absolute() and it.path.endswith(".tif") for it in first.items)


def test_default_columns_and_a_given_split(region_manifest: Path, tmp_path: Path) -> None:
    table = pd.read_csv(region_manifest, dtype=str)
    folder = region_manifest.parent
    split = ["train", "val", "test"] * (len(table) // 3) + ["train"] * (len(table) % 3)
    by_patient = dict(zip(table["case"], split))  # one split per patient
    pd.DataFrame({"path": [str(folder / s) for s in table["slide"]], "label": table["haematoxylin_above_median"],
                  "patient_id": table["case"], "split": [by_patient[p] for p in table["case"]]}).to_csv(
        tmp_path / "m.csv", index=False)
    lset = load_slide_manifest(tmp_path / "m.csv")  # path, label, patient_id (an alias of patient), split
    assert [it.split for it in lset.items] == [by_patient[p] for p in table["case"]]
    assert lset.classes == ["0", "1"]


def test_a_patient_in_two_splits_is_refused(region_manifest: Path, tmp_path: Path) -> None:
    table = _absolute(region_manifest)
    table["split"] = ["train", "test"] * (len(table) // 2) + ["train"] * (len(table) % 2)  # P00: train and test
    table.to_csv(tmp_path / "leak.csv", index=False)
    with pytest.raises(ValueError, match=r"leak\.csv \(column 'split'\): patient 'P00' has slides in splits "
                                         r"\['test', 'train'\]"):
        load_slide_manifest(tmp_path / "leak.csv", **COLUMNS)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns=["slide"]), r"no column 'slide' \(--slide-column\)"),
    (lambda t: t.drop(columns=["haematoxylin_above_median"]), r"no column 'haematoxylin_above_median' "
                                                               r"\(--label-column\)"),
    (lambda t: t.drop(columns=["case"]), r"no patient column 'case' \(--patient-column"),
    (lambda t: t.assign(slide=["gone.tif"] + list(t["slide"][1:])), r"slide 'gone.tif' \(row 2, column 'slide'\) "
                                                                     r"does not exist"),
    (lambda t: t.assign(split="holdout"), r"row 2 has split 'holdout' \(column 'split'\)"),
    (lambda t: t.assign(case=[""] + list(t["case"][1:])), r"row 2 has no patient \(column 'case'\)"),
])
def test_errors_name_file_column_and_fix(region_manifest: Path, tmp_path: Path, change, message: str) -> None:
    bad = tmp_path / "bad.csv"
    change(_absolute(region_manifest)).to_csv(bad, index=False)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        load_slide_manifest(bad, **COLUMNS)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def _absolute(manifest: Path) -> pd.DataFrame:
    """The manifest with absolute slide paths, so that a copy anywhere finds the slides."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    return table.assign(slide=[str(manifest.parent / s) for s in table["slide"]])
