"""Training methods: ``batch -> {"loss": ..., metrics}`` plus their data pipelines, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medfoundry.config.schema import RunConfig
from medfoundry.methods.base import Method
from medfoundry.models.backbone import Backbone


@dataclass(frozen=True)
class MethodEntry:
    """How to build a method, the loader that feeds it, and which of its backbones is evaluated.

    Evaluation needs only the evaluated backbone (``Method.eval_backbone()``), not the whole method:
    ``build_eval_backbone`` builds just that backbone from the run config, drawing from the RNG
    exactly as ``build`` does up to that backbone's initialisation (so under the run's seed it *is*
    the run's step-0 backbone) and reading no external weights (``model.pretrained``, teachers, Gram
    anchors); its weights in a checkpoint's ``state["method"]`` are the keys under ``eval_prefix``.
    """

    build: Callable[[RunConfig], Method]
    build_loader: Callable  # (cfg, method, start_step, rank, world_size) -> iterable of batches
    eval_tower: str  # the submodule holding the evaluated backbone: teacher (dino), student (distill), image (clip)
    build_eval_backbone: Callable[[RunConfig], Backbone]

    @property
    def eval_prefix(self) -> str:
        """State-dict prefix of the evaluated backbone in ``state["method"]``, e.g. ``teacher.backbone.``."""
        return f"{self.eval_tower}.backbone."


def _dino_build(cfg: RunConfig) -> Method:
    from medfoundry.methods.dino import DINOMethod
    from medfoundry.models.pretrained import record_load_reports

    method = DINOMethod(cfg.model, cfg.dino, cfg.train.schedule_steps or cfg.train.steps, cfg.adapt,
                        cfg.optim.freeze_backbone_steps)
    record_load_reports(method.load_reports, cfg.output_dir)
    return method


def _dino_loader(cfg: RunConfig, method: Method, start_step: int, rank: int, world_size: int):
    patch = method.eval_backbone().patch_size
    if cfg.crops.device == "gpu":
        from medfoundry.data.gpu_multicrop import build_gpu_dino_loader

        return build_gpu_dino_loader(cfg, patch, start_step, rank, world_size, cfg.crops.storage_size,
                                     cfg.crops.gpu_backend)
    from medfoundry.data.loader import build_dino_loader

    return build_dino_loader(cfg, patch, start_step, rank, world_size)


def _clip_build(cfg: RunConfig) -> Method:
    from medfoundry.methods.clip import ClipMethod
    from medfoundry.models.pretrained import record_load_reports

    method = ClipMethod(cfg)
    record_load_reports(method.load_reports, cfg.output_dir)
    return method


def _clip_loader(cfg: RunConfig, method: Method, start_step: int, rank: int, world_size: int):
    from medfoundry.methods.clip import build_clip_loader

    return build_clip_loader(cfg, method, start_step, rank, world_size)


def _distill_build(cfg: RunConfig) -> Method:
    from medfoundry.methods.distill import DistillMethod
    from medfoundry.models.pretrained import record_load_reports

    method = DistillMethod(cfg)
    record_load_reports(method.load_reports, cfg.output_dir)
    return method


def _dino_eval_backbone(cfg: RunConfig) -> Backbone:
    from medfoundry.methods.dino import init_eval_backbone

    return init_eval_backbone(cfg)


def _distill_eval_backbone(cfg: RunConfig) -> Backbone:
    from medfoundry.methods.distill import init_eval_backbone

    return init_eval_backbone(cfg)


def _clip_eval_backbone(cfg: RunConfig) -> Backbone:
    from medfoundry.methods.clip import init_eval_backbone

    return init_eval_backbone(cfg)


METHODS: dict[str, MethodEntry] = {
    "dino": MethodEntry(_dino_build, _dino_loader, "teacher", _dino_eval_backbone),
    "distill": MethodEntry(_distill_build, _dino_loader, "student", _distill_eval_backbone),
    "clip": MethodEntry(_clip_build, _clip_loader, "image", _clip_eval_backbone),
}


def get_method_entry(name: str) -> MethodEntry:
    """The entry for ``cfg.method``; the error lists the known methods."""
    if name not in METHODS:
        raise KeyError(f"unknown method '{name}'; known: {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodEntry", "get_method_entry"]
