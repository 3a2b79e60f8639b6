"""The ``dino`` method's pipeline: the one place that reads a DINO run's whole config and hands each part its
section (method, loader, evaluated backbone, hooks, input paths). Registered as :data:`ENTRY`."""

from __future__ import annotations

from collections.abc import Iterator

from medfoundry.config.loader import to_dict
from medfoundry.eval import in_training
from medfoundry.eval.hooks import Hook
from medfoundry.eval.sections import FrozenEvalSections
from medfoundry.methods import input_paths as paths
from medfoundry.methods.dino.config import DinoRunConfig
from medfoundry.methods.dino.loader import build_loader
from medfoundry.methods.dino.method import DINOMethod, init_eval_backbone
from medfoundry.methods.registry import MethodEntry, Need
from medfoundry.models.backbone import Backbone
from medfoundry.models.pretrained import record_load_reports


def build(cfg: DinoRunConfig) -> DINOMethod:
    """The student/teacher module from ``model``, ``dino``, ``adapt`` and the run length; load reports recorded."""
    method = DINOMethod(cfg.model, cfg.dino, cfg.train.schedule_steps or cfg.train.steps, cfg.adapt,
                        cfg.optim.freeze_backbone_steps)
    record_load_reports(method.load_reports, cfg.output_dir)
    return method


def eval_hooks(cfg: DinoRunConfig, prototypes: in_training.PrototypeTargets | None = None) -> list[Hook]:
    """Frozen-feature evaluation (``eval``) and the monitors of a DINO-family run, each handed its sections."""
    return in_training.build(frozen_eval_sections(cfg), steps=cfg.train.steps, lr=cfg.optim.lr,
                             run_config=to_dict(cfg), prototypes=prototypes, log_every=cfg.train.log_every)


def build_hooks(cfg: DinoRunConfig) -> list[Hook]:
    """Frozen-feature evaluation (``eval``) and the monitors, with the DINO head's prototype detectors on."""
    d = cfg.dino
    targets = in_training.PrototypeTargets(d.head.out_dim, d.center_momentum, d.centering, d.teacher_temp)
    return eval_hooks(cfg, targets)


def image_paths(cfg: DinoRunConfig) -> Iterator[Need]:
    """The training images and the evaluation sets of a DINO-family run (``data``, ``eval``)."""
    if not cfg.data.root:
        raise paths.ConfigError(f"'data.root' is not set: give the training images (data.kind={cfg.data.kind}), "
                                "e.g. data.root=path/to/images")
    yield "data.root", cfg.data.root, paths.data_root(cfg.data.kind, cfg.data.extensions, cfg.data)
    if cfg.data.hdf5_reports:
        yield "data.hdf5_reports", cfg.data.hdf5_reports, paths.regular_file
    ec = cfg.eval
    if ec.every_steps > 0 and ec.data:
        yield "eval.data", ec.data, paths.eval_pictures(cfg.data, ec.label_column)
    if ec.every_steps > 0 and "retrieval" in ec.tasks and ec.retrieval_root:
        yield "eval.retrieval_root", ec.retrieval_root, paths.any_path


def needed_paths(cfg: DinoRunConfig) -> Iterator[Need]:
    """The Gram anchor (when anchoring), then the images and evaluation sets."""
    if cfg.dino.gram_weight > 0 and cfg.dino.gram_mode == "anchor" and cfg.dino.gram_anchor:
        yield "dino.gram_anchor", cfg.dino.gram_anchor, paths.weights
    yield from image_paths(cfg)


def max_bad_fraction(cfg: DinoRunConfig) -> float:
    """``data.max_bad_fraction``: the share of unreadable training images after which the run stops."""
    return cfg.data.max_bad_fraction


def frozen_eval_sections(cfg: DinoRunConfig, state: dict | None = None) -> FrozenEvalSections:
    """The run's own ``data``, ``crops`` and ``eval``: frozen evaluation preprocesses images as training did
    (``state``, the checkpoint's method weights, adds nothing)."""
    return FrozenEvalSections(cfg.data, cfg.crops, cfg.eval)


def build_eval_backbone(cfg: DinoRunConfig) -> Backbone:
    """The EMA teacher's backbone at its step-0 initialisation (``model``, ``adapt``)."""
    return init_eval_backbone(cfg.model, cfg.adapt)


ENTRY = MethodEntry("dino", DinoRunConfig, build, build_loader, "teacher", build_eval_backbone, build_hooks,
                    needed_paths, max_bad_fraction, frozen_eval_sections)
