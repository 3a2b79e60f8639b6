"""Training hooks: periodic frozen-feature evaluation, best-checkpoint tracking and health monitors.

:func:`build` (called by the DINO-family methods' ``build_hooks``, :mod:`medfoundry.methods.registry`) returns

* an :class:`EvaluationHook` when ``eval.every_steps > 0`` and ``eval.data`` names a labelled set (or
  ``eval.tasks`` holds a label-free task such as ``retrieval``, DINO-X's view-retrieval ratio on the
  training data): every ``every_steps`` steps (and at the last step) the method's evaluation backbone
  (the EMA teacher for DINO) embeds the labelled set and the configured tasks
  (:mod:`medfoundry.eval.registry`: ``needs`` features or views) run on the features; results
  are logged with the training metrics as ``eval/<name>``, appended to ``RUN/eval/history.jsonl``,
  and the best value of ``eval.best_metric`` so far selects ``RUN/best.pt`` (+ ``RUN/best.json``);
* a :class:`MonitorHook` (unless every monitor is disabled) that feeds, every step, the logged
  ``dino_loss_frac`` (DINO loss / ln K) to the entropy-wall detector, ``teacher_effective_prototypes_frac``
  to the prototype-collapse detector (both only when the method passes its ``PrototypeTargets``, as
  ``method=dino`` does) and the teacher feature std to the collapse detector; the evaluation hook hands
  it the evaluated health statistics (``eval/health_feature_std``, ``eval/health_active_dims_frac``) for
  a second collapse detector. A warning is printed, appended
  to ``RUN/monitors.jsonl`` and logged as ``monitor/<name> = 1``; with ``fatal`` the detector
  raises :class:`~medfoundry.eval.monitors.RepresentationHealthError`, which stops the run.

Both run on every rank. Under DDP (or one process) evaluation is computed on rank 0 and broadcast;
under FSDP every rank evaluates (the sharded forward needs all of them) on the same images in the
same order, and the best checkpoint's full weights are gathered collectively. Either way every rank
returns the same keys and values, and the monitors see identical (all-reduced) metrics on every
rank and so decide identically. Files are written by rank 0 only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfoundry.config.evaluation import EvalConfig
from medfoundry.config.loader import ConfigError
from medfoundry.distributed.parallelize import is_sharded
from medfoundry.distributed.setup import is_main_process as _is_main
from medfoundry.distributed.setup import say as _say
from medfoundry.eval import registry
from medfoundry.eval.best import BestCheckpoint
from medfoundry.eval.hooks import Hook
from medfoundry.eval.monitors import (
    CollapseDetector,
    EntropyWallDetector,
    PrototypeCollapseDetector,
    RepresentationHealthError,
)
from medfoundry.eval.registry import EvalInputs, EvalSettings
from medfoundry.eval.sections import FrozenEvalSections

EVAL_PREFIX = "eval/"


def _label_free(ec: EvalConfig) -> bool:
    """Whether ``eval.tasks`` holds a task that needs no labelled set (``needs="views"``: the view retrieval)."""
    return any(registry.needs_of(t) == "views" for t in ec.tasks)


def _append_jsonl(path: Path, record: dict) -> None:
    if not _is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


class EvaluationHook:
    """Evaluate the method's evaluation backbone on the labelled set every ``eval.every_steps`` steps."""

    def __init__(self, sections: FrozenEvalSections, steps: int, run_config: dict) -> None:
        """``sections``: the run's ``data``/``crops``/``eval``; ``steps``: its last step (always evaluated);
        ``run_config``: the resolved config as a dict, stored in ``best.pt`` so that it loads like any checkpoint."""
        from medfoundry.eval.labelled_set import load_labelled_set

        ec = sections.eval
        known = registry.task_names()
        unknown = [t for t in ec.tasks if t not in known]
        if unknown:
            raise ConfigError(f"'eval.tasks' = {ec.tasks}: unknown task(s) {unknown}; known: {list(known)}")
        self._lset = None  # label-free runs evaluate only the view retrieval
        if ec.data:
            try:  # read the labelled set now, so a wrong path fails at start-up rather than at the first evaluation
                self._lset = load_labelled_set(ec.data, ec.label_column, ec.split_fractions, ec.split_seed)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"'eval.data' = {ec.data!r}: {err}") from err
        self.sections = sections
        self.every = int(ec.every_steps)
        self.last_step = int(steps)
        self.best_metric = ec.best_metric.removeprefix(EVAL_PREFIX)
        self.best = BestCheckpoint(self.best_metric, ec.best_mode, run_config, "eval.best_metric", _say)
        self._warned_tasks: set[str] = set()
        self._images: list[torch.Tensor] | None = None
        self._transform = None
        self.monitor: MonitorHook | None = None  # receives the evaluated health statistics (set by build)

    def due(self, step: int) -> bool:
        """Whether ``step`` (1-based, after the optimizer step) is an evaluation step."""
        return self.every > 0 and (step % self.every == 0 or step == self.last_step)

    def wants_step(self, step: int, log_step: bool) -> bool:
        """Only evaluation steps (:class:`~medfoundry.eval.hooks.Hook`): other steps need no host read."""
        return self.due(step)

    def on_step_end(self, step: int, metrics: dict[str, float], method: nn.Module,
                    run_dir: Path) -> dict[str, float] | None:
        if not self.due(step):
            return None
        run_dir = Path(run_dir)
        t0 = time.perf_counter()
        sharded = is_sharded(method)
        results: dict[str, float] | None = None
        if sharded or not torch.distributed.is_initialized():
            results = self.evaluate(method)  # FSDP: every rank takes part in the forward all-gathers
        else:
            if _is_main():
                results = self.evaluate(method)
            box = [results]
            torch.distributed.broadcast_object_list(box, src=0)
            results = box[0]
        assert results is not None
        seconds = time.perf_counter() - t0
        _append_jsonl(run_dir / "eval" / "history.jsonl", {"step": step, **results, "seconds": seconds})
        self.best.update(step, results, method, run_dir)
        shown = {k: v for k, v in results.items() if not k.endswith(("_ci_low", "_ci_high"))}
        _say(f"eval step {step} ({seconds:.1f}s): " + ", ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:8]))
        out = {EVAL_PREFIX + k: v for k, v in results.items()}
        if self.monitor is not None:
            out.update(self.monitor.observe_evaluation(step, out, run_dir) or {})
        return out

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _features(self, backbone: nn.Module):
        """Features of the labelled set (preprocessed once and kept in memory when it is small)."""
        from medfoundry.eval.eval_images import EvalImages
        from medfoundry.eval.features import FeatureSet, extract_features

        if self._transform is None:
            self._prepare()
        ec = self.sections.eval
        images = self._images if self._images is not None else EvalImages(self._lset.items, self._transform)
        feats = extract_features(backbone, images, ec.feature, ec.batch_size)
        fs = FeatureSet(
            feats, self._lset.labels, self._lset.splits, self._lset.classes,
            [it.path for it in self._lset.items], [it.series for it in self._lset.items], {"feature": ec.feature},
            self._lset.targets, list(self._lset.target_names),
        )
        return fs.aggregate_series() if "series" in (ec.aggregate, self._lset.aggregate) else fs

    def _prepare(self) -> None:
        from medfoundry.eval.eval_images import EvalImages, eval_transform_from_config

        ec = self.sections.eval
        self._transform = eval_transform_from_config(self.sections)
        images = EvalImages(self._lset.items, self._transform)
        size = self._transform.img_size
        if len(images) * self.sections.data.channels * size * size * 4 <= 512 * 2**20:
            self._images = [images[i] for i in range(len(images))]  # preprocessed once, kept in memory
        else:
            self._images = None
        _say(f"in-training evaluation on {ec.data} ({len(self._lset)} images; {self._lset.summary()})")

    def evaluate(self, method: nn.Module) -> dict[str, float]:
        """Run the configured tasks on the current evaluation backbone (no gradients, eval mode)."""
        ec = self.sections.eval
        backbone = method.eval_backbone()
        fs = self._features(backbone) if self._lset is not None else None
        settings = EvalSettings(knn_k=tuple(ec.knn_k), knn_temperature=ec.knn_temperature,
                                n_bootstrap=ec.n_bootstrap, seed=ec.split_seed, query_split="test", val_knn=True,
                                feature=ec.feature, batch_size=ec.batch_size)
        results: dict[str, float] = {}
        for name in ec.tasks:  # a task that cannot run on this set (e.g. one class) warns once, training goes on
            task = registry.get(name)
            try:
                if task.needs == "views":
                    results.update(task.run(EvalInputs(settings, backbone=backbone, sections=self.sections)))
                elif fs is None:
                    raise ValueError("it needs a labelled set (eval.data)")
                else:
                    results.update(task.run(EvalInputs(settings, features=fs)))
            except ValueError as err:
                if name not in self._warned_tasks:
                    self._warned_tasks.add(name)
                    _say(f"warning: in-training evaluation task '{name}' skipped: {err}")
        return {k: float(v) for k, v in results.items()}


def _hu_like(sections: FrozenEvalSections) -> bool:
    """Whether the run trains on HU/CT-like data (HU windows or DICOM/NIfTI volumes), for the monitors' advice."""
    d = sections.data
    return d.intensity == "window" or d.random_window_prob > 0 or d.kind in ("dicom", "nifti")


@dataclass(frozen=True)
class PrototypeTargets:
    """What the entropy-wall and prototype-collapse detectors know of a method's prototype head and its targets.

    A method with a DINO head (``method: dino``) passes it to :func:`build`; without it those two detectors
    stay off (the collapse detector on feature statistics works for every method).
    """

    out_dim: int  # number of prototypes K
    center_momentum: float
    centering: str  # center | sinkhorn
    teacher_temp: float


class MonitorHook:
    """Feeds the training-metric stream (and evaluated health) to the entropy-wall, prototype-collapse and
    collapse detectors."""

    def __init__(self, sections: FrozenEvalSections, lr: float, prototypes: PrototypeTargets | None = None,
                 log_every: int = 1) -> None:
        """``sections``: the run's ``eval`` (monitor settings) and ``data`` (HU-like data changes the advice);
        ``lr``: the base learning rate ``optim.lr``, quoted in the entropy-wall advice; ``log_every``: the run's
        ``train.log_every``, the steps between the observations of the training-stream detectors (their
        ``patience`` counts steps)."""
        ew, pc, co = sections.eval.entropy_wall, sections.eval.prototype_collapse, sections.eval.collapse
        self.entropy: EntropyWallDetector | None = None
        self.prototypes: PrototypeCollapseDetector | None = None
        self.collapse: CollapseDetector | None = None
        self.eval_collapse: CollapseDetector | None = None
        p = prototypes
        if ew.enabled and p is not None:
            self.entropy = EntropyWallDetector(p.out_dim, ew.after_steps, ew.patience,
                                               ew.threshold_frac, ew.fatal, metric_key="dino_loss_frac",
                                               center_momentum=p.center_momentum,
                                               centering=p.centering, hu_data=_hu_like(sections),
                                               lr=lr)
        if pc.enabled and p is not None:
            self.prototypes = PrototypeCollapseDetector(
                p.out_dim, pc.after_steps, pc.patience, pc.min_effective_frac, pc.fatal,
                center_momentum=p.center_momentum, centering=p.centering,
                teacher_temp=p.teacher_temp, metric_key="teacher_effective_prototypes_frac")
        if co.enabled:
            self.collapse = CollapseDetector(co.min_feature_std, co.min_active_dims_frac, co.after_steps,
                                             co.patience, co.fatal, std_key="teacher_feature_std",
                                             active_key="teacher_active_dims_frac")
            self.eval_collapse = CollapseDetector(co.min_feature_std, co.min_active_dims_frac, co.after_steps,
                                                  co.eval_patience, co.fatal,
                                                  std_key=EVAL_PREFIX + "health_feature_std",
                                                  active_key=EVAL_PREFIX + "health_active_dims_frac")
        for detector in (self.entropy, self.prototypes, self.collapse):
            if detector is not None:
                detector.stride = max(1, int(log_every))
        self.warnings: list[tuple[int, str, str]] = []  # (step, monitor, message)

    @property
    def active(self) -> bool:
        """Whether any detector is on."""
        return any(d is not None for d in (self.entropy, self.prototypes, self.collapse, self.eval_collapse))

    def wants_step(self, step: int, log_step: bool) -> bool:
        """The logged steps (:class:`~medfoundry.eval.hooks.Hook`): no host read in between; each observation
        stands for ``train.log_every`` steps of the detectors' ``patience``."""
        return log_step

    def on_step_end(self, step: int, metrics: dict[str, float], method: nn.Module,
                    run_dir: Path) -> dict[str, float] | None:
        """Feed one step's training metrics (DINO loss / ln K, effective teacher prototypes, teacher feature
        std) to the detectors."""
        return self._observe(step, metrics, Path(run_dir), (("entropy_wall", self.entropy),
                                                             ("prototype_collapse", self.prototypes),
                                                             ("collapse", self.collapse)))

    def observe_evaluation(self, step: int, results: dict[str, float], run_dir: Path) -> dict[str, float] | None:
        """Feed an in-training evaluation's ``eval/health_*`` statistics to the collapse detector."""
        return self._observe(step, results, Path(run_dir), (("collapse", self.eval_collapse),))

    def _observe(self, step: int, metrics: dict[str, float], run_dir: Path,
                 detectors: tuple) -> dict[str, float] | None:
        out: dict[str, float] = {}
        for name, detector in detectors:
            if detector is None:
                continue
            try:
                message = detector.observe(step, metrics)
            except RepresentationHealthError as err:
                self._record(step, name, str(err), Path(run_dir), fatal=True)
                raise
            if message:
                self._record(step, name, message, Path(run_dir), fatal=False)
                out[f"monitor/{name}"] = 1.0
        return out or None

    def _record(self, step: int, name: str, message: str, run_dir: Path, fatal: bool) -> None:
        self.warnings.append((step, name, message))
        _say(f"{'error' if fatal else 'warning'} [{name} monitor]: {message}")
        _append_jsonl(run_dir / "monitors.jsonl", {"step": step, "monitor": name, "fatal": fatal, "message": message})


def build(sections: FrozenEvalSections, *, steps: int, lr: float, run_config: dict,
          prototypes: PrototypeTargets | None = None, log_every: int = 1) -> list[Hook]:
    """The evaluation hook (if ``eval.every_steps`` and ``eval.data`` are set) and the monitor hook.

    ``sections`` are the run's ``data``, ``crops`` and ``eval`` (a DINO-family method's pipeline hands them
    over); ``steps`` is the run's last step, ``lr`` its ``optim.lr``, ``run_config`` its resolved config as a
    dict (for ``best.pt``); ``prototypes`` turns on the entropy-wall and prototype-collapse detectors;
    ``log_every`` is ``train.log_every`` (the monitors observe the logged steps).
    """
    hooks: list[Hook] = []
    monitor = MonitorHook(sections, lr, prototypes, log_every)
    ec = sections.eval
    if ec.every_steps > 0:
        if ec.data or _label_free(ec):
            evaluation = EvaluationHook(sections, steps, run_config)
            evaluation.monitor = monitor if monitor.active else None
            hooks.append(evaluation)
        else:
            label_free = ", ".join(f"'{t}'" for t in registry.names(("views",)))
            _say(f"warning: eval.every_steps is set but eval.data is empty and eval.tasks has no label-free "
                 f"{label_free}; in-training evaluation is off")
    if monitor.active:
        hooks.append(monitor)
    return hooks


def read_eval_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """In-training evaluation records of a run, one per evaluated step (a resumed run's repeats: last wins)."""
    path = Path(run_dir) / "eval" / "history.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def read_monitor_warnings(run_dir: str | Path) -> list[dict[str, Any]]:
    """Monitor warnings recorded for a run (``RUN/monitors.jsonl``)."""
    path = Path(run_dir) / "monitors.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


__all__ = ["EvaluationHook", "MonitorHook", "PrototypeTargets", "build", "read_eval_history", "read_monitor_warnings"]
