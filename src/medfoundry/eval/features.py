"""Labelled evaluation sets and frozen-feature extraction, computed once and reused by every evaluator.

A *labelled set* is a list of images with a class label, a split (train/val/test) and optionally
the series (volume) and patient each image belongs to. It comes from

* a manifest (CSV/TSV, JSON lines or Parquet) with columns ``path`` and a label column (``label``
  by default, any column via ``label_column``), and optionally ``split``, ``series`` (or
  ``series_id``/``series_uid``/``volume``), ``patient`` (or ``patient_id``) and ``slice`` (the index
  of the slice to take from a volume file); relative paths are relative to the manifest's folder;
* or a folder whose subfolder names are the labels (``root/<label>/...``), optionally split
  (``root/<train|val|test>/<label>/...``).

Without a split, one is drawn (:func:`assign_splits`): grouped by patient, else by series, so
slices of one volume never straddle train and test, and stratified by label.

Features of the evaluated backbone are the class token, the mean of the patch tokens, or both
concatenated (``feature``), extracted from whole images resized (shorter side) and centre-cropped
to ``img_size``. :func:`cached_features` stores them on disk under a key made of the checkpoint's
identity, the labelled set's content and the extraction settings, so evaluating several tasks
(or re-running one) reads the features back instead of recomputing them. With
``aggregate="series"`` a series' slice features are averaged into one 3-D feature
(:meth:`FeatureSet.aggregate_series`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FeatureKind = Literal["cls", "mean_patch", "both"]
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_SERIES_COLUMNS = ("series", "series_id", "series_uid", "volume")
_PATIENT_COLUMNS = ("patient", "patient_id", "subject")
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test", "eval": "test"}


# ----------------------------------------------------------------------------------------------- labelled sets
@dataclass
class LabelledItem:
    """One labelled image."""

    path: str  # absolute path of the image (or volume) file
    label: str  # class name
    split: str = ""  # train|val|test ("" until assigned)
    series: str = ""  # series/volume id ("" = the image is its own series)
    patient: str = ""  # patient id ("" = unknown)
    slice_index: int | None = None  # slice of a volume file to take (None: the file is a 2-D image)


@dataclass
class LabelledSet:
    """Images with class labels and train/val/test roles."""

    items: list[LabelledItem]
    source: str = ""  # the manifest or folder it came from

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

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        """One line per split: counts per class."""
        lines = []
        for split in SPLITS:
            counts = Counter(it.label for it in self.items if it.split == split)
            if counts:
                lines.append(f"{split}: " + ", ".join(f"{c}={counts[c]}" for c in self.classes if counts[c]))
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
            h.update(f"{it.path}|{it.label}|{it.split}|{it.series}|{it.slice_index}|{stamp}\n".encode())
        return h.hexdigest()[:16]


def load_labelled_set(
    spec: str | Path,
    label_column: str = "label",
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> LabelledSet:
    """Read a labelled set from a manifest file or a label-per-subfolder image folder (see module docstring).

    Items without a split get one from :func:`assign_splits` with ``split_fractions`` and ``seed``.
    """
    path = Path(spec)
    if not str(spec):
        raise ValueError("no labelled data given (set eval.data or pass --data)")
    if not path.exists():
        raise FileNotFoundError(f"labelled data '{path}' does not exist")
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


# ----------------------------------------------------------------------------------------------- images
def read_eval_image(item: LabelledItem, slices: int = 1, slice_stride: int = 1) -> Tensor:
    """The item's image as a float32 (C, H, W) tensor in source units (pictures in [0, 1], CT in HU).

    PNG/JPEG/TIFF files are read like ``data.kind=image_folder`` reads them; volume files (DICOM,
    NIfTI, NRRD, DICOM folders) through :func:`medfoundry.data.readers.read_volume`, taking slice
    ``slice_index`` (default: the middle one) and, for 2.5D models (``slices`` > 1), its neighbours
    ``z - stride, z, z + stride ...`` as channels (replicated at the volume's ends). A grey 2-D
    picture is repeated ``slices`` times so it has the channel count a 2.5D model expects.
    """
    from medfoundry.data.sources import array_to_chw

    path = Path(item.path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from medfoundry.data.image_folder import read_image_file

        image = array_to_chw(read_image_file(path))
        if slices > 1 and image.shape[0] == 1:
            image = image.expand(slices, -1, -1).clone()
        return image
    from medfoundry.data.readers import read_volume

    vol = read_volume(path)
    z = vol.depth // 2 if item.slice_index is None else item.slice_index
    if not 0 <= z < vol.depth:
        raise IndexError(f"{path}: slice {z} out of range (depth {vol.depth})")
    half = slices // 2
    zs = [min(max(z + (k - half) * slice_stride, 0), vol.depth - 1) for k in range(slices)]
    arr = vol.array[zs]  # (slices, Y, X) or (slices, Y, X, C)
    if arr.ndim == 4:  # colour volume: channels of the centre slice
        return array_to_chw(arr[half])
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


@dataclass
class EvalTransform:
    """Whole-image evaluation preprocessing: intensity mapping (deterministic), resize + centre crop, normalisation.

    ``intensity`` maps source units to [0, 1] and to ``channels`` channels (the run's
    ``data.intensity`` with random HU windows switched off); without it the image is only matched
    to ``channels`` (grey repeated, RGB averaged).
    """

    img_size: int
    mean: list[float]
    std: list[float]
    channels: int = 1
    intensity: Callable[[Tensor], Tensor] | None = None
    intensity_desc: str = ""  # stable description of ``intensity`` for cache keys
    slices: int = 1  # 2.5D: slices stacked as channels before the intensity mapping
    slice_stride: int = 1

    def map_intensity(self, image: Tensor) -> Tensor:
        """Source units -> [0, 1] with ``channels`` channels (before resizing and normalisation)."""
        from medfoundry.data.sources import to_channels

        if self.intensity is not None:
            return self.intensity(image)
        return to_channels(image, self.channels, "evaluation image")

    def __call__(self, image: Tensor) -> Tensor:
        image = resize_center_crop(self.map_intensity(image), self.img_size)
        c = image.shape[0]
        mean = torch.tensor(_per_channel(self.mean, c), dtype=image.dtype).view(c, 1, 1)
        std = torch.tensor(_per_channel(self.std, c), dtype=image.dtype).view(c, 1, 1)
        return (image - mean) / std

    def load(self, item: LabelledItem) -> Tensor:
        """Read and preprocess one item."""
        return self(read_eval_image(item, self.slices, self.slice_stride))

    def settings(self) -> dict:
        """What determines the output (for cache keys)."""
        desc = self.intensity_desc or ("" if self.intensity is None else type(self.intensity).__name__)
        return {"img_size": self.img_size, "mean": list(self.mean), "std": list(self.std), "channels": self.channels,
                "intensity": desc, "slices": self.slices, "slice_stride": self.slice_stride}


def resize_center_crop(image: Tensor, size: int) -> Tensor:
    """Resize (C, H, W) so the shorter side is ``size`` (bilinear, antialiased), then centre-crop to a square."""
    _, h, w = image.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[:, top : top + size, left : left + size].contiguous()


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    if len(values) == channels:
        return list(values)
    if len(values) == 1:
        return list(values) * channels
    if channels == 1:
        return [float(np.mean(values))]
    raise ValueError(f"{len(values)} normalisation values for {channels} channels")


def build_eval_intensity(cfg: Any, deterministic: bool = True) -> tuple[Callable[[Tensor], Tensor] | None, str]:
    """The run's intensity transform (random HU windows off when ``deterministic``) and a stable description."""
    import copy

    try:
        from medfoundry.data.intensity import build_intensity_transform
    except ModuleNotFoundError:
        return None, ""
    data = copy.copy(cfg.data)
    if deterministic and hasattr(data, "random_window_prob"):
        data.random_window_prob = 0.0
    keys = ("intensity", "value_range", "windows", "channels", "slices")
    desc = json.dumps({k: getattr(data, k) for k in keys if hasattr(data, k)}, sort_keys=True)
    return build_intensity_transform(data), desc


def eval_transform_from_config(cfg: Any, img_size: int = 0) -> EvalTransform:
    """The evaluation transform of a run config: its intensity mapping and normalisation, size ``eval.img_size``."""
    size = img_size or cfg.eval.img_size or cfg.crops.global_size
    intensity, desc = build_eval_intensity(cfg)
    return EvalTransform(size, list(cfg.crops.mean), list(cfg.crops.std), int(cfg.data.channels), intensity, desc,
                         int(getattr(cfg.data, "slices", 1)), int(getattr(cfg.data, "slice_stride", 1)))


class _Images(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[LabelledItem], transform: EvalTransform) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform.load(self.items[i])


# ----------------------------------------------------------------------------------------------- extraction
def pool_features(out: Any, feature: FeatureKind) -> Tensor:
    """Class token, mean patch token, or both concatenated, from a :class:`BackboneOutput`."""
    if feature == "cls":
        return out.cls
    if feature == "mean_patch":
        return out.patch.mean(dim=1)
    if feature == "both":
        return torch.cat([out.cls, out.patch.mean(dim=1)], dim=-1)
    raise ValueError(f"unknown feature '{feature}'; use cls, mean_patch or both")


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.utils.data.Dataset | Sequence[Tensor],
    feature: FeatureKind = "cls",
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """(N, D) float32 features of preprocessed images (a dataset of (C, H, W) tensors) in eval mode.

    The backbone's train/eval mode is restored afterwards.
    """
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=0)
    chunks = []
    try:
        for batch in loader:
            out = backbone.forward_features(batch.to(device).float())
            chunks.append(pool_features(out, feature).float().cpu())
    finally:
        backbone.train(was_training)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy()


@dataclass
class FeatureSet:
    """Features of a labelled set with everything the evaluators need."""

    feats: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64 class indices
    splits: np.ndarray  # (N,) split names
    classes: list[str]
    paths: list[str]
    series: list[str]
    meta: dict[str, Any] = field(default_factory=dict)  # feature kind, checkpoint identity, sizes ...

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split."""
        mask = self.splits == split
        return self.feats[mask], self.labels[mask]

    def has(self, split: str) -> bool:
        """Whether the split holds any sample."""
        return bool(np.any(self.splits == split))

    def aggregate_series(self) -> FeatureSet:
        """One feature per series: the mean of its slices' features (3-D evaluation).

        The series' label is its slices' most common label (ties: the higher class index, so a
        series with as many tumour as normal slices counts as tumour) and its split the slices'
        most common split. Items without a series id stay single.
        """
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(self.series):
            groups[s or f"__item{i}"].append(i)
        feats, labels, splits, paths, series = [], [], [], [], []
        for key, idx in groups.items():
            feats.append(self.feats[idx].mean(axis=0))
            counts = Counter(int(v) for v in self.labels[idx])
            top = max(counts.values())
            labels.append(max(c for c, n in counts.items() if n == top))
            splits.append(Counter(self.splits[idx].tolist()).most_common(1)[0][0])
            paths.append(self.paths[idx[0]])
            series.append(key)
        meta = dict(self.meta, aggregate="series")
        return FeatureSet(
            np.stack(feats).astype(np.float32), np.array(labels, dtype=np.int64), np.array(splits),
            list(self.classes), paths, series, meta,
        )


def compute_feature_set(
    backbone: nn.Module,
    lset: LabelledSet,
    transform: EvalTransform,
    feature: FeatureKind = "cls",
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> FeatureSet:
    """Extract the features of every item of ``lset`` (no caching)."""
    feats = extract_features(backbone, _Images(lset.items, transform), feature, batch_size, device)
    return FeatureSet(
        feats=feats,
        labels=lset.labels,
        splits=lset.splits,
        classes=lset.classes,
        paths=[it.path for it in lset.items],
        series=[it.series for it in lset.items],
        meta={"feature": feature, **transform.settings()},
    )


def feature_cache_key(identity: str, lset: LabelledSet, transform: EvalTransform, feature: str) -> str:
    """The cache key: checkpoint identity + labelled-set signature + extraction settings."""
    payload = json.dumps(
        {"identity": identity, "set": lset.signature(), "transform": transform.settings(), "feature": feature,
         "version": 1},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    """``$MEDFOUNDRY_CACHE/features`` or ``.cache/medfoundry/features`` under the working folder."""
    root = os.environ.get("MEDFOUNDRY_CACHE")
    return Path(root) / "features" if root else Path(".cache") / "medfoundry" / "features"


def cached_features(
    backbone: nn.Module,
    identity: str,
    lset: LabelledSet,
    transform: EvalTransform,
    feature: FeatureKind = "cls",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
) -> tuple[FeatureSet, bool]:
    """Features of ``lset``, read from the disk cache when the same checkpoint and set were seen before.

    ``identity`` names the weights (see :func:`medfoundry.eval.load.checkpoint_identity`); an empty
    identity disables the cache. Returns ``(features, from_cache)``. Cache files are ``KEY.npz``
    holding the features and a JSON description; they are written atomically.
    """
    if not identity:
        return compute_feature_set(backbone, lset, transform, feature, batch_size, device), False
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = feature_cache_key(identity, lset, transform, feature)
    path = folder / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                feats = data["feats"]
                meta = json.loads(str(data["meta"]))
            if feats.shape[0] == len(lset):
                return FeatureSet(
                    feats, lset.labels, lset.splits, lset.classes, [it.path for it in lset.items],
                    [it.series for it in lset.items], meta,
                ), True
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: recompute and overwrite
    fs = compute_feature_set(backbone, lset, transform, feature, batch_size, device)
    fs.meta["identity"] = identity
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.tmp-{os.getpid()}.npz"
    np.savez(tmp, feats=fs.feats, meta=np.array(json.dumps(fs.meta)))
    os.replace(tmp, path)
    return fs, False


# ----------------------------------------------------------------------------------------------- augmented views
@torch.no_grad()
def view_pair_features(
    backbone: nn.Module,
    items: Sequence[LabelledItem],
    cfg: Any,
    feature: FeatureKind = "cls",
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of two augmented views per image, for :func:`medfoundry.eval.view_retrieval_ratio`.

    The views are the run's two global crops (``cfg.crops``: random resized crop, flip and whatever
    else the recipe enables; no local crops) after the run's training intensity mapping (random HU
    windows included: they are augmentations too), drawn under a torch RNG seeded with ``seed + i``
    for image ``i`` so the protocol is reproducible.
    """
    import copy

    from medfoundry.data.multicrop import MultiCropTransform

    crops = copy.copy(cfg.crops)
    crops.n_global, crops.n_local = 2, 0
    channels = int(cfg.data.channels)
    views = MultiCropTransform(crops, channels)
    intensity, _ = build_eval_intensity(cfg, deterministic=False)
    plain = EvalTransform(crops.global_size, list(crops.mean), list(crops.std), channels, intensity)
    a, b = [], []
    for i, it in enumerate(items):
        image = read_eval_image(it, int(getattr(cfg.data, "slices", 1)), int(getattr(cfg.data, "slice_stride", 1)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            v = views(plain.map_intensity(image))["global"]
        a.append(v[0])
        b.append(v[1])
    fa = extract_features(backbone, a, feature, batch_size)
    fb = extract_features(backbone, b, feature, batch_size)
    return fa, fb
