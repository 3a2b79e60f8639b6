"""The ``distill`` method's own section and its run config (the ``dino`` run's sections + ``distill``).

Distillation trains the student on the same images and views as DINO (``data``, ``crops``), reads the
DINO temperatures, centering and head shape (``dino``) for its DINO term, and evaluates like DINO (``eval``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from medfoundry.config.backbones import check_backbone_names
from medfoundry.config.checks import one_of
from medfoundry.config.names import PRETRAINED_FORMATS
from medfoundry.methods.dino.config import DinoRunConfig


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher backbone into the student (``method: distill``)."""

    teacher_name: str = ""  # registered backbone name of the teacher (see `medfoundry models`)
    teacher_checkpoint: str = ""  # teacher weights: run folder, training checkpoint, Meta .pth, HF folder, timm file
    teacher_format: str = "auto"  # auto|dinov2|dinov3|hf|timm|medfoundry|medfoundry:<tower>
    teacher_img_size: int = 0  # teacher position-embedding grid size in pixels (0 = model.img_size)
    dino_weight: float = 1.0  # DINO loss on the teacher's DINO-head outputs (needs a head in the checkpoint)
    cls_cosine_weight: float = 1.0  # 1 - cosine(projected student class token, teacher class token)
    patch_cosine_weight: float = 1.0  # 1 - cosine on patch tokens (teacher grid resampled to the student's)


@dataclass
class DistillRunConfig(DinoRunConfig):
    """A ``method: distill`` run: a DINO run's sections plus the teacher and loss weights (``distill``)."""

    distill: DistillConfig = field(default_factory=DistillConfig)

    print_order: ClassVar[tuple[str, ...]] = ("output_dir", "method", "model", "data", "crops", "dino", "optim",
                                              "train", "dist", "adapt", "distill", "eval")

    def check_names(self) -> None:
        """The DINO run's names, the teacher's weight format and (when set) its registered backbone name."""
        super().check_names()
        one_of("distill.teacher_format", self.distill.teacher_format, PRETRAINED_FORMATS)
        if self.distill.teacher_name:  # empty is reported as missing by the method
            check_backbone_names([("distill.teacher_name", self.distill.teacher_name)])
