"""Run the frozen-feature evaluators on a :class:`~medfoundry.eval.features.FeatureSet`.

One flat ``{name: float}`` result per call, with the same names in the CLI, in-training evaluation
(logged as ``eval/<name>``), the run report and the demo:

* ``knn``: DINO's weighted kNN (bank = train split, queries = ``query_split``):
  ``knn_top1_k{k}``, ``knn_balanced_acc_k{k}``, ``knn_auc_k{k}``; with ``val_knn`` also the same
  on the val split prefixed ``val_`` (what the in-training best checkpoint is chosen by).
* ``linear``: logistic-regression probe (fit on train, ``C`` chosen on val, reported on test):
  ``linear_accuracy``, ``linear_balanced_accuracy``, ``linear_auc``, each with ``_ci_low``/``_ci_high``
  bootstrap bounds, plus ``linear_best_C`` and ``linear_val_score``.
* ``health``: representation health over all samples: ``health_active_dims``,
  ``health_active_dims_frac``, ``health_mean_pairwise_cosine``, ``health_feature_std``,
  ``health_effective_rank``, ``health_class_separation``.
* ``retrieval``: DINO-X's label-free view-retrieval ratio (top-1 of finding an image's view 2 from its
  view 1 among ``N`` images' view 2, times ``N``), computed from augmented view pairs of the images
  in ``eval.retrieval_root`` (default: the training data) by :func:`view_retrieval_metrics`:
  ``view_top1``, ``view_retrieval_ratio``, ``view_chance``, ``num_images``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medfoundry.eval.features import FeatureSet
from medfoundry.eval.health import representation_health
from medfoundry.eval.knn import knn_evaluate
from medfoundry.eval.labelled_set import LabelledSet
from medfoundry.eval.linear_probe import linear_probe
from medfoundry.eval.retrieval import dinox_view_retrieval

if TYPE_CHECKING:
    from medfoundry.eval.load import LoadedBackbone

TASKS = ("knn", "linear", "retrieval", "health")
FEATURE_TASKS = ("knn", "linear", "health")


def knn_metrics(fs: FeatureSet, ks: Sequence[int] = (10, 20), temperature: float = 0.07,
                query_split: str = "test", prefix: str = "", n_bootstrap: int = 0, seed: int = 0) -> dict[str, float]:
    """Weighted kNN with the train split as memory bank and ``query_split`` as queries (``n_bootstrap``:
    bootstrap bounds of the accuracies, see :func:`~medfoundry.eval.knn.knn_evaluate`)."""
    if not fs.has("train") or not fs.has(query_split):
        raise ValueError(f"kNN needs a train and a {query_split} split; the labelled set has {sorted(set(fs.splits))}")
    x_tr, y_tr = fs.subset("train")
    x_q, y_q = fs.subset(query_split)
    res = knn_evaluate(x_tr, y_tr, x_q, y_q, ks=ks, temperature=temperature, num_classes=len(fs.classes),
                       n_bootstrap=n_bootstrap, seed=seed)
    return {prefix + k: float(v) for k, v in res.items()}


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


def health_metrics(fs: FeatureSet) -> dict[str, float]:
    """Representation health over every sample of the set (labels give the class separation)."""
    res = representation_health(fs.feats, fs.labels if len(fs.classes) > 1 else None)
    keys = ("active_dims", "active_dims_frac", "mean_pairwise_cosine", "feature_std", "effective_rank",
            "class_separation")
    return {f"health_{k}": float(res[k]) for k in keys if k in res}


def view_retrieval_metrics(backbone, cfg, feature: str = "cls", batch_size: int = 64) -> dict[str, float]:
    """DINO-X's view-retrieval ratio of ``backbone`` on ``eval.retrieval_images`` images of the run's
    label-free retrieval set (see :mod:`medfoundry.eval.view_pairs`)."""
    from medfoundry.eval.view_pairs import view_pair_features

    fa, fb, _ = view_pair_features(backbone, cfg, feature, batch_size=batch_size)
    return dinox_view_retrieval(fa, fb)


def evaluate_features(
    fs: FeatureSet,
    tasks: Sequence[str] = FEATURE_TASKS,
    knn_k: Sequence[int] = (10, 20),
    knn_temperature: float = 0.07,
    n_bootstrap: int = 200,
    seed: int = 0,
    query_split: str = "test",
    val_knn: bool = False,
    knn_bootstrap: int = 0,
) -> dict[str, float]:
    """All requested feature tasks (``retrieval`` is skipped here: see :func:`retrieval_metrics`);
    ``knn_bootstrap`` resamples give the kNN accuracies bootstrap bounds on the query split."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; known: {list(TASKS)}")
    out: dict[str, float] = {}
    if "knn" in tasks:
        out.update(knn_metrics(fs, knn_k, knn_temperature, query_split, n_bootstrap=knn_bootstrap, seed=seed))
        if val_knn and fs.has("val"):
            out.update(knn_metrics(fs, knn_k, knn_temperature, "val", prefix="val_"))
    if "linear" in tasks:
        out.update(linear_metrics(fs, n_bootstrap, seed))
    if "health" in tasks:
        out.update(health_metrics(fs))
    return out


def format_results(results: dict[str, float], title: str = "") -> str:
    """Aligned ``name  value`` lines (confidence intervals folded into their metric's line)."""
    lines = [title] if title else []
    names = [k for k in results if not k.endswith(("_ci_low", "_ci_high"))]
    width = max((len(k) for k in names), default=0)
    for k in names:
        v = results[k]
        text = f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else f"{v:g}"
        lo, hi = results.get(k + "_ci_low"), results.get(k + "_ci_high")
        if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
            text += f"  (95% CI {lo:.4f} - {hi:.4f})"
        lines.append(f"  {k:<{width}}  {text}")
    return "\n".join(lines)


def default_feature_cache(checkpoint: Path) -> Path:
    """``RUN/eval/feature_cache`` for a checkpoint inside a run folder, else the global feature cache."""
    from medfoundry.eval.features import default_cache_dir

    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / "feature_cache"
    if checkpoint.name == "best.pt":
        return checkpoint.parent / "eval" / "feature_cache"
    return default_cache_dir()


def evaluate_backbone(
    loaded: LoadedBackbone,
    tasks: Sequence[str] = FEATURE_TASKS,
    data: str | None = None,
    label_column: str | None = None,
    feature: str | None = None,
    aggregate: str | None = None,
    img_size: int = 0,
    query_split: str = "test",
    knn_k: Sequence[int] | None = None,
    n_bootstrap: int | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    retrieval: dict | None = None,
) -> tuple[dict[str, float], LabelledSet | None, bool]:
    """Evaluate a loaded backbone; unset arguments come from the run's ``eval`` section.

    The feature tasks (knn, linear, health) run on a labelled set; features are read from / written to
    the feature cache (keyed by the checkpoint identity, the labelled set's content and the extraction
    settings). ``retrieval`` is label-free: it reads ``eval.retrieval_*`` (overridden by the
    ``retrieval`` dict, e.g. ``{"retrieval_root": ..., "retrieval_images": ...}``). Returns
    ``(results, labelled set or None when no feature task ran, features_from_cache)``.
    """
    import dataclasses

    from medfoundry.eval.eval_images import eval_transform_from_config
    from medfoundry.eval.features import cached_features
    from medfoundry.eval.labelled_set import load_labelled_set

    cfg = loaded.cfg
    ec = cfg.eval
    data = data or ec.data
    feature = feature or ec.feature
    aggregate = aggregate or ec.aggregate
    feature_tasks = [t for t in tasks if t != "retrieval"]
    results: dict[str, float] = {}
    lset, from_cache = None, False
    if feature_tasks:
        if not data:
            raise ValueError(f"tasks {feature_tasks} need labelled data: pass --data MANIFEST (or set eval.data)")
        lset = load_labelled_set(data, label_column or ec.label_column, ec.split_fractions, ec.split_seed)
        transform = eval_transform_from_config(cfg, img_size)
        cache = cache_dir if cache_dir is not None else default_feature_cache(loaded.checkpoint)
        use_cache = use_cache and ec.cache_features
        fs, from_cache = cached_features(loaded.backbone, loaded.identity if use_cache else "", lset, transform,
                                         feature, ec.batch_size, cache_dir=cache)
        if aggregate == "series":
            fs = fs.aggregate_series()
        boot = ec.n_bootstrap if n_bootstrap is None else n_bootstrap
        results.update(evaluate_features(fs, feature_tasks, knn_k or ec.knn_k, ec.knn_temperature, boot,
                                         seed=ec.split_seed, query_split=query_split, knn_bootstrap=boot))
    if "retrieval" in tasks:
        overrides = {k: v for k, v in (retrieval or {}).items() if v not in (None, "")}
        rcfg = dataclasses.replace(cfg, eval=dataclasses.replace(ec, **overrides)) if overrides else cfg
        results.update(view_retrieval_metrics(loaded.backbone, rcfg, feature, ec.batch_size))
    return results, lset, from_cache
