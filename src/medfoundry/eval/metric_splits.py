"""Which images an evaluation metric is computed on, and what kind of classification score it is.

A report that puts a curve beside a table must say, for each, which split it shows; the rules the evaluators
follow (:mod:`medfoundry.eval.tasks`) are:

* ``val_*`` metrics (the in-training ``val_knn_*``) and the linear probe's ``linear_val_score`` /
  ``linear_best_C`` are on the **val** split;
* kNN (``knn_*``) queries ``query_split`` (``test`` unless ``medfoundry eval --split val``);
* every other task on the labelled set's features reports **test** (the linear probe, a registered task);
* representation health (``health_*``) uses **all** labelled images;
* the view retrieval (``view_*``, tasks with ``needs="views"``) is label-free: **views** of the retrieval images.

:func:`classification_kind` says whether a metric is an accuracy, a balanced accuracy or an AUC, which is what
the majority-class baseline (:mod:`medfoundry.eval.majority`) is defined for.
"""

from __future__ import annotations

from typing import Literal

from medfoundry.eval import registry

Kind = Literal["accuracy", "balanced_accuracy", "auc"]

#: How each split value reads in a table or a plot legend.
SPLIT_WORDS = {"train": "train", "val": "val", "test": "test", "all": "all splits",
               "views": "label-free views"}

_VAL_KEYS = ("linear_val_score", "linear_best_C")


def task_of(key: str) -> registry.EvalTask | None:
    """The registered task that logs ``key`` (``val_`` prefix ignored): the one whose headline metric matches
    it, else the one whose name prefixes it (``linear_best_C``); view-retrieval keys (``view_*``) belong to the
    label-free task. None for any other key."""
    base = key.removeprefix("val_")
    tasks = registry.all_tasks()
    for task in tasks:
        if any(m.pattern().fullmatch(base) for m in task.headline):
            return task
    for task in tasks:
        if base.startswith(task.name + "_"):
            return task
    if base.startswith("view_") or base == "num_images":
        return next((t for t in tasks if t.needs == "views"), None)
    return None


def metric_split(key: str, query_split: str = "test") -> str:
    """The split ``key`` is computed on: ``train``/``val``/``test``, ``all`` (every labelled image), ``views``
    (label-free view pairs) or ``""`` when unknown (not a frozen-backbone task's metric)."""
    if key.startswith("val_") or key in _VAL_KEYS:
        return "val"
    task = task_of(key)
    if task is None:
        return ""
    if task.needs == "views":
        return "views"
    if task.name == "health":
        return "all"
    if task.name == "knn":
        return query_split
    return "test" if task.needs == "features" else ""


def classification_kind(key: str) -> Kind | None:
    """``accuracy``, ``balanced_accuracy`` or ``auc`` for a labelled-set task's class-prediction metric
    (``knn_top1_k20``, ``linear_balanced_accuracy``, ``val_knn_auc_k10``, ...); None for everything else
    (health statistics, the view retrieval, selection scores such as ``linear_val_score``, interval bounds)."""
    if key.endswith(("_ci_low", "_ci_high")):
        return None  # an interval bound, not a metric
    task = task_of(key)
    if task is None or task.needs != "features" or key in _VAL_KEYS:
        return None
    base = key.removeprefix("val_")
    if "balanced_acc" in base:
        return "balanced_accuracy"
    if "auc" in base:
        return "auc"
    if "top1" in base or base.endswith("accuracy"):
        return "accuracy"
    return None


def split_word(split: str) -> str:
    """``split`` as a table cell or legend reads it (``?`` when unknown)."""
    return SPLIT_WORDS.get(split, split or "?")
