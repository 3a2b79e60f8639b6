"""The majority-class baseline: what always answering the training split's most frequent class scores.

A classification number means little without the floor it has to beat: on a test split where 85 % of the images
are negative, an accuracy of 0.79 is *below* answering "negative" every time. The baseline is computed from the
labels alone, on the same split as the metric it sits beside (:func:`medfoundry.eval.metric_splits.metric_split`):

* accuracy: the fraction of that split's images in the training split's most frequent class;
* balanced accuracy: 1 / (number of classes present in that split), the mean per-class recall of a constant
  answer (:func:`medfoundry.eval.metrics.balanced_accuracy`);
* AUC: 0.5 (a constant score ranks every positive-negative pair as a tie); undefined (``nan``) on a split that
  holds a single class, like every AUC there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from medfoundry.eval.labelled_set import SPLITS
from medfoundry.eval.metric_splits import classification_kind, metric_split
from medfoundry.eval.metrics import accuracy, balanced_accuracy


def majority_baseline(labels: Sequence[int] | np.ndarray, splits: Sequence[str] | np.ndarray,
                      classes: Sequence[str]) -> dict[str, Any]:
    """``{"class": name or None, "by_split": {split: {"n", "accuracy", "balanced_accuracy", "auc"}}}`` for
    always predicting the most frequent class of the ``train`` split (ties: the first in ``classes``).

    ``labels`` are class indices into ``classes``, ``splits`` the split of each. Without training images there
    is no majority class: ``class`` is None and ``by_split`` holds only the sizes.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(splits).astype(str)
    train = y[s == "train"]
    top = int(np.bincount(train, minlength=len(classes)).argmax()) if train.size else None
    by_split: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        ys = y[s == split]
        if not ys.size:
            continue
        entry: dict[str, float] = {"n": int(ys.size)}
        if top is not None:
            constant = np.full_like(ys, top)
            entry["accuracy"] = accuracy(ys, constant)
            entry["balanced_accuracy"] = balanced_accuracy(ys, constant)
            entry["auc"] = 0.5 if np.unique(ys).size >= 2 else float("nan")
        by_split[split] = entry
    return {"class": classes[top] if top is not None else None, "by_split": by_split}


def majority_metrics(baseline: dict[str, Any], keys: Iterable[str], query_split: str = "test") -> dict[str, float]:
    """The baseline under the metric names of ``keys``: each accuracy / balanced accuracy / AUC metric
    (:func:`~medfoundry.eval.metric_splits.classification_kind`) gets the baseline's value on that metric's
    split; other keys (health, view retrieval, ...) are left out."""
    by_split = baseline.get("by_split", {})
    out: dict[str, float] = {}
    for key in keys:
        kind = classification_kind(key)
        split = metric_split(key, query_split)
        if kind is not None and kind in by_split.get(split, {}):
            out[key] = float(by_split[split][kind])
    return out


def labelled_set_baseline(lset: Any) -> dict[str, Any]:
    """:func:`majority_baseline` of a :class:`~medfoundry.eval.labelled_set.LabelledSet` (or a ``FeatureSet``:
    anything with ``labels``, ``splits`` and ``classes``)."""
    return majority_baseline(lset.labels, lset.splits, lset.classes)
