"""Run the registered frozen-backbone evaluation tasks on a labelled set's features and a checkpoint.

One flat ``{name: float}`` result per call, with the same names in the CLI, in-training evaluation
(logged as ``eval/<name>``), the run report and the demo. The tasks and their metrics are those of
:mod:`medfoundry.eval.registry`; the built-in ones:

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

``TASKS`` (what ``eval.tasks`` accepts: :func:`medfoundry.eval.registry.task_names`) and ``FEATURE_TASKS``
(the tasks run on a FeatureSet) are read from the registry each time they are imported, so a task
registered at run time is among them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medfoundry.eval import registry
from medfoundry.eval.features import FeatureSet
from medfoundry.eval.health import health_metrics
from medfoundry.eval.knn import knn_metrics
from medfoundry.eval.labelled_set import LabelledSet
from medfoundry.eval.linear_probe import linear_metrics
from medfoundry.eval.registry import EvalInputs, EvalSettings
from medfoundry.eval.retrieval import view_retrieval_metrics

if TYPE_CHECKING:
    from medfoundry.eval.loaded import LoadedBackbone

__all__ = ["EvalSettings", "default_feature_cache", "evaluate_backbone", "evaluate_features", "format_results",
           "health_metrics", "knn_metrics", "linear_metrics", "view_retrieval_metrics"]


def __getattr__(name: str) -> tuple[str, ...]:
    """``TASKS`` and ``FEATURE_TASKS``, derived from the registry when accessed (``from ... import TASKS`` too)."""
    if name == "TASKS":
        return registry.task_names()
    if name == "FEATURE_TASKS":
        return tuple(registry.names(("features",)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluate_features(
    fs: FeatureSet,
    tasks: Sequence[str] | None = None,
    knn_k: Sequence[int] = (10, 20),
    knn_temperature: float = 0.07,
    n_bootstrap: int = 200,
    seed: int = 0,
    query_split: str = "test",
    val_knn: bool = False,
    knn_bootstrap: int = 0,
) -> dict[str, float]:
    """The requested feature tasks (default: every registered one) in registry order; label-free tasks
    (``retrieval``) are skipped here (see :func:`evaluate_backbone`); ``knn_bootstrap`` resamples give the
    kNN accuracies bootstrap bounds on the query split."""
    known = registry.task_names()
    tasks = registry.names(("features",)) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; known: {list(known)}")
    settings = EvalSettings(knn_k=tuple(knn_k), knn_temperature=knn_temperature, n_bootstrap=n_bootstrap, seed=seed,
                            query_split=query_split, val_knn=val_knn, knn_bootstrap=knn_bootstrap)
    out: dict[str, float] = {}
    for task in registry.all_tasks():
        if task.needs == "features" and task.name in tasks:
            out.update(task.run(EvalInputs(settings, features=fs)))
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
    from medfoundry.checkpoints.format import is_best_checkpoint
    from medfoundry.eval.features import default_cache_dir

    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / "feature_cache"
    if is_best_checkpoint(checkpoint):  # RUN/best.pt or RUN/best.dcp
        return checkpoint.parent / "eval" / "feature_cache"
    return default_cache_dir()


def evaluate_backbone(
    loaded: LoadedBackbone,
    tasks: Sequence[str] | None = None,
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
    """Evaluate a loaded backbone on ``tasks`` (default: every registered feature task); unset arguments
    come from the run's ``eval`` section.

    The feature tasks (``needs="features"``: knn, linear, health) run on a labelled set; features are read
    from / written to the feature cache (keyed by the checkpoint identity, the labelled set's content and
    the extraction settings). The label-free view tasks (``needs="views"``: retrieval) read
    ``eval.retrieval_*`` (overridden by the ``retrieval`` dict, e.g. ``{"retrieval_root": ...,
    "retrieval_images": ...}``). The mask tasks (``needs="masks"``: localisation) read ``data`` as a manifest of
    images and their masks. Returns ``(results, labelled set or None when no feature task ran,
    features_from_cache)``.
    """
    from medfoundry.eval.eval_images import eval_transform_from_config
    from medfoundry.eval.features import cached_features
    from medfoundry.eval.labelled_set import load_labelled_set

    cfg = loaded.sections  # data, crops, eval of the run (FrozenEvalSections)
    ec = cfg.eval
    data = data or ec.data
    feature = feature or ec.feature
    aggregate = aggregate or ec.aggregate
    tasks = registry.names(("features",)) if tasks is None else list(tasks)
    view_tasks = [t for t in tasks if registry.needs_of(t) == "views"]
    mask_tasks = [t for t in tasks if registry.needs_of(t) == "masks"]  # localisation: data = image + mask manifest
    feature_tasks = [t for t in tasks if t not in view_tasks + mask_tasks]  # unknown ones: evaluate_features says so
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
        if aggregate == "series" or lset.aggregate == "series":  # a 3-D MedMNIST set: one feature per volume
            fs = fs.aggregate_series()
        boot = ec.n_bootstrap if n_bootstrap is None else n_bootstrap
        results.update(evaluate_features(fs, feature_tasks, knn_k or ec.knn_k, ec.knn_temperature, boot,
                                         seed=ec.split_seed, query_split=query_split, knn_bootstrap=boot))
    if view_tasks:
        overrides = {k: v for k, v in (retrieval or {}).items() if v not in (None, "")}
        rcfg = dataclasses.replace(cfg, eval=dataclasses.replace(ec, **overrides)) if overrides else cfg
        inputs = EvalInputs(EvalSettings(feature=feature, batch_size=ec.batch_size), backbone=loaded.backbone,
                            sections=rcfg)
        for name in view_tasks:
            results.update(registry.get(name).run(inputs))
    if mask_tasks:
        if not data:
            raise ValueError(f"tasks {mask_tasks} need a manifest with 'path' and 'mask' columns: pass --data MANIFEST")
        mec = dataclasses.replace(ec, data=str(data), img_size=img_size or ec.img_size)
        inputs = EvalInputs(EvalSettings(n_bootstrap=ec.n_bootstrap if n_bootstrap is None else n_bootstrap,
                                         seed=ec.split_seed, batch_size=ec.batch_size),
                            backbone=loaded.backbone, sections=dataclasses.replace(cfg, eval=mec))
        for name in mask_tasks:
            results.update(registry.get(name).run(inputs))
    return results, lset, from_cache
