"""Labelled evaluation sets: images with a class label, a split and their series and patient.

A *labelled set* is a list of images with a class label, a split (train/val/test) and optionally
the series (volume) and patient each image belongs to. It comes from

* a manifest (CSV/TSV, JSON lines or Parquet) with columns ``path`` and a label column (``label``
  by default, any column via ``label_column``), and optionally ``split``, ``series`` (or
  ``series_id``/``series_uid``/``volume``), ``patient`` (or ``patient_id``) and ``slice`` (the index
  of the slice to take from a volume file); relative paths are relative to the manifest's folder;
* or a folder whose subfolder names are the labels (``root/<label>/...``), optionally split
  (``root/<train|val|test>/<label>/...``);
* or a MedMNIST ``.npz`` (:func:`medmnist_items`): its rows with the file's own train/val/test split. Multi-label
  files (``(N, L)`` labels, ``L > 1``) give every item its 0/1 ``targets`` (what the ``multilabel`` probe reads)
  and, for the single-label tasks, the label ``any`` (some label is 1) or ``none``; a 3-D file gives each volume
  three items, the central slices across its three axes, which the evaluation averages into one feature per
  volume (:attr:`LabelledSet.aggregate` = ``series``).

Without a split, one is drawn (:func:`assign_splits`): grouped by patient, else by series, so
slices of one volume never straddle train and test, and stratified by label.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

FeatureKind = Literal["cls", "mean_patch", "both"]
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_SERIES_COLUMNS = ("series", "series_id", "series_uid", "volume")
_PATIENT_COLUMNS = ("patient", "patient_id", "subject")
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test", "eval": "test"}


@dataclass
class LabelledItem:
    """One labelled image."""

    path: str  # absolute path of the image (or volume) file
    label: str  # class name
    split: str = ""  # train|val|test ("" until assigned)
    series: str = ""  # series/volume id ("" = the image is its own series)
    patient: str = ""  # patient id ("" = unknown)
    slice_index: int | None = None  # slice of a volume file to take (None: the file is a 2-D image)
    index: int | None = None  # row of split ``split`` in an array file (MedMNIST .npz); None: ``path`` is the image
    axis: int | None = None  # array-file volumes: the axis (0, 1, 2) whose central slice is taken
    targets: tuple[int, ...] | None = None  # multi-label sets: one 0/1 value per label (``LabelledSet.target_names``)


@dataclass
class LabelledSet:
    """Images with class labels and train/val/test roles."""

    items: list[LabelledItem]
    source: str = ""  # the manifest or folder it came from
    target_names: list[str] = field(default_factory=list)  # multi-label sets: the names of the labels of ``targets``
    aggregate: str = ""  # "series": items are views of one volume, evaluated as one feature per series (3-D MedMNIST)

    @property
    def classes(self) -> list[str]:
        """Sorted class names; integer labels index this list."""
        return sorted({it.label for it in self.items}, key=_natural_key)

    @property
    def labels(self) -> np.ndarray:
        """Integer class index of every item."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[it.label] for it in self.items], dtype=np.int64)

    @property
    def splits(self) -> np.ndarray:
        """Split name of every item."""
        return np.array([it.split for it in self.items])

    @property
    def targets(self) -> np.ndarray | None:
        """The ``(N, L)`` int64 0/1 labels of a multi-label set (``target_names`` names the columns); None otherwise."""
        if not self.target_names:
            return None
        return np.array([it.targets for it in self.items], dtype=np.int64).reshape(len(self.items), -1)

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        """One line per split: counts per class (per volume when the set's items are views of volumes); a
        multi-label set adds how many labels it has."""
        lines = []
        for split in SPLITS:
            members = [it for it in self.items if it.split == split]
            if self.aggregate == "series":  # one count per volume, not per view
                members = list({it.series: it for it in members}.values())
            counts = Counter(it.label for it in members)
            if counts:
                lines.append(f"{split}: " + ", ".join(f"{c}={counts[c]}" for c in self.classes if counts[c]))
        if self.target_names:
            lines.append(f"{len(self.target_names)} labels per image (any = some label is 1)")
        if self.aggregate == "series":
            lines.append("counts are volumes")
        return "; ".join(lines)

    def signature(self) -> str:
        """Hash of the items and their files' sizes and modification times (part of the feature-cache key)."""
        h = hashlib.sha256()
        for it in self.items:
            try:
                st = os.stat(it.path)
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            extra = "" if it.index is None else f"|{it.index}|{it.axis}|{it.targets}"  # array-file rows only
            h.update(f"{it.path}|{it.label}|{it.split}|{it.series}|{it.slice_index}|{stamp}{extra}\n".encode())
        return h.hexdigest()[:16]


def load_labelled_set(
    spec: str | Path,
    label_column: str = "label",
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> LabelledSet:
    """Read a labelled set from a manifest file, a label-per-subfolder image folder or a MedMNIST ``.npz`` (see
    module docstring).

    Items without a split get one from :func:`assign_splits` with ``split_fractions`` and ``seed`` (a MedMNIST
    file's items all have the file's split).
    """
    path = Path(spec)
    if not str(spec):
        raise ValueError("no labelled data given (set eval.data or pass --data)")
    if not path.exists():
        raise FileNotFoundError(f"labelled data '{path}' does not exist")
    if path.is_file() and path.suffix.lower() == ".npz":
        return medmnist_items(path)
    items = _read_folder(path) if path.is_dir() else _read_manifest(path, label_column)
    if not items:
        raise ValueError(f"labelled data '{path}' holds no images")
    missing = [it for it in items if not it.split]
    if missing:
        splits = assign_splits(
            [it.label for it in missing], [_group_of(it) for it in missing], split_fractions, seed
        )
        for it, s in zip(missing, splits):
            it.split = s
    return LabelledSet(items, source=str(path))


#: The single label a multi-label item gets for the single-label tasks (knn, linear, health, baselines).
ANY_LABEL, NO_LABEL = "any", "none"


def medmnist_items(path: str | Path) -> LabelledSet:
    """The labelled set of a MedMNIST ``.npz`` (:mod:`medfoundry.data.readers.medmnist`), splits as stored.

    * single-label files (``(N, 1)`` labels: binary, multi-class, ordinal): label = the class index as text;
    * multi-label files (``(N, L)``, ``L > 1``, e.g. ChestMNIST's 14 findings): ``targets`` = the row's 0/1
      labels, named ``"0"`` .. ``"L-1"`` like MedMNIST's ``INFO[...]["label"]`` keys, and label ``any`` when some
      label is 1, else ``none`` (ChestMNIST: any finding against no finding), which is what the single-label
      tasks see;
    * 3-D files: each volume ``(D, H, W)`` gives three items, its central slice across each axis (``axis`` 0, 1,
      2), sharing the volume's series id; the set's ``aggregate`` is ``series``, so the evaluation averages the
      three slices' features into one feature per volume (the stated 2-D protocol for 3-D MedMNIST; the file does
      not say which axis is axial, so all three are used alike).

    A file that is not in the published layout raises :class:`~medfoundry.data.readers.base.ReaderError` naming
    the file and the key.
    """
    from medfoundry.data.readers.medmnist import SPLITS as FILE_SPLITS
    from medfoundry.data.readers.medmnist import open_medmnist

    f = open_medmnist(path)
    p = str(Path(path).resolve())
    names = [str(i) for i in range(f.n_labels)] if f.multi_label else []
    axes = (0, 1, 2) if f.volumetric else (None,)
    items: list[LabelledItem] = []
    for split in FILE_SPLITS:
        for row, values in enumerate(f.labels(split)):
            if f.multi_label:
                targets: tuple[int, ...] | None = tuple(int(v) for v in values)
                label = ANY_LABEL if any(targets) else NO_LABEL
            else:
                targets, label = None, str(int(values[0]))
            series = f"{split}/{row}" if f.volumetric else ""
            items.extend(LabelledItem(p, label, split, series=series, index=row, axis=axis, targets=targets)
                         for axis in axes)
    if not items:
        raise ValueError(f"labelled data '{path}' holds no images")
    return LabelledSet(items, source=str(path), target_names=names, aggregate="series" if f.volumetric else "")


def _natural_key(name: str) -> tuple:
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def _group_of(it: LabelledItem) -> str:
    return it.patient or it.series or it.path


def _read_folder(root: Path) -> list[LabelledItem]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    split_dirs = [p for p in subdirs if _SPLIT_ALIASES.get(p.name.lower(), p.name.lower()) in SPLITS]
    items: list[LabelledItem] = []
    if split_dirs:
        for sd in split_dirs:
            split = _SPLIT_ALIASES.get(sd.name.lower(), sd.name.lower())
            items.extend(_label_dirs(sd, split))
    else:
        items.extend(_label_dirs(root, ""))
    return items


def _label_dirs(root: Path, split: str) -> list[LabelledItem]:
    out = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.rglob("*")):
            if f.is_file() and (f.suffix.lower() in IMAGE_SUFFIXES or f.suffix.lower() == ".dcm"):
                series = str(f.parent.relative_to(label_dir)) if f.parent != label_dir else ""
                out.append(LabelledItem(str(f.resolve()), label_dir.name, split, series=series))
    return out


def _read_manifest(path: Path, label_column: str) -> list[LabelledItem]:
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif suffix == ".tsv":
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    elif suffix in (".jsonl", ".json"):
        df = pd.read_json(path, lines=suffix == ".jsonl", dtype=False).astype(str)
    elif suffix == ".parquet":
        df = pd.read_parquet(path).astype(str)
    else:
        raise ValueError(f"{path}: unsupported manifest type '{suffix}' (use .csv, .tsv, .jsonl or .parquet)")
    if "path" not in df.columns:
        raise ValueError(f"{path}: the manifest needs a 'path' column; it has {list(df.columns)}")
    if label_column not in df.columns:
        raise ValueError(
            f"{path}: no label column '{label_column}' (eval.label_column / --label-column); "
            f"columns: {list(df.columns)}"
        )
    series_col = next((c for c in _SERIES_COLUMNS if c in df.columns), None)
    patient_col = next((c for c in _PATIENT_COLUMNS if c in df.columns), None)
    base = path.parent
    items = []
    for row in df.to_dict("records"):
        label = str(row[label_column]).strip()
        if label in ("", "nan", "None"):
            continue  # unlabelled rows are not evaluated
        p = Path(row["path"])
        p = p if p.is_absolute() else base / p
        split = str(row.get("split", "") or "").strip().lower()
        split = _SPLIT_ALIASES.get(split, split)
        if split and split not in SPLITS:
            raise ValueError(f"{path}: split '{split}' of {p} is not one of {SPLITS}")
        raw_slice = str(row.get("slice", "") or "").strip()
        items.append(
            LabelledItem(
                str(p.resolve()),
                label,
                split,
                series=str(row[series_col]) if series_col else "",
                patient=str(row[patient_col]) if patient_col else "",
                slice_index=int(float(raw_slice)) if raw_slice not in ("", "nan") else None,
            )
        )
    return items


def assign_splits(labels: Sequence[str], groups: Sequence[str], fractions: Sequence[float], seed: int = 0) -> list[str]:
    """Grouped, label-stratified train/val/test assignment.

    Every group (patient or series) goes wholly to one split. Groups are stratified by their
    majority label: within each label the groups are shuffled with ``seed`` and each goes to the
    split in which the midpoint of its images falls along the cumulative ``fractions`` (train, val,
    test). A label with two or more groups always gets one in test (if its fraction is positive),
    and one with three or more also one in val, so small classes appear in every split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers (train, val, test), got {fractions}")
    total = float(sum(fractions))
    frac = [f / total for f in fractions]
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_label: dict[str, list[str]] = defaultdict(list)
    for g, idx in members.items():
        majority = Counter(labels[i] for i in idx).most_common()
        top = max(n for _, n in majority)
        by_label[sorted(lab for lab, n in majority if n == top)[0]].append(g)
    rng = np.random.default_rng(seed)
    out = [""] * len(labels)
    for label in sorted(by_label):
        gs = sorted(by_label[label])
        rng.shuffle(gs)
        sizes = [len(members[g]) for g in gs]
        n_total = sum(sizes)
        order = _deal(sizes, frac, n_total)
        for g, split in zip(gs, order):
            for i in members[g]:
                out[i] = split
    return out


def _deal(sizes: list[int], frac: list[float], n_total: int) -> list[str]:
    roles, seen = [], 0
    for s in sizes:  # a group goes to the split its midpoint (in cumulative images) falls into
        pos = (seen + s / 2) / max(1, n_total)
        roles.append("train" if pos < frac[0] else "val" if pos < frac[0] + frac[1] else "test")
        seen += s
    n = len(roles)
    if frac[2] > 0 and n >= 2 and "test" not in roles:
        roles[-1] = "test"
    if frac[1] > 0 and n >= 3 and "val" not in roles:
        train_idx = [i for i, r in enumerate(roles) if r == "train"]
        if len(train_idx) > 1:
            roles[train_idx[-1]] = "val"
    return roles
