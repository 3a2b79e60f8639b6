"""Weighted k-nearest-neighbour classification on frozen features.

This is the protocol of DINO (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021, ``eval_knn.py``): features are L2-normalised, similarity is the cosine
(a dot product of unit vectors), each test sample votes with its ``k`` most similar training
samples, and a neighbour with similarity ``s`` contributes ``exp(s / T)`` to its class (T = 0.07).
It needs no training and no hyper-parameter search, which makes it a cheap, low-variance probe
to track during pre-training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .metrics import (
    ArrayLike,
    _auto_chunk,
    _l2_normalize,
    _to_float_tensor,
    _to_labels,
    accuracy,
    auc_roc,
    balanced_accuracy,
    bootstrap_ci,
)

if TYPE_CHECKING:
    from medfoundry.eval.features import FeatureSet
    from medfoundry.eval.registry import EvalInputs

__all__ = ["knn_classify", "knn_evaluate", "knn_metrics", "run_task"]


def _neighbours(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    k: int,
    num_classes: int | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cosine similarities and labels of the ``k`` nearest training samples, sorted by similarity.

    Returns ``(top_sim, top_labels, num_classes)`` with ``top_*`` of shape ``(n_test, min(k, n_train))``.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    train = _to_float_tensor(train_feats)
    test = _to_float_tensor(test_feats)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"feature dims differ: train {train.shape[1]} vs test {test.shape[1]}")
    test = test.to(train.dtype)
    labels_np = _to_labels(train_labels, "train_labels")
    if labels_np.shape[0] != train.shape[0]:
        raise ValueError("train_labels length does not match train_feats")
    if labels_np.size == 0:
        raise ValueError("kNN needs at least one training sample")
    if labels_np.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    if num_classes is None:
        num_classes = int(labels_np.max()) + 1
    elif labels_np.max() >= num_classes:
        raise ValueError(f"train label {labels_np.max()} out of range for num_classes={num_classes}")
    labels = torch.from_numpy(labels_np)

    train_t = _l2_normalize(train).t().contiguous()  # (D, n_train)
    test = _l2_normalize(test)
    k_eff = min(int(k), train.shape[0])
    n_test = test.shape[0]
    top_sim = torch.empty(n_test, k_eff, dtype=train.dtype)
    top_labels = torch.empty(n_test, k_eff, dtype=torch.int64)
    step = _auto_chunk(train.shape[0], chunk_size)
    with torch.no_grad():
        for start in range(0, n_test, step):
            stop = min(start + step, n_test)
            sim = test[start:stop] @ train_t  # (chunk, n_train) cosine similarities
            vals, idx = sim.topk(k_eff, dim=1, largest=True, sorted=True)
            top_sim[start:stop] = vals
            top_labels[start:stop] = labels[idx]
    return top_sim, top_labels, num_classes


def _vote(
    top_sim: torch.Tensor, top_labels: torch.Tensor, k: int, temperature: float, num_classes: int
) -> np.ndarray:
    """DINO's weighted vote over the first ``k`` (sorted) neighbours: sum of exp(sim / T) per class."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    weights = (top_sim[:, :k] / temperature).exp()
    scores = torch.zeros(top_sim.shape[0], num_classes, dtype=top_sim.dtype)
    scores.scatter_add_(1, top_labels[:, :k], weights)
    return scores.numpy()


def knn_classify(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Class scores of DINO's temperature-weighted kNN classifier (Caron et al. 2021).

    Both feature sets are L2-normalised; for every test sample the ``k`` training samples with the
    highest cosine similarity ``s`` are retrieved and each adds ``exp(s / temperature)`` to the score
    of its label. The predicted class is the argmax of the returned ``(n_test, num_classes)`` matrix;
    dividing a row by its sum gives a probability-like score usable for AUC.

    Labels must be integer class indices in ``[0, num_classes)``; ``num_classes`` defaults to
    ``max(train_labels) + 1``. ``k`` is clipped to the number of training samples. The similarity
    matrix is computed ``chunk_size`` test rows at a time (by default sized to keep each block around
    128 MiB), so e.g. 50k x 10k problems run in bounded memory. float64 input is kept in float64;
    any other dtype is computed in float32.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    top_sim, top_labels, num_classes = _neighbours(
        train_feats, train_labels, test_feats, k, num_classes, chunk_size
    )
    return _vote(top_sim, top_labels, k, temperature, num_classes)


def knn_evaluate(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    test_labels: ArrayLike,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Weighted-kNN evaluation (DINO, Caron et al. 2021) for several ``k``: accuracy, balanced accuracy, AUC.

    For each ``k`` in ``ks`` computes the :func:`knn_classify` scores and reports, with ``k`` in the key:
    ``knn_top1_k{k}`` (accuracy), ``knn_balanced_acc_k{k}`` (mean per-class recall, robust to the
    class imbalance of medical data) and ``knn_auc_k{k}`` (AUC-ROC of the row-normalised scores:
    binary AUC for two classes, one-vs-rest macro AUC otherwise; ``nan`` if the test set has a single
    class). ``num_classes`` defaults to ``max(train_labels, test_labels) + 1``. The neighbour search
    runs once, for the largest ``k``; smaller ``k`` use the first of those sorted neighbours. With
    ``n_bootstrap > 0`` the top-1 and balanced accuracies also get percentile-bootstrap 95 % bounds over the
    test samples (``..._ci_low`` / ``..._ci_high``; :func:`~medfoundry.eval.metrics.bootstrap_ci`).
    """
    y_test = _to_labels(test_labels, "test_labels")
    y_train = _to_labels(train_labels, "train_labels")
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    ks = [int(k) for k in ks]
    if not ks:
        return {}
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    # one similarity pass for the largest k; smaller k reuse the first (sorted) neighbours
    top_sim, top_labels, num_classes = _neighbours(
        train_feats, y_train, test_feats, max(ks), num_classes, chunk_size
    )
    if top_sim.shape[0] != y_test.shape[0]:
        raise ValueError("test_labels length does not match test_feats")
    results: dict[str, float] = {}
    for k in ks:
        scores = _vote(top_sim, top_labels, k, temperature, num_classes)
        probs = scores / np.maximum(scores.sum(axis=1, keepdims=True), np.finfo(scores.dtype).tiny)
        results[f"knn_top1_k{k}"] = accuracy(y_test, probs)
        results[f"knn_balanced_acc_k{k}"] = balanced_accuracy(y_test, probs)
        results[f"knn_auc_k{k}"] = auc_roc(y_test, probs)
        if n_bootstrap > 0:
            for name, fn in (("top1", accuracy), ("balanced_acc", balanced_accuracy)):
                _, low, high = bootstrap_ci(y_test, probs, fn, n_bootstrap, seed=seed, min_classes=1)
                results[f"knn_{name}_k{k}_ci_low"], results[f"knn_{name}_k{k}_ci_high"] = low, high
    return results


# -- the registered task ``knn`` (medfoundry.eval.registry) ------------------------------------------------------
def knn_metrics(fs: FeatureSet, ks: Sequence[int] = (10, 20), temperature: float = 0.07,
                query_split: str = "test", prefix: str = "", n_bootstrap: int = 0, seed: int = 0) -> dict[str, float]:
    """Weighted kNN with the train split as memory bank and ``query_split`` as queries (``n_bootstrap``:
    bootstrap bounds of the accuracies, see :func:`knn_evaluate`)."""
    if not fs.has("train") or not fs.has(query_split):
        raise ValueError(f"kNN needs a train and a {query_split} split; the labelled set has {sorted(set(fs.splits))}")
    x_tr, y_tr = fs.subset("train")
    x_q, y_q = fs.subset(query_split)
    res = knn_evaluate(x_tr, y_tr, x_q, y_q, ks=ks, temperature=temperature, num_classes=len(fs.classes),
                       n_bootstrap=n_bootstrap, seed=seed)
    return {prefix + k: float(v) for k, v in res.items()}


def run_task(inputs: EvalInputs) -> dict[str, float]:
    """``knn``: :func:`knn_metrics` on the query split (with ``settings.val_knn`` also on val, prefixed ``val_``)."""
    fs, s = inputs.features, inputs.settings
    assert fs is not None
    out = knn_metrics(fs, s.knn_k, s.knn_temperature, s.query_split, n_bootstrap=s.knn_bootstrap, seed=s.seed)
    if s.val_knn and fs.has("val"):
        out.update(knn_metrics(fs, s.knn_k, s.knn_temperature, "val", prefix="val_"))
    return out
