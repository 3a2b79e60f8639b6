"""Frozen-feature extraction, computed once and reused by every evaluator.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from medfoundry.eval.eval_images import EvalImages, EvalTransform
from medfoundry.eval.labelled_set import LabelledSet
from medfoundry.models.backbone import BackboneOutput

FeatureKind = Literal["cls", "mean_patch", "both"]


def pool_features(out: BackboneOutput, feature: FeatureKind) -> Tensor:
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
    targets: np.ndarray | None = None  # (N, L) 0/1 labels of a multi-label set (None: single-label)
    target_names: list[str] = field(default_factory=list)  # names of the ``targets`` columns

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
        most common split; its multi-label ``targets`` are 1 where at least half its slices have 1. Items
        without a series id stay single.
        """
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(self.series):
            groups[s or f"__item{i}"].append(i)
        feats, labels, splits, paths, series, targets = [], [], [], [], [], []
        for key, idx in groups.items():
            if self.targets is not None:
                targets.append((self.targets[idx].mean(axis=0) >= 0.5).astype(np.int64))
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
            np.stack(targets) if self.targets is not None else None, list(self.target_names),
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
    feats = extract_features(backbone, EvalImages(lset.items, transform), feature, batch_size, device)
    return FeatureSet(
        feats=feats,
        labels=lset.labels,
        splits=lset.splits,
        classes=lset.classes,
        paths=[it.path for it in lset.items],
        series=[it.series for it in lset.items],
        meta={"feature": feature, **transform.settings()},
        targets=lset.targets,
        target_names=list(lset.target_names),
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

    ``identity`` names the weights (see :func:`medfoundry.methods.checkpoint_backbone.checkpoint_identity`); an empty
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
                    [it.series for it in lset.items], meta, lset.targets, list(lset.target_names),
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
