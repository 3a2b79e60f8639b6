"""Slide-level evaluation end to end: tile features (cached), aggregators trained on train, selected on val,
reported on test, with the majority-class baseline and the attention heat maps of the test slides.

Metrics (one flat dict, names prefixed ``slide_``; every one of them on the **test** slides unless it says
``val``):

* per aggregator ``A`` in ``mean`` (mean pooling + the ``linear`` task's logistic-regression probe, ``C`` chosen
  on val) and ``abmil`` (gated attention MIL, Ilse et al. 2018, epoch chosen on val): ``slide_A_auc``,
  ``slide_A_accuracy``, ``slide_A_balanced_accuracy``, each with ``_ci_low`` / ``_ci_high`` (percentile bootstrap
  over test slides, :func:`medfoundry.eval.metrics.bootstrap_ci`); ``slide_mean_best_C`` and
  ``slide_mean_val_score``; ``slide_abmil_best_epoch``, ``slide_abmil_val_auc``, ``slide_abmil_val_loss``;
* the majority-class baseline on test (:func:`medfoundry.eval.majority.majority_baseline`: always answering the
  training slides' most frequent class): ``slide_majority_accuracy``, ``slide_majority_balanced_accuracy``,
  ``slide_majority_auc`` (0.5);
* sizes: ``slide_n_train``, ``slide_n_val``, ``slide_n_test``, ``slide_test_patients``, ``slide_tiles_mean``.

With an ``out_dir``, ``slide_predictions.csv`` (every slide's gated-attention class probabilities) and, per test
slide, ``heatmaps/NAME_attention.png`` (:mod:`medfoundry.eval.slide.heatmap`) and ``heatmaps/NAME_attention.npz``
(level-0 corners, weights, tile side) are written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from medfoundry.eval.linear_probe import linear_probe
from medfoundry.eval.majority import majority_baseline
from medfoundry.eval.metrics import accuracy, auc_roc, balanced_accuracy, bootstrap_ci
from medfoundry.eval.slide.cache import SlideFeatures, cached_slide_features
from medfoundry.eval.slide.context import SlideEvalContext
from medfoundry.eval.slide.fit import FittedMIL, fit_gated_attention, predict
from medfoundry.eval.slide.heatmap import save_attention_heatmap

if TYPE_CHECKING:
    from medfoundry.eval.registry import EvalInputs


@dataclass
class SlideEvaluation:
    """Everything one evaluation produced (the registered task returns only :attr:`metrics`)."""

    metrics: dict[str, float]
    bags: list[SlideFeatures]  # one per slide of the context, in manifest order
    from_cache: int  # slides whose tile features came from the cache
    fitted: FittedMIL | None = None  # the selected gated-attention model (None when abmil was not run)
    probabilities: np.ndarray | None = None  # (n_slides, C) gated-attention probabilities, manifest order
    attention: dict[str, np.ndarray] = field(default_factory=dict)  # test slide path -> tile weights
    heatmaps: list[Path] = field(default_factory=list)


def slide_bags(backbone: nn.Module, ctx: SlideEvalContext) -> tuple[list[SlideFeatures], int]:
    """Tile features of every slide of ``ctx`` (through the cache) and how many came from it."""
    bags, hits = [], 0
    for item in ctx.slides.items:
        bag, hit = cached_slide_features(backbone, ctx.identity, item.path, ctx.settings, ctx.transform,
                                         ctx.cache_dir)
        bags.append(bag)
        hits += int(hit)
    return bags, hits


def _with_ci(prefix: str, y: np.ndarray, probs: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, float]:
    scores = probs[:, 1] if probs.shape[1] == 2 else probs
    out: dict[str, float] = {}
    for name, fn, s in (("auc", auc_roc, scores), ("accuracy", accuracy, probs),
                        ("balanced_accuracy", balanced_accuracy, probs)):
        point, low, high = bootstrap_ci(y, s, fn, n_bootstrap=n_bootstrap, seed=seed)
        out.update({f"{prefix}_{name}": point, f"{prefix}_{name}_ci_low": low, f"{prefix}_{name}_ci_high": high})
    return out


def _safe_name(path: str, index: int) -> str:
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem)


def evaluate_slides(backbone: nn.Module, ctx: SlideEvalContext) -> SlideEvaluation:
    """Run the slide-level evaluation of ``ctx`` with the frozen ``backbone`` (see the module docstring).

    ``ValueError`` when a split the protocol needs is empty (train, val, test) or training holds one class.
    """
    s = ctx.settings
    s.check()
    lset = ctx.slides
    labels, splits, classes = lset.labels, lset.splits, lset.classes
    missing = [name for name in ("train", "val", "test") if not np.any(splits == name)]
    if missing:
        raise ValueError(f"{lset.source}: no {', '.join(missing)} slides ({lset.summary()}); slide evaluation trains "
                         "on train, selects on val and reports test: give each split slides (split column, or "
                         "more patients for the split by patient)")
    bags, hits = slide_bags(backbone, ctx)
    idx = {name: np.flatnonzero(splits == name) for name in ("train", "val", "test")}
    y = {name: labels[i] for name, i in idx.items()}
    test_patients = {lset.items[i].patient for i in idx["test"]}
    metrics: dict[str, float] = {f"slide_n_{name}": float(len(i)) for name, i in idx.items()}
    metrics["slide_test_patients"] = float(len(test_patients))
    metrics["slide_tiles_mean"] = float(np.mean([len(b.feats) for b in bags]))
    result = SlideEvaluation(metrics, bags, hits)
    if "mean" in s.aggregators:
        pooled = np.stack([b.feats.mean(axis=0) for b in bags]).astype(np.float64)
        res = linear_probe(pooled[idx["train"]], y["train"], pooled[idx["val"]], y["val"], pooled[idx["test"]],
                           y["test"], seed=s.seed, n_bootstrap=s.n_bootstrap)
        for name in ("auc", "accuracy", "balanced_accuracy"):
            for suffix in ("", "_ci_low", "_ci_high"):
                metrics[f"slide_mean_{name}{suffix}"] = float(res[name + suffix])
        metrics["slide_mean_best_C"] = float(res["best_C"])
        metrics["slide_mean_val_score"] = float(res["val_score"])
    if "abmil" in s.aggregators:
        feats = [b.feats for b in bags]
        fitted = fit_gated_attention([feats[i] for i in idx["train"]], y["train"], [feats[i] for i in idx["val"]],
                                     y["val"], len(classes), s)
        probs, weights = predict(fitted.model, fitted.standardiser, feats)
        metrics.update(_with_ci("slide_abmil", y["test"], probs[idx["test"]], s.n_bootstrap, s.seed))
        metrics.update(slide_abmil_best_epoch=float(fitted.best_epoch), slide_abmil_val_auc=float(fitted.val_auc),
                       slide_abmil_val_loss=float(fitted.val_loss))
        result.fitted, result.probabilities = fitted, probs
        result.attention = {lset.items[i].path: weights[i] for i in idx["test"]}
        if ctx.out_dir is not None:
            result.heatmaps = _write_outputs(ctx, bags, probs, weights, idx["test"])
    base = majority_baseline(labels, splits, classes)["by_split"].get("test", {})
    for name in ("accuracy", "balanced_accuracy", "auc"):
        metrics[f"slide_majority_{name}"] = float(base.get(name, float("nan")))
    return result


def _write_outputs(ctx: SlideEvalContext, bags: list[SlideFeatures], probs: np.ndarray, weights: list[np.ndarray],
                   test: np.ndarray) -> list[Path]:
    """``slide_predictions.csv`` and the test slides' heat maps under ``ctx.out_dir``; the heat-map paths."""
    import pandas as pd

    assert ctx.out_dir is not None
    lset, classes = ctx.slides, ctx.slides.classes
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"slide": it.path, "patient": it.patient, "split": it.split, "label": it.label,
             "predicted": classes[int(np.argmax(probs[i]))], "tiles": len(bags[i].feats),
             **{f"p_{c}": float(probs[i, k]) for k, c in enumerate(classes)}} for i, it in enumerate(lset.items)]
    pd.DataFrame(rows).to_csv(out / "slide_predictions.csv", index=False)
    (out / "heatmaps").mkdir(exist_ok=True)
    paths = []
    for i in test:
        it, bag = lset.items[i], bags[i]
        name = _safe_name(it.path, int(i))
        np.savez(out / "heatmaps" / f"{name}_attention.npz", coords=bag.coords, weights=weights[i],
                 extent0=np.float64(bag.extent0))
        p = probs[i]
        score = f"P({classes[1]}) = {p[1]:.2f}" if len(classes) == 2 else f"predicted {classes[int(np.argmax(p))]}"
        title = (f"{Path(it.path).name} (patient {it.patient}, test): label {it.label}, {score}\n"
                 f"gated attention MIL over {len(weights[i])} tiles of {ctx.settings.tile_size} px at "
                 f"{ctx.settings.tile_mpp} µm/px")
        paths.append(save_attention_heatmap(it.path, bag.coords, bag.extent0, weights[i],
                                            out / "heatmaps" / f"{name}_attention.png", title,
                                            ctx.settings.wsi_backend, ctx.settings.slide_mpp))
    return paths


def run_task(inputs: EvalInputs) -> dict[str, float]:
    """The registered task ``slide``: :func:`evaluate_slides` of ``inputs.slides`` with ``inputs.backbone``."""
    assert inputs.backbone is not None and inputs.slides is not None
    return evaluate_slides(inputs.backbone, inputs.slides).metrics
