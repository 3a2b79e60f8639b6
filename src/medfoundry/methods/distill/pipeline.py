"""The ``distill`` method's pipeline: reads a distillation run's whole config and hands each part its section.
Registered as :data:`ENTRY`; the loader and the evaluation sets are the DINO pipeline's."""

from __future__ import annotations

from collections.abc import Iterator

from medfoundry.eval.hooks import Hook
from medfoundry.methods import input_paths as paths
from medfoundry.methods.dino.loader import build_loader
from medfoundry.methods.dino.pipeline import eval_hooks, frozen_eval_sections, max_bad_fraction
from medfoundry.methods.dino.pipeline import needed_paths as dino_paths
from medfoundry.methods.distill.config import DistillRunConfig
from medfoundry.methods.distill.method import DistillMethod, init_eval_backbone
from medfoundry.methods.registry import MethodEntry, Need
from medfoundry.models.backbone import Backbone
from medfoundry.models.pretrained import record_load_reports


def build(cfg: DistillRunConfig) -> DistillMethod:
    """Teacher and student; load reports recorded in the run folder."""
    method = DistillMethod(cfg.model, cfg.distill, cfg.dino, cfg.adapt, cfg.optim.freeze_backbone_steps,
                           cfg.crops.global_size)
    record_load_reports(method.load_reports, cfg.output_dir)
    return method


def build_hooks(cfg: DistillRunConfig) -> list[Hook]:
    """Frozen-feature evaluation of the student (``eval``) and the feature-collapse monitors."""
    return eval_hooks(cfg)


def needed_paths(cfg: DistillRunConfig) -> Iterator[Need]:
    """The teacher's weights, a Gram anchor if one is configured, then the images and evaluation sets."""
    if cfg.distill.teacher_checkpoint:
        yield "distill.teacher_checkpoint", cfg.distill.teacher_checkpoint, paths.weights
    yield from dino_paths(cfg)


def build_eval_backbone(cfg: DistillRunConfig) -> Backbone:
    """The student backbone at its step-0 initialisation (``model``, ``adapt``)."""
    return init_eval_backbone(cfg.model, cfg.adapt)


ENTRY = MethodEntry("distill", DistillRunConfig, build, build_loader, "student", build_eval_backbone, build_hooks,
                    needed_paths, max_bad_fraction, frozen_eval_sections)
