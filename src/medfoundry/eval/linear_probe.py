"""Linear probing of frozen features with L2-regularised logistic regression.

The protocol follows the logistic-regression linear probe of CLIP (Radford et al., "Learning
Transferable Visual Models From Natural Language Supervision", ICML 2021: scikit-learn L-BFGS
logistic regression, inverse regularisation strength ``C`` swept on a validation split) and
DINOv2 (Oquab et al. 2023), with the test metrics that matter for medical imaging: balanced
accuracy and AUC-ROC with bootstrap confidence intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from .metrics import ArrayLike, _to_labels, _to_numpy, accuracy, auc_roc, balanced_accuracy, bootstrap_ci

if TYPE_CHECKING:
    from medfoundry.eval.features import FeatureSet
    from medfoundry.eval.registry import EvalInputs

__all__ = ["DEFAULT_CS", "linear_metrics", "linear_probe", "run_task"]

#: Default sweep of the inverse regularisation strength: ``np.logspace(-4, 2, 7)`` (1e-4 ... 1e2).
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 7))


def _feats(x: ArrayLike, name: str) -> np.ndarray:
    arr = _to_numpy(x).astype(np.float64, copy=False)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, dim), got shape {arr.shape}")
    return arr


def _encode(y: np.ndarray, classes: np.ndarray, name: str) -> np.ndarray:
    idx = np.searchsorted(classes, y)
    idx = np.clip(idx, 0, classes.size - 1)
    if not np.all(classes[idx] == y):
        unknown = np.setdiff1d(np.unique(y), classes)
        raise ValueError(f"{name} contains classes absent from the training labels: {unknown.tolist()}")
    return idx.astype(np.int64)


def _split_validation(
    x: np.ndarray, y: np.ndarray, val_frac: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_frac, random_state=seed, stratify=y)
    except ValueError:  # a class with a single sample cannot be stratified
        x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_frac, random_state=seed)
    return x_tr, x_va, y_tr, y_va


def linear_probe(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    val_feats: ArrayLike | None,
    val_labels: ArrayLike | None,
    test_feats: ArrayLike,
    test_labels: ArrayLike,
    Cs: Sequence[float] | np.ndarray = DEFAULT_CS,
    seed: int = 0,
    n_bootstrap: int = 1000,
    max_iter: int = 1000,
    val_frac: float = 0.2,
) -> dict[str, Any]:
    """Logistic-regression linear probe with validation-selected ``C`` (protocol of CLIP/DINOv2).

    Steps:

    1. If ``val_feats`` is ``None``, a stratified ``val_frac`` (20 %) of the training set, drawn with
       ``seed``, becomes the validation set and the rest the training set.
    2. Features are standardised with mean/std fitted on the (remaining) training set only.
    3. For each ``C`` in ``Cs`` an L2 ``LogisticRegression(solver="lbfgs", max_iter=max_iter)`` is fitted
       on the training set. ``C`` is chosen by validation AUC-ROC for binary problems and validation
       balanced accuracy otherwise (ties go to the smallest ``C``, i.e. the strongest regularisation).
    4. The model fitted on the training set alone with the chosen ``C`` is evaluated on the test set.
       It is deliberately *not* refitted on train+val: the reported model is exactly the one that
       was selected, and train/val/test roles stay clean for small medical datasets.

    Labels may be any integers; they are encoded by their sorted unique training values, and the
    positive class of a binary problem is the larger label. Test/val labels unseen in training raise.

    Returns a dict with ``accuracy``, ``balanced_accuracy`` and ``auc`` (binary: on the positive-class
    probability; multi-class: one-vs-rest macro), each with ``*_ci_low``/``*_ci_high`` from a
    percentile bootstrap of ``n_bootstrap`` test resamples (``nan`` when ``n_bootstrap == 0``), plus
    ``best_C``, ``selection_metric``, ``val_score``, ``val_scores`` (``{C: score}``), ``num_classes``,
    ``n_train``, ``n_val`` and ``n_test``.
    """
    x_train = _feats(train_feats, "train_feats")
    y_train_raw = _to_labels(train_labels, "train_labels")
    x_test = _feats(test_feats, "test_feats")
    y_test_raw = _to_labels(test_labels, "test_labels")
    if x_train.shape[0] != y_train_raw.shape[0] or x_test.shape[0] != y_test_raw.shape[0]:
        raise ValueError("features and labels disagree in number of samples")
    Cs = np.sort(np.asarray(Cs, dtype=np.float64).reshape(-1))
    if Cs.size == 0 or np.any(Cs <= 0):
        raise ValueError("Cs must be a non-empty sequence of positive values")

    if val_feats is None:
        if val_labels is not None:
            raise ValueError("val_labels given without val_feats")
        x_train, x_val, y_train_raw, y_val_raw = _split_validation(x_train, y_train_raw, val_frac, seed)
    else:
        if val_labels is None:
            raise ValueError("val_feats given without val_labels")
        x_val = _feats(val_feats, "val_feats")
        y_val_raw = _to_labels(val_labels, "val_labels")
        if x_val.shape[0] != y_val_raw.shape[0]:
            raise ValueError("val_feats and val_labels disagree in number of samples")

    classes = np.unique(y_train_raw)
    if classes.size < 2:
        raise ValueError("the training set needs at least two classes")
    y_train = _encode(y_train_raw, classes, "train_labels")
    y_val = _encode(y_val_raw, classes, "val_labels")
    y_test = _encode(y_test_raw, classes, "test_labels")
    binary = classes.size == 2

    scaler = StandardScaler().fit(x_train)
    z_train, z_val, z_test = scaler.transform(x_train), scaler.transform(x_val), scaler.transform(x_test)

    def _val_score(model: LogisticRegression) -> float:
        probs = model.predict_proba(z_val)
        if binary:
            auc = auc_roc(y_val, probs[:, 1])
            if np.isfinite(auc):
                return auc
        return balanced_accuracy(y_val, probs)

    selection_metric = "auc" if binary and np.unique(y_val).size == 2 else "balanced_accuracy"
    best_model: LogisticRegression | None = None
    best_score = -np.inf
    best_C = float(Cs[0])
    val_scores: dict[float, float] = {}
    for C in Cs:
        model = LogisticRegression(C=float(C), solver="lbfgs", max_iter=max_iter, random_state=seed)
        model.fit(z_train, y_train)
        score = _val_score(model)
        val_scores[float(C)] = score
        if best_model is None or score > best_score:
            best_model, best_score, best_C = model, score, float(C)
    assert best_model is not None

    probs = best_model.predict_proba(z_test)
    test_scores = probs[:, 1] if binary else probs
    results: dict[str, Any] = {}
    for name, fn, scores in (
        ("accuracy", accuracy, probs),
        ("balanced_accuracy", balanced_accuracy, probs),
        ("auc", auc_roc, test_scores),
    ):
        point, low, high = bootstrap_ci(y_test, scores, fn, n_bootstrap=n_bootstrap, seed=seed)
        results[name] = point
        results[f"{name}_ci_low"] = low
        results[f"{name}_ci_high"] = high
    results.update(
        best_C=best_C,
        selection_metric=selection_metric,
        val_score=float(best_score),
        val_scores=val_scores,
        num_classes=int(classes.size),
        n_train=int(z_train.shape[0]),
        n_val=int(z_val.shape[0]),
        n_test=int(z_test.shape[0]),
    )
    return results


# -- the registered task ``linear`` (medfoundry.eval.registry) ---------------------------------------------------
def linear_metrics(fs: FeatureSet, n_bootstrap: int = 200, seed: int = 0) -> dict[str, float]:
    """Linear probe: train split to fit, val split (or 20 % of train) to choose C, test split to report."""
    if not fs.has("train") or not fs.has("test"):
        raise ValueError(
            f"the linear probe needs a train and a test split; the labelled set has {sorted(set(fs.splits))}"
        )
    x_tr, y_tr = fs.subset("train")
    x_te, y_te = fs.subset("test")
    x_va, y_va = fs.subset("val") if fs.has("val") else (None, None)
    if x_va is not None and np.unique(y_va).size < 2 and np.unique(y_tr).size >= 2:
        x_va, y_va = None, None  # a one-class val split cannot choose C: split it off train instead
    res = linear_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, seed=seed, n_bootstrap=n_bootstrap)
    out = {}
    for name in ("accuracy", "balanced_accuracy", "auc"):
        for suffix in ("", "_ci_low", "_ci_high"):
            out[f"linear_{name}{suffix}"] = float(res[name + suffix])
    out["linear_best_C"] = float(res["best_C"])
    out["linear_val_score"] = float(res["val_score"])
    return out


def run_task(inputs: EvalInputs) -> dict[str, float]:
    """``linear``: :func:`linear_metrics` with the settings' bootstrap resamples and seed."""
    assert inputs.features is not None
    return linear_metrics(inputs.features, inputs.settings.n_bootstrap, inputs.settings.seed)
