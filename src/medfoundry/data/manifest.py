"""Manifests (CSV or Parquet) and patient-level splits.

A manifest has one row per image, volume or slide. Columns:

* ``path`` (required): file or DICOM folder, absolute or relative to the manifest's folder;
* ``patient_id``: splits are made per patient (defaults to ``series_id``, then to ``path``);
* ``series_id``, ``split`` (train/val/test), ``label``, ``report`` (or the column named by
  ``data.text_column``), optional ``mask`` (a mask file aligned with the image) or a box
  ``y0, x0, y1, x1`` (end-exclusive pixels) for label-guided crops.

Splits are assigned per patient by a stable hash of ``(seed, patient_id)``, so a patient never
lands in two splits, adding patients never moves existing ones, and re-runs give the same split.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

DEFAULT_SPLITS: dict[str, float] = {"train": 0.9, "val": 0.05, "test": 0.05}


def read_manifest(path: str | Path, text_column: str = "report") -> pd.DataFrame:
    """A manifest as a DataFrame with ``path`` resolved to absolute and ``patient_id`` filled in."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest '{path}' does not exist")
    if path.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
        df = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype={"patient_id": str})
    else:
        raise ValueError(f"manifest '{path}': expected a .csv, .tsv or .parquet file")
    if "path" not in df.columns:
        raise ValueError(f"manifest '{path}' has no 'path' column (columns: {list(df.columns)})")
    df = df.copy()
    base = path.parent
    df["path"] = [_resolve(p, base) for p in df["path"]]
    if "mask" in df.columns:
        df["mask"] = [_resolve(p, base) if isinstance(p, str) and p else None for p in df["mask"]]
    df["patient_id"] = patient_ids(df)
    if text_column != "report" and text_column in df.columns:
        df["report"] = df[text_column]
    return df


def _resolve(path: object, base: Path) -> str:
    text = str(path)
    return text if os.path.isabs(text) else str(base / text)


def patient_ids(df: pd.DataFrame) -> list[str]:
    """``patient_id``, falling back row by row to ``series_id`` and then to ``path``."""
    out = []
    for i in range(len(df)):
        value = ""
        for col in ("patient_id", "series_id", "path"):
            if col in df.columns:
                v = df[col].iloc[i]
                if v is not None and not (isinstance(v, float) and pd.isna(v)) and str(v) != "":
                    value = str(v)
                    break
        out.append(value)
    return out


def split_of(patient_id: str, fractions: dict[str, float] | None = None, seed: int = 0) -> str:
    """The split of one patient: a stable hash of ``(seed, patient_id)`` placed on the cumulative fractions."""
    fractions = fractions or DEFAULT_SPLITS
    total = sum(fractions.values())
    if total <= 0:
        raise ValueError(f"split fractions {fractions} must sum to a positive number")
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    acc = 0.0
    names = list(fractions)
    for name in names:
        acc += fractions[name] / total
        if u < acc:
            return name
    return names[-1]


def parse_fractions(text: str | Sequence[float], names: Sequence[str] = ("train", "val", "test")) -> dict[str, float]:
    """``"0.8,0.1,0.1"`` or ``[0.8, 0.1, 0.1]`` -> ``{"train": 0.8, "val": 0.1, "test": 0.1}``."""
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if not values or len(values) > len(names) or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"split fractions {text!r} must be up to {len(names)} non-negative numbers, not all 0")
    return dict(zip(names, values))


def assign_splits(df: pd.DataFrame, fractions: dict[str, float] | None = None, seed: int = 0,
                  overwrite: bool = False) -> pd.DataFrame:
    """A copy with a ``split`` column set per patient (existing non-empty splits kept unless ``overwrite``).

    Raises ``ValueError`` if the result puts a patient in two splits.
    """
    df = df.copy()
    pids = patient_ids(df)
    existing = df["split"].astype("string").fillna("") if "split" in df.columns and not overwrite else None
    splits = []
    for i, pid in enumerate(pids):
        keep = existing is not None and str(existing.iloc[i]) not in ("", "<NA>")
        splits.append(str(existing.iloc[i]) if keep else split_of(pid, fractions, seed))
    df["split"] = splits
    check_patient_splits(df)
    return df


def check_patient_splits(df: pd.DataFrame) -> None:
    """Raise ``ValueError`` naming the patients that appear in more than one split."""
    if "split" not in df.columns:
        return
    pids = patient_ids(df)
    seen: dict[str, set[str]] = {}
    for pid, split in zip(pids, df["split"].astype(str)):
        seen.setdefault(pid, set()).add(split)
    leaks = {pid: sorted(s) for pid, s in seen.items() if len(s) > 1}
    if leaks:
        sample = ", ".join(f"{pid} in {s}" for pid, s in list(leaks.items())[:5])
        raise ValueError(f"{len(leaks)} patient(s) appear in more than one split: {sample}")


def select_split(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of ``split`` ("" = all rows); the error lists the splits the manifest has."""
    if not split:
        return df
    if "split" not in df.columns:
        raise ValueError(f"data.split='{split}' but the manifest has no 'split' column")
    out = df[df["split"].astype(str) == split]
    if out.empty:
        present = sorted(df["split"].astype(str).unique())
        raise ValueError(f"data.split='{split}' selects no rows; splits present: {present}")
    return out


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write CSV or Parquet (by suffix) atomically: a temporary file, then rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix.lower() in (".parquet", ".pq"):
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def rows_as_dicts(df: pd.DataFrame, columns: Iterable[str]) -> list[dict]:
    """Row dicts restricted to ``columns`` present in ``df``, NaN/None dropped."""
    cols = [c for c in columns if c in df.columns]
    out = []
    for rec in df[cols].to_dict("records"):
        out.append({k: v for k, v in rec.items() if v is not None and not (isinstance(v, float) and pd.isna(v))})
    return out
