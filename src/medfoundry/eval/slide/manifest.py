"""The slide manifest: one row per slide (its file, its label, its patient, optionally its split).

Columns are named like those of the labelled sets of ``medfoundry eval --data`` (``path``, ``label``, ``patient``,
``split``) and each can be renamed. The result is a :class:`~medfoundry.eval.labelled_set.LabelledSet` whose items
are slides, so the split summary, the majority-class baseline and the split warnings of the other tasks apply
unchanged. Without a split column the slides are split **by patient** with
:func:`~medfoundry.eval.labelled_set.assign_splits` (seeded, label-stratified, every patient's slides in one
split); a split column that puts one patient in two splits is refused.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from medfoundry.eval.labelled_set import SPLITS, LabelledItem, LabelledSet, assign_splits

_PATIENT_ALIASES = ("patient", "patient_id", "subject", "case")
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}


def _read_table(path: Path):
    """The manifest as a pandas frame of strings (CSV, TSV, JSON lines or Parquet)."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if suffix == ".tsv":
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False).astype(str)
    if suffix == ".parquet":
        return pd.read_parquet(path).astype(str)
    raise ValueError(f"{path}: unsupported slide manifest type '{suffix}' (use .csv, .tsv, .jsonl or .parquet)")


def _patient_column(columns: Sequence[str], wanted: str, path: Path) -> str:
    if wanted in columns:
        return wanted
    if wanted == "patient":
        found = next((c for c in _PATIENT_ALIASES if c in columns), None)
        if found:
            return found
    raise ValueError(f"{path}: no patient column '{wanted}' (--patient-column; also looked for "
                     f"{', '.join(a for a in _PATIENT_ALIASES if a != wanted)}); slide splits are drawn by patient, so "
                     f"add one (each slide's own id if every slide is a different patient); columns: {list(columns)}")


def load_slide_manifest(
    manifest: str | Path,
    slide_column: str = "path",
    label_column: str = "label",
    patient_column: str = "patient",
    split_column: str = "split",
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> LabelledSet:
    """Slides with labels, patients and splits from ``manifest`` (see the module docstring).

    Relative slide paths are relative to the manifest's folder; rows with an empty label are skipped. A present
    ``split_column`` must give every row a split (``train``/``val``/``test``) and every patient one split; without
    it the splits come from :func:`assign_splits` over the patients with ``split_fractions`` and ``seed``.
    Every error is one ``ValueError``/``FileNotFoundError`` line naming the file, the column and the fix.
    """
    path = Path(manifest)
    if not str(manifest):
        raise ValueError("no slide manifest given: pass --slides MANIFEST (columns path, label, patient[, split])")
    if not path.is_file():
        raise FileNotFoundError(f"slide manifest '{path}' does not exist")
    df = _read_table(path)
    columns = list(df.columns)
    for column, option in ((slide_column, "--slide-column"), (label_column, "--label-column")):
        if column not in columns:
            raise ValueError(f"{path}: no column '{column}' ({option}); columns: {columns}")
    patient_col = _patient_column(columns, patient_column, path)
    has_split = split_column in columns
    items: list[LabelledItem] = []
    for row_no, row in enumerate(df.to_dict("records"), start=2):  # row 1 is the header
        label = str(row[label_column]).strip()
        if label in ("", "nan", "None"):
            continue
        raw = str(row[slide_column]).strip()
        slide = Path(raw) if Path(raw).is_absolute() else path.parent / raw
        if not raw or not slide.is_file():
            raise FileNotFoundError(f"{path}: slide '{raw}' (row {row_no}, column '{slide_column}') does not exist; "
                                    "fix the path (a relative path is relative to the manifest's folder)")
        patient = str(row[patient_col]).strip()
        if patient in ("", "nan", "None"):
            raise ValueError(f"{path}: row {row_no} has no patient (column '{patient_col}'); give every slide one")
        split = ""
        if has_split:
            split = str(row[split_column]).strip().lower()
            split = _SPLIT_ALIASES.get(split, split)
            if split not in SPLITS:
                raise ValueError(f"{path}: row {row_no} has split '{row[split_column]}' (column '{split_column}'); "
                                 f"use one of {', '.join(SPLITS)}, or drop the column to split by patient")
        items.append(LabelledItem(str(slide.resolve()), label, split, series=str(slide.resolve()), patient=patient))
    if not items:
        raise ValueError(f"{path}: no labelled slide (column '{label_column}' is empty in every row)")
    if has_split:
        check_patient_splits(items, f"{path} (column '{split_column}')")
    else:
        splits = assign_splits([it.label for it in items], [it.patient for it in items], split_fractions, seed)
        for it, split in zip(items, splits):
            it.split = split
    return LabelledSet(items, source=str(path))


def check_patient_splits(items: Sequence[LabelledItem], where: str) -> None:
    """``ValueError`` naming a patient whose slides are in more than one split (a leak from train into test)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for it in items:
        seen[it.patient].add(it.split)
    leaks = {p: sorted(s) for p, s in seen.items() if len(s) > 1}
    if leaks:
        first, splits = next(iter(leaks.items()))
        raise ValueError(f"{where}: patient '{first}' has slides in splits {splits} ({len(leaks)} such patient(s)); "
                         "give all of a patient's slides one split, or drop the split column to split by patient")
