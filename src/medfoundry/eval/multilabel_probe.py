"""Multi-label linear probing of frozen features: one logistic regression per label, per-label and mean AUC.

The protocol is the linear probe's (:mod:`medfoundry.eval.linear_probe`: features standardised on train,
L2-regularised L-BFGS logistic regression, ``C`` swept over ``DEFAULT_CS`` and chosen on val, the model fitted
on train alone reported on test) applied one-vs-rest: label ``l`` gets its own binary model on the ``(N, L)`` 0/1
targets. One ``C`` serves every label, chosen by the mean validation AUC over the labels that have both values in
train and val (a single linear head, as the probes of CLIP and DINOv2 sweep one ``C``; choosing ``C`` per label
on a val split with a handful of positives of a rare finding would fit val noise). Test metrics follow MedMNIST's
evaluator for its multi-label subset (``medmnist/evaluator.py``: the mean over labels of each label's ROC AUC):
each label's AUC with a percentile-bootstrap interval, and their mean with an interval from resampling test
images (all labels of an image together).

A label that takes one value on every image of a split cannot be scored there: on train it has no model and its
AUC is ``nan``; on val it takes no part in choosing ``C``; on test its AUC is ``nan`` and the mean averages the
labels that could be scored (``multilabel_labels_scored`` of ``multilabel_n_labels``). The split-warning rule
``single_class_label`` (:mod:`medfoundry.eval.split_warnings`) says so wherever the labelled set is checked.

On a single-label set (no ``targets``) the probe runs on the classes one-vs-rest (a binary set: the positive, i.e.
second, class alone), which gives MedMNIST's multi-class AUC definition with one binary model per class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from .linear_probe import DEFAULT_CS, _feats
from .metrics import ArrayLike, _to_numpy, auc_roc, bootstrap_ci

if TYPE_CHECKING:
    from medfoundry.eval.features import FeatureSet
    from medfoundry.eval.registry import EvalInputs

__all__ = ["multilabel_metrics", "multilabel_probe", "run_task", "targets_of"]


def _targets(y: ArrayLike, n: int, name: str) -> np.ndarray:
    arr = _to_numpy(y)
    arr = arr.reshape(arr.shape[0], -1) if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"{name} must be (n_samples, n_labels) with {n} rows, got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold 0/1 values only")
    return arr.astype(np.int64)


def _both(y: np.ndarray) -> bool:
    return np.unique(y).size == 2


def _label_aucs(y: np.ndarray, p: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    return np.array([auc_roc(y[:, j], p[:, j]) if _both(y[:, j]) else np.nan for j in labels], dtype=np.float64)


def multilabel_probe(
    train_feats: ArrayLike,
    train_targets: ArrayLike,
    val_feats: ArrayLike | None,
    val_targets: ArrayLike | None,
    test_feats: ArrayLike,
    test_targets: ArrayLike,
    label_names: Sequence[str] | None = None,
    Cs: Sequence[float] | np.ndarray = DEFAULT_CS,
    seed: int = 0,
    n_bootstrap: int = 200,
    max_iter: int = 1000,
    val_frac: float = 0.2,
) -> dict[str, Any]:
    """One-vs-rest logistic-regression probe of ``(N, L)`` 0/1 targets (see the module doc for the protocol).

    Without ``val_feats`` a random ``val_frac`` of train (drawn with ``seed``; multi-label rows cannot be
    stratified) chooses ``C``. Returns ``per_label`` (``{name: (auc, ci_low, ci_high)}``, ``nan`` where undefined),
    ``mean_auc`` with ``mean_auc_ci_low``/``_ci_high``, ``best_C``, ``val_score`` (mean val AUC at ``best_C``,
    ``nan`` when no label could be scored on val: ``C`` is then the sweep's value nearest 1), ``val_scores``
    (``{C: score}``), ``n_labels``, ``n_scored`` (labels with a finite test AUC), ``unfit`` (labels with one value
    in train), ``n_train``, ``n_val``, ``n_test``.
    """
    x_train, x_test = _feats(train_feats, "train_feats"), _feats(test_feats, "test_feats")
    y_train = _targets(train_targets, x_train.shape[0], "train_targets")
    y_test = _targets(test_targets, x_test.shape[0], "test_targets")
    if (val_feats is None) != (val_targets is None):
        raise ValueError("give both val_feats and val_targets, or neither")
    if val_feats is None:
        order = np.random.default_rng(seed).permutation(x_train.shape[0])
        n_val = max(1, int(round(val_frac * x_train.shape[0])))
        x_val, y_val = x_train[order[:n_val]], y_train[order[:n_val]]
        x_train, y_train = x_train[order[n_val:]], y_train[order[n_val:]]
    else:
        x_val = _feats(val_feats, "val_feats")
        y_val = _targets(val_targets, x_val.shape[0], "val_targets")
    n_labels = y_train.shape[1]
    if y_val.shape[1] != n_labels or y_test.shape[1] != n_labels:
        raise ValueError(f"train, val and test targets disagree in label count: {n_labels}, {y_val.shape[1]}, "
                         f"{y_test.shape[1]}")
    names = [str(n) for n in label_names] if label_names is not None else [str(j) for j in range(n_labels)]
    if len(names) != n_labels:
        raise ValueError(f"{len(names)} label names for {n_labels} labels")
    Cs = np.sort(np.asarray(Cs, dtype=np.float64).reshape(-1))
    if Cs.size == 0 or np.any(Cs <= 0):
        raise ValueError("Cs must be a non-empty sequence of positive values")

    scaler = StandardScaler().fit(x_train)
    z_train, z_val, z_test = scaler.transform(x_train), scaler.transform(x_val), scaler.transform(x_test)
    fit = [j for j in range(n_labels) if _both(y_train[:, j])]
    on_val = [j for j in fit if _both(y_val[:, j])]
    models = {j: LogisticRegression(solver="lbfgs", max_iter=max_iter, warm_start=True, random_state=seed)
              for j in fit}  # warm-started along the ascending C sweep
    val_scores: dict[float, float] = {}
    best_C, best_score = float(Cs[np.argmin(np.abs(np.log(Cs)))]), -np.inf
    best_test: np.ndarray | None = None
    for C in Cs:
        p_val, p_test = np.zeros(y_val.shape), np.full(y_test.shape, np.nan)
        for j, model in models.items():
            model.set_params(C=float(C)).fit(z_train, y_train[:, j])
            p_val[:, j] = model.predict_proba(z_val)[:, 1]
            p_test[:, j] = model.predict_proba(z_test)[:, 1]
        score = float(np.nanmean(_label_aucs(y_val, p_val, on_val))) if on_val else float("nan")
        val_scores[float(C)] = score
        if np.isfinite(score) and score > best_score:
            best_C, best_score, best_test = float(C), score, p_test
        elif not on_val and float(C) == best_C:
            best_test = p_test
    if best_test is None:  # no model at all (no label has both values in train)
        best_test = np.full(y_test.shape, np.nan)

    per_label: dict[str, tuple[float, float, float]] = {}
    for j, name in enumerate(names):
        if j in models and _both(y_test[:, j]):
            per_label[name] = bootstrap_ci(y_test[:, j], best_test[:, j], auc_roc, n_bootstrap=n_bootstrap, seed=seed)
        else:
            per_label[name] = (float("nan"),) * 3
    scored = [j for j, name in enumerate(names) if np.isfinite(per_label[name][0])]
    mean_auc = float(np.mean([per_label[names[j]][0] for j in scored])) if scored else float("nan")
    low = high = float("nan")
    if scored and n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        values = []
        for _ in range(n_bootstrap):
            idx = rng.integers(0, y_test.shape[0], size=y_test.shape[0])
            aucs = _label_aucs(y_test[idx], best_test[idx], scored)
            if np.all(np.isfinite(aucs)):  # a resample in which some scored label lost its positives is skipped
                values.append(float(aucs.mean()))
        if values:
            low, high = (float(v) for v in np.quantile(values, [0.025, 0.975]))
    return {
        "per_label": per_label, "mean_auc": mean_auc, "mean_auc_ci_low": low, "mean_auc_ci_high": high,
        "best_C": best_C, "val_score": float(best_score) if np.isfinite(best_score) else float("nan"),
        "val_scores": val_scores, "n_labels": n_labels, "n_scored": len(scored),
        "unfit": [names[j] for j in range(n_labels) if j not in models],
        "n_train": int(z_train.shape[0]), "n_val": int(z_val.shape[0]), "n_test": int(z_test.shape[0]),
    }


# -- the registered task ``multilabel`` (medfoundry.eval.registry) -------------------------------------------------
def targets_of(fs: FeatureSet) -> tuple[np.ndarray, list[str]]:
    """The ``(N, L)`` 0/1 targets of a feature set and their names: a multi-label set's own, else its classes
    one-hot (a two-class set: the second class alone, whose AUC is the binary AUC)."""
    if fs.targets is not None:
        return np.asarray(fs.targets, dtype=np.int64), list(fs.target_names) or [str(j) for j in
                                                                                range(fs.targets.shape[1])]
    classes = list(fs.classes)
    cols = [1] if len(classes) == 2 else list(range(len(classes)))
    return (fs.labels[:, None] == np.asarray(cols)[None, :]).astype(np.int64), [str(classes[c]) for c in cols]


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name)


def multilabel_metrics(fs: FeatureSet, n_bootstrap: int = 200, seed: int = 0) -> dict[str, float]:
    """Multi-label probe: train split to fit, val split (or 20 % of train) to choose C, test split to report.

    Keys: ``multilabel_mean_auc`` (+ ``_ci_low``/``_ci_high``), ``multilabel_auc_<label>`` (+ bounds) per label,
    ``multilabel_best_C``, ``val_multilabel_mean_auc``, ``multilabel_n_labels``, ``multilabel_labels_scored``.
    """
    if not fs.has("train") or not fs.has("test"):
        raise ValueError(
            f"the multi-label probe needs a train and a test split; the labelled set has {sorted(set(fs.splits))}"
        )
    y, names = targets_of(fs)
    tr, te, va = fs.splits == "train", fs.splits == "test", fs.splits == "val"
    has_val = bool(va.any())
    res = multilabel_probe(fs.feats[tr], y[tr], fs.feats[va] if has_val else None, y[va] if has_val else None,
                           fs.feats[te], y[te], names, seed=seed, n_bootstrap=n_bootstrap)
    out = {"multilabel_mean_auc": res["mean_auc"], "multilabel_mean_auc_ci_low": res["mean_auc_ci_low"],
           "multilabel_mean_auc_ci_high": res["mean_auc_ci_high"]}
    for name, (auc, low, high) in res["per_label"].items():
        key = f"multilabel_auc_{_key(name)}"
        out.update({key: auc, f"{key}_ci_low": low, f"{key}_ci_high": high})
    out.update(multilabel_best_C=res["best_C"], val_multilabel_mean_auc=res["val_score"],
               multilabel_n_labels=float(res["n_labels"]), multilabel_labels_scored=float(res["n_scored"]))
    return {k: float(v) for k, v in out.items()}


def run_task(inputs: EvalInputs) -> dict[str, float]:
    """``multilabel``: :func:`multilabel_metrics` with the settings' bootstrap resamples and seed."""
    assert inputs.features is not None
    return multilabel_metrics(inputs.features, inputs.settings.n_bootstrap, inputs.settings.seed)
