"""The evaluation tasks, registered once and read by every place that names them.

The ``eval`` command (``--task`` choices, help, dispatch), ``medfoundry_cli/commands/eval_clip.py``, in-training
evaluation (what ``eval.tasks`` accepts, what runs), :func:`medfoundry.eval.tasks.evaluate_features`,
the run report, the demo's comparison table and the sweep's evaluation columns all ask this module
instead of spelling task or metric names out.

An :class:`EvalTask` says

* ``name``: unique; the ``--task`` / ``eval.tasks`` spelling;
* ``needs``: what :meth:`EvalTask.run` reads from its :class:`EvalInputs` — ``"features"`` (a
  :class:`~medfoundry.eval.features.FeatureSet` of the labelled set's train/val/test features),
  ``"views"`` (the backbone and the run's ``data``/``crops``/``eval`` sections: label-free augmented view
  pairs), ``"clip"`` (a CLIP-style image-text method and its evaluation context, the ``clip`` section) or
  ``"masks"`` (the backbone and sections whose ``eval.data`` is a manifest of images and their masks: the
  localisation scores; asked for by name, not part of ``task_names()`` / ``--task all`` / ``eval.tasks``);
  ``"slides"`` (the backbone and a :class:`~medfoundry.eval.slide.context.SlideEvalContext`: whole slides as bags
  of tile features, for slide-level aggregators; asked for by name like ``"masks"``);
* ``function``: ``(EvalInputs) -> {metric: float}``, a callable or ``"module:function"`` imported on
  first use, so that reading the registry (every CLI start builds the ``eval`` parser) imports no torch;
* ``headline``: the :class:`Metric` names (as logged) worth a table row, with their direction;
  ``{k}`` in a name stands for a neighbour count or recall cut-off (``knn_top1_k{k}``);
* ``description``: one line for ``medfoundry eval --help``;
* ``aliases``: other names ``--task`` accepts for a ``clip`` task on a ``method=clip`` checkpoint
  (``retrieval`` there means image-text retrieval, elsewhere the view retrieval);
* ``key_parts``: substrings that mark the task's quality metrics in a run's logged metric stream; the
  sweep reports every key holding one as final/best columns (none: diagnostics, not sweep columns).

Importing this module registers :func:`task_names` as the ``"eval.task"`` catalog of
:mod:`medfoundry.config.names`, which :func:`medfoundry.config.checks.check_names` validates ``eval.tasks``
against (a provider called at check time, so tasks registered later count).

Adding an evaluator is one module with ``run(inputs) -> dict[str, float]`` and one :class:`EvalTask` line
in :data:`BUILTIN_TASKS` (or :func:`register` at run time).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from medfoundry.config.names import register_names

if TYPE_CHECKING:
    from torch import nn

    from medfoundry.eval.clip_hook import ClipEvalContext
    from medfoundry.eval.features import FeatureSet
    from medfoundry.eval.sections import FrozenEvalSections
    from medfoundry.eval.slide.context import SlideEvalContext

Needs = Literal["features", "views", "clip", "masks", "slides"]
Direction = Literal["max", "min"]
NEEDS: tuple[str, ...] = get_args(Needs)
#: What in-training evaluation and the backbone path of ``medfoundry eval`` run: tasks on the frozen backbone.
BACKBONE_NEEDS: tuple[str, ...] = ("features", "views")
_K = "{k}"


@dataclass(frozen=True)
class Metric:
    """A headline metric: its logged name (``{k}`` = any neighbour count / cut-off) and which way is better."""

    name: str
    direction: Direction = "max"

    @property
    def templated(self) -> bool:
        """Whether the name holds ``{k}``."""
        return _K in self.name

    def pattern(self) -> re.Pattern[str]:
        """Regular expression of the logged names (``{k}`` = one or more digits, captured)."""
        head, _, tail = self.name.partition(_K)
        return re.compile(re.escape(head) + (r"(\d+)" + re.escape(tail) if self.templated else ""))


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation settings tasks read (from the ``eval`` section or command-line options)."""

    knn_k: tuple[int, ...] = (10, 20)  # kNN neighbour counts
    knn_temperature: float = 0.07  # kNN vote temperature
    n_bootstrap: int = 200  # bootstrap resamples of the linear probe's intervals
    seed: int = 0  # seed of the probes and bootstraps (the run's eval.split_seed)
    query_split: str = "test"  # kNN queries
    val_knn: bool = False  # also kNN on the val split, prefixed val_ (in training: selects best.pt)
    knn_bootstrap: int = 0  # bootstrap resamples of the kNN accuracies
    feature: str = "cls"  # views: cls, mean_patch or both
    batch_size: int = 64  # views: images per forward


@dataclass
class EvalInputs:
    """Everything a task may read; the caller fills what the task's ``needs`` names."""

    settings: EvalSettings = field(default_factory=EvalSettings)
    features: FeatureSet | None = None  # needs "features"
    backbone: nn.Module | None = None  # needs "views": the frozen backbone in eval mode
    sections: FrozenEvalSections | None = None  # needs "views": the run's data, crops and eval sections
    clip_method: nn.Module | None = None  # needs "clip": a ClipMethod
    clip: ClipEvalContext | None = None  # needs "clip": its ``clip`` section and image settings
    slides: SlideEvalContext | None = None  # needs "slides": slide manifest, tile settings, cache, output folder


_REQUIRED = {"features": ("features",), "views": ("backbone", "sections"), "clip": ("clip_method", "clip"),
             "masks": ("backbone", "sections"), "slides": ("backbone", "slides")}


@dataclass(frozen=True)
class EvalTask:
    """One registered evaluation task (see the module docstring for the fields)."""

    name: str
    needs: Needs
    function: Callable[[EvalInputs], dict[str, float]] | str
    headline: tuple[Metric, ...]
    description: str
    aliases: tuple[str, ...] = ()
    key_parts: tuple[str, ...] = ()

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        """The task's metrics on ``inputs`` (``ValueError`` when an input its ``needs`` names is missing)."""
        given = {"features": inputs.features, "backbone": inputs.backbone, "sections": inputs.sections,
                 "clip_method": inputs.clip_method, "clip": inputs.clip, "slides": inputs.slides}
        missing = [f for f in _REQUIRED[self.needs] if given[f] is None]
        if missing:
            raise ValueError(f"task '{self.name}' needs {', '.join(missing)} (needs={self.needs})")
        fn = self.function
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        return {k: float(v) for k, v in fn(inputs).items()}

    def headline_keys(self, available: Iterable[str]) -> list[str]:
        """This task's headline metric names among ``available``: the ``{k}`` metrics first, for each ``k``
        found (ascending) all of them in declared order (``knn_top1_k10, knn_balanced_acc_k10, knn_auc_k10,
        knn_top1_k20, ...``), then the other metrics in declared order."""
        have = set(available)
        templated = [m for m in self.headline if m.templated]
        ks = sorted({int(match.group(1)) for m in templated for key in have if (match := m.pattern().fullmatch(key))})
        out = [name for k in ks for m in templated if (name := m.name.replace(_K, str(k))) in have]
        return out + [m.name for m in self.headline if not m.templated and m.name in have]


BUILTIN_TASKS: tuple[EvalTask, ...] = (
    EvalTask("knn", "features", "medfoundry.eval.knn:run_task",
             (Metric("knn_top1_k{k}"), Metric("knn_balanced_acc_k{k}"), Metric("knn_auc_k{k}")),
             "weighted kNN (DINO): train split as memory bank, test split as queries", key_parts=("knn",)),
    EvalTask("linear", "features", "medfoundry.eval.linear_probe:run_task",
             (Metric("linear_accuracy"), Metric("linear_balanced_accuracy"), Metric("linear_auc")),
             "logistic-regression probe: fit on train, C chosen on val, test metrics with bootstrap CIs",
             key_parts=("linear",)),
    EvalTask("multilabel", "features", "medfoundry.eval.multilabel_probe:run_task", (Metric("multilabel_mean_auc"),),
             "one-vs-rest logistic probe per label (multi-label sets; classes otherwise): per-label and mean test "
             "AUC with bootstrap CIs, C chosen on val"),
    EvalTask("retrieval", "views", "medfoundry.eval.retrieval:run_task", (Metric("view_retrieval_ratio"),),
             "DINO-X's label-free view-retrieval ratio on augmented view pairs"),
    EvalTask("health", "features", "medfoundry.eval.health:run_task",
             (Metric("health_active_dims"), Metric("health_active_dims_frac"),
              Metric("health_mean_pairwise_cosine", "min"), Metric("health_feature_std"),
              Metric("health_effective_rank"), Metric("health_class_separation")),
             "representation health: active dims, feature std, RankMe, class separation"),
    EvalTask("zeroshot", "clip", "medfoundry.eval.clip_hook:run_zeroshot_task",
             (Metric("zeroshot/mean_auc"), Metric("zeroshot/accuracy"), Metric("zeroshot/balanced_accuracy"),
              Metric("zeroshot/macro_auc")),
             "CLIP zero-shot: prompt-pair AUC per finding and/or class-name prompt ensembles",
             key_parts=("zeroshot",)),
    EvalTask("clip_retrieval", "clip", "medfoundry.eval.clip_hook:run_retrieval_task",
             (Metric("retrieval/i2t_recall_at_{k}"), Metric("retrieval/t2i_recall_at_{k}"),
              Metric("retrieval/i2t_median_rank", "min"), Metric("retrieval/t2i_median_rank", "min")),
             "CLIP image<->report retrieval Recall@K", aliases=("retrieval",),
             key_parts=("recall",)),
    EvalTask("localisation", "masks", "medfoundry.eval.localisation:run_task",
             (Metric("localisation_pointing"), Metric("localisation_pointing_tol"),
              Metric("localisation_iou_top_area"), Metric("localisation_iou_t50"), Metric("localisation_auc")),
             "class-token attention vs masks: pointing game, IoU, pixel AUC (--data: path + mask columns; not in all)"),
    EvalTask("slide", "slides", "medfoundry.eval.slide.evaluate:run_task",
             (Metric("slide_abmil_auc"), Metric("slide_mean_auc"), Metric("slide_abmil_accuracy"),
              Metric("slide_mean_accuracy")),
             "slide-level MIL on tile features: mean pooling and gated attention (--slides MANIFEST; not in all)"),
)

_TASKS: dict[str, EvalTask] = {}


def register(task: EvalTask) -> EvalTask:
    """Add ``task`` (after the others, so it is listed last); ``ValueError`` on a taken name or a bad field."""
    if task.name in _TASKS:
        raise ValueError(f"evaluation task '{task.name}' is already registered")
    if task.needs not in NEEDS:
        raise ValueError(f"evaluation task '{task.name}': needs={task.needs!r} is not one of {list(NEEDS)}")
    bad = [m.name for m in task.headline if m.direction not in ("max", "min")]
    if bad:
        raise ValueError(f"evaluation task '{task.name}': headline metrics {bad} need direction 'max' or 'min'")
    _TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove a task registered with :func:`register` (a no-op for an unknown name)."""
    _TASKS.pop(name, None)


def all_tasks() -> tuple[EvalTask, ...]:
    """Every registered task, in registration order (the order of tables and results)."""
    return tuple(_TASKS.values())


def get(name: str) -> EvalTask:
    """The task called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"unknown evaluation task '{name}'; known: {names()}") from None


def names(needs: Iterable[str] | None = None) -> list[str]:
    """Names of the registered tasks (only those whose ``needs`` is in ``needs`` when given)."""
    wanted = None if needs is None else set(needs)
    return [t.name for t in _TASKS.values() if wanted is None or t.needs in wanted]


def task_names() -> tuple[str, ...]:
    """What ``eval.tasks`` accepts and ``--task all`` runs: every task on the frozen backbone (features, views)."""
    return tuple(names(BACKBONE_NEEDS))


def needs_of(name: str) -> str | None:
    """The ``needs`` of task ``name``; None for an unknown name."""
    task = _TASKS.get(name)
    return task.needs if task is not None else None


def resolve(name: str, clip_checkpoint: bool = False) -> EvalTask | None:
    """The task a ``--task`` name means: on a ``method=clip`` checkpoint a ``clip`` task's name or alias
    first; else the task of that name; None when there is none."""
    if clip_checkpoint:
        for task in _TASKS.values():
            if task.needs == "clip" and name in (task.name, *task.aliases):
                return task
    return _TASKS.get(name)


def headline_keys(available: Iterable[str]) -> list[str]:
    """The registered headline metric names among ``available``, task by task in registration order
    (within a task as :meth:`EvalTask.headline_keys` orders them)."""
    have = set(available)
    return list(dict.fromkeys(k for task in _TASKS.values() for k in task.headline_keys(have)))


def metric_direction(key: str) -> Direction | None:
    """``max`` or ``min`` for a registered headline metric name (``{k}`` filled in), None for any other key."""
    for task in _TASKS.values():
        for m in task.headline:
            if m.pattern().fullmatch(key):
                return m.direction
    return None


def key_parts() -> tuple[str, ...]:
    """The registered tasks' ``key_parts``, in registration order without repeats."""
    return tuple(dict.fromkeys(p for t in _TASKS.values() for p in t.key_parts))


def describe(tasks: Sequence[EvalTask] | None = None) -> str:
    """``name  [needs] description`` lines (aliases noted) for help texts."""
    tasks = all_tasks() if tasks is None else tuple(tasks)
    width = max((len(t.name) for t in tasks), default=0)
    lines = []
    for t in tasks:
        alias = f" (also '{', '.join(t.aliases)}' on a method=clip checkpoint)" if t.aliases else ""
        lines.append(f"  {t.name:<{width}}  [{t.needs}] {t.description}{alias}")
    return "\n".join(lines)


for _task in BUILTIN_TASKS:
    register(_task)
register_names("eval.task", task_names)  # config checks eval.tasks against this, at call time (config/names.py)
