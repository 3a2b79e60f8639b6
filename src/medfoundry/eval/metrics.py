"""Classification metrics and bootstrap confidence intervals for frozen-feature evaluation.

Medical test sets are small and often imbalanced, so every headline number should come with a
balanced metric (balanced accuracy, AUC-ROC) and a confidence interval. The percentile bootstrap
follows Efron & Tibshirani, *An Introduction to the Bootstrap* (1993); the AUC is the
Mann-Whitney U statistic (Hanley & McNeil, Radiology 1982), which equals the area under the
empirical ROC curve, ties counted as one half.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

__all__ = ["accuracy", "auc_roc", "balanced_accuracy", "bootstrap_ci"]

ArrayLike = Any  # np.ndarray | torch.Tensor | sequence of numbers

# Upper bound on the number of similarity entries materialised at once (~128 MiB in float32).
_MAX_SIM_ELEMENTS = 1 << 25


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor or sequence) as a numpy array on the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _to_float_tensor(x: ArrayLike) -> torch.Tensor:
    """Return ``x`` as a 2-D CPU float tensor (float64 kept, everything else becomes float32)."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype != torch.float64:
        t = t.float()
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D feature matrix (n_samples, dim), got shape {tuple(t.shape)}")
    return t


def _to_labels(y: ArrayLike, name: str = "labels") -> np.ndarray:
    """Return ``y`` as a 1-D int64 numpy array of class indices."""
    arr = _to_numpy(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"{name} must be integer class indices")
    return arr.astype(np.int64)


def _l2_normalize(t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise L2 normalisation (zero rows stay zero)."""
    return t / t.norm(dim=1, keepdim=True).clamp_min(eps)


def _auto_chunk(n_cols: int, chunk_size: int | None) -> int:
    """Rows per chunk so that a ``(chunk, n_cols)`` similarity block stays under the memory budget."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        return int(chunk_size)
    return max(1, _MAX_SIM_ELEMENTS // max(1, n_cols))


def _as_predictions(y_pred: ArrayLike) -> np.ndarray:
    pred = _to_numpy(y_pred)
    if pred.ndim == 2:
        return pred.argmax(axis=1).astype(np.int64)
    return _to_labels(pred, "y_pred")


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Top-1 accuracy: the fraction of samples whose predicted class equals the true class.

    ``y_pred`` is either a vector of predicted class indices or an ``(n, C)`` score matrix (argmax
    is taken), so the same function can be handed to :func:`bootstrap_ci` together with scores.
    """
    y = _to_labels(y_true, "y_true")
    pred = _as_predictions(y_pred)
    if y.shape != pred.shape:
        raise ValueError(f"y_true and y_pred disagree in length: {y.shape} vs {pred.shape}")
    if y.size == 0:
        return float("nan")
    return float(np.mean(y == pred))


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Balanced accuracy: the unweighted mean of per-class recall over the classes present in ``y_true``.

    Unlike plain accuracy it is not inflated by a majority class, which matters for the skewed label
    distributions typical of medical data (Brodersen et al., ICPR 2010). Matches
    ``sklearn.metrics.balanced_accuracy_score`` (``adjusted=False``). ``y_pred`` may be class indices
    or an ``(n, C)`` score matrix (argmax is taken).
    """
    y = _to_labels(y_true, "y_true")
    pred = _as_predictions(y_pred)
    if y.shape != pred.shape:
        raise ValueError(f"y_true and y_pred disagree in length: {y.shape} vs {pred.shape}")
    if y.size == 0:
        return float("nan")
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    return float(np.mean(recalls))


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """AUC from the Mann-Whitney rank statistic; ``pos`` is a boolean mask of positives."""
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)  # average ranks handle ties exactly like the trapezoidal ROC area
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_roc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve for binary or multi-class problems.

    Binary (labels in {0, 1}): ``scores`` is either a 1-D score for the positive class 1 or an
    ``(n, 2)`` matrix whose second column is used. Multi-class: ``scores`` is ``(n, C)`` with column
    ``c`` scoring class ``c``; the result is the one-vs-rest macro average (each class against all
    others, averaged with equal weight) as in ``sklearn.metrics.roc_auc_score(multi_class="ovr")``.
    Scores need not be normalised. Classes absent from ``y_true`` are skipped; ``nan`` is returned
    when ``y_true`` holds fewer than two classes, since the AUC is then undefined.
    """
    y = _to_labels(y_true, "y_true")
    s = _to_numpy(scores).astype(np.float64)
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"y_true and scores disagree in length: {y.shape[0]} vs {s.shape[0]}")
    present = np.unique(y)
    if present.size < 2:
        return float("nan")
    if s.ndim == 1 or (s.ndim == 2 and s.shape[1] == 1):
        if present.min() < 0 or present.max() > 1:
            raise ValueError("1-D scores require binary labels in {0, 1}")
        return _binary_auc(y == 1, s.reshape(-1))
    if s.ndim != 2:
        raise ValueError(f"scores must be 1-D or 2-D, got shape {s.shape}")
    if present.min() < 0 or present.max() >= s.shape[1]:
        raise ValueError(f"labels must index the {s.shape[1]} score columns")
    if s.shape[1] == 2:
        return _binary_auc(y == 1, s[:, 1])
    return float(np.mean([_binary_auc(y == c, s[:, c]) for c in present]))


def bootstrap_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    min_classes: int = 2,
) -> tuple[float, float, float]:
    """Point estimate and percentile-bootstrap ``(1 - alpha)`` confidence interval of a metric.

    The test set is resampled with replacement ``n_bootstrap`` times (Efron & Tibshirani 1993) and
    ``metric_fn(y_true[idx], y_score[idx])`` is evaluated on each resample; the interval is given by the
    ``alpha / 2`` and ``1 - alpha / 2`` quantiles. Resamples whose ``y_true`` holds fewer than
    ``min_classes`` distinct classes are skipped (the AUC is undefined on them; with ``min_classes=2``
    this practically never triggers for accuracy-type metrics on realistic test sets, set it to 1 to
    keep every resample), and so are resamples where the metric is not finite.

    Returns ``(point, low, high)``; ``low``/``high`` are ``nan`` when ``n_bootstrap == 0`` or no
    resample was valid. Deterministic for a given ``seed``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    y = _to_labels(y_true, "y_true")
    s = _to_numpy(y_score)
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"y_true and y_score disagree in length: {y.shape[0]} vs {s.shape[0]}")
    point = float(metric_fn(y, s))
    n = y.shape[0]
    if n_bootstrap <= 0 or n == 0:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, size=n)
        yb = y[idx]
        if min_classes > 1 and np.unique(yb).size < min_classes:
            continue
        v = float(metric_fn(yb, s[idx]))
        if np.isfinite(v):
            values.append(v)
    if not values:
        return point, float("nan"), float("nan")
    low, high = np.quantile(np.asarray(values), [alpha / 2.0, 1.0 - alpha / 2.0])
    return point, float(low), float(high)
