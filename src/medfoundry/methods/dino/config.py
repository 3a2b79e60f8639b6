"""The ``dino`` method's own config sections and its run config (the common sections + ``data``, ``crops``,
``dino``, ``eval``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from medfoundry.config.checks import (
    check_best_metric,
    check_data_names,
    check_eval_names,
    check_eval_section,
    check_image_pipeline,
)
from medfoundry.config.data import DataConfig
from medfoundry.config.evaluation import EvalConfig
from medfoundry.config.loader import ConfigError
from medfoundry.config.schema import CropsConfig, HeadConfig, RunConfig


@dataclass
class DinoConfig:
    """The DINO-family objective: DINO + optional iBOT, KoLeo, KDE and Gram terms."""

    head: HeadConfig = field(default_factory=HeadConfig)  # image-level (class token) head
    ibot_separate_head: bool = False  # separate iBOT patch head (DINOv2 default for large models)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)  # used when ibot_separate_head
    student_temp: float = 0.1  # student softmax temperature
    teacher_temp: float = 0.07  # teacher temperature after warm-up
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0
    warmup_teacher_temp_steps: int = 0  # linear teacher-temperature warm-up length
    centering: Literal["center", "sinkhorn"] = "center"  # DINOv1 centering or DINOv2 Sinkhorn-Knopp
    center_momentum: float = 0.9  # EMA of the center; 0.999 avoids the CT "entropy wall" (DINO-X)
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp iterations
    teacher_momentum: float = 0.996  # EMA momentum of the teacher at step 0
    teacher_momentum_end: float = 1.0  # EMA momentum at the last step (cosine schedule)
    dino_weight: float = 1.0  # weight of the class-token DINO loss
    ibot_weight: float = 0.0  # weight of the iBOT masked-patch loss (0 = off)
    mask_probability: float = 0.5  # share of global crops that get an iBOT mask
    mask_ratio_min: float = 0.1  # smallest masked-patch ratio
    mask_ratio_max: float = 0.5  # largest masked-patch ratio
    koleo_weight: float = 0.0  # KoLeo on student class tokens, summed over global crops as DINOv2 (0 = off)
    kde_weight: float = 0.0  # KDE uniformity term, summed over global crops as OpenMidnight (0 = off)
    kde_temperature: float = 2.5  # kernel sharpness t of the KDE term (OpenMidnight kappa=5 -> t=2.5)
    gram_weight: float = 0.0  # Gram loss on patch tokens (0 = off)
    gram_mode: Literal["ema", "anchor"] = "ema"  # target: EMA teacher (DINO-X) or frozen checkpoint (DINOv3)
    gram_anchor: Optional[str] = None  # checkpoint of the Gram anchor when gram_mode=anchor
    gram_start_step: int = 0  # first step at which the Gram term is active
    freeze_last_layer_steps: int = 0  # keep the prototype layer frozen for this many steps


@dataclass
class DinoRunConfig(RunConfig):
    """A ``method: dino`` run: the common sections, the training images (``data``), their multi-crop views
    (``crops``), the objective (``dino``) and frozen-feature evaluation with the health monitors (``eval``)."""

    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    print_order: ClassVar[tuple[str, ...]] = ("output_dir", "method", "model", "data", "crops", "dino", "optim",
                                              "train", "dist", "adapt", "eval")

    def check(self) -> None:
        """iBOT mask ratios in order, a Gram anchor when anchoring, the image pipeline's channels, the split."""
        d = self.dino
        if d.mask_ratio_min > d.mask_ratio_max:
            raise ConfigError(f"'dino.mask_ratio_min' = {d.mask_ratio_min} must be <= 'dino.mask_ratio_max' = "
                              f"{d.mask_ratio_max}")
        check_eval_section(self.eval)
        check_best_metric(self.eval)
        check_image_pipeline(self.data, self.crops)
        if d.gram_weight > 0 and d.gram_mode == "anchor" and not d.gram_anchor:
            raise ConfigError("'dino.gram_mode' = 'anchor' needs 'dino.gram_anchor' (a checkpoint path)")

    def check_names(self) -> None:
        """``data.kind``, ``eval.retrieval_kind`` and ``eval.tasks`` are registered names."""
        check_data_names(self.data)
        check_eval_names(self.eval)
