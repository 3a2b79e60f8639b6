"""The ``distill`` method: a frozen teacher backbone distilled into a (smaller) student.

Following DINOv3's distillation of its 7B model into ViT-S/B/L (Siméoni et al. 2025), the student is
trained on multi-crop views with

* the DINO loss against the frozen teacher's DINO-head outputs on the global crops (targets centered
  or Sinkhorn-normalised and sharpened as in ``dino``; every student crop, global and local, predicts
  every teacher global crop, including the same view - the teacher is a different network, so
  matching it on the same crop is informative); the student gets a fresh head of the same shape;
* and/or cosine feature matching of class and patch tokens (student tokens linearly projected to the
  teacher width; teacher patch grid resampled to the student's if the patch sizes differ), which
  also works for released teachers that ship without heads.

The teacher is any registered backbone loaded from a checkpoint (a medfoundry run folder or
checkpoint - whose ``teacher.dino_head`` is reused - or Meta/HF/timm weights for feature matching).
The student is evaluated and exported; LoRA/freezing (``adapt``) and ``model.pretrained`` apply to it
as in ``dino``. The loader is the DINO multi-crop loader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medfoundry.config.adapt import AdaptConfig
from medfoundry.config.schema import HeadConfig, ModelConfig
from medfoundry.losses import DINOLoss
from medfoundry.losses.distill import CosineFeatureLoss, match_patch_grid
from medfoundry.methods.base import StudentTeacherMethod
from medfoundry.methods.dino.config import DinoConfig
from medfoundry.methods.dino.method import teacher_target_stats
from medfoundry.methods.distill.config import DistillConfig
from medfoundry.models.backbone import Backbone
from medfoundry.models.heads import DINOHead
from medfoundry.models.registry import create_backbone
from medfoundry.schedules import linear_warmup_constant


def init_eval_backbone(model: ModelConfig, adapt: AdaptConfig) -> Backbone:
    """The student backbone as :class:`DistillMethod` initialises it, without the teacher or heads.

    The student is the first thing the method draws from the RNG, so under the run's seed this is
    bit-identical to the run's step-0 student; the teacher checkpoint and ``model.pretrained`` are not
    read, so a student evaluates after its teacher's run folder is gone (:mod:`medfoundry.methods.checkpoint_backbone`).
    """
    from medfoundry.models.lora import adapt_backbone

    student = create_backbone(model)
    adapt_backbone(student, adapt, verbose=False)
    return student


class DistillMethod(StudentTeacherMethod):
    """Frozen teacher (backbone [+ DINO head]) and trainable student (backbone + head + projectors).

    Args:
        model: the student backbone (``model``).
        distill: the teacher and the loss weights (``distill``).
        dino: temperatures, centering, and the head shape when the teacher has none (``dino``).
        adapt: LoRA / freezing of the student (``adapt``).
        freeze_backbone_steps: ``optim.freeze_backbone_steps``.
        global_size: ``crops.global_size``, checked against the teacher's patch size.
    """

    def __init__(self, model: ModelConfig, distill: DistillConfig, dino: DinoConfig, adapt: AdaptConfig,
                 freeze_backbone_steps: int = 0, global_size: int = 224) -> None:
        super().__init__()
        from medfoundry.models.lora import adapt_backbone
        from medfoundry.models.pretrained import load_pretrained_backbone, read_weights, resolve_source

        d = distill
        if not d.teacher_name or not d.teacher_checkpoint:
            raise ValueError("method=distill needs distill.teacher_name and distill.teacher_checkpoint")
        if d.dino_weight <= 0 and d.cls_cosine_weight <= 0 and d.patch_cosine_weight <= 0:
            raise ValueError("method=distill: distill.dino_weight, cls_cosine_weight and patch_cosine_weight are all 0")
        self.dino_cfg = dino
        self.dcfg = d
        self.freeze_backbone_steps = freeze_backbone_steps
        self.load_reports: list = []
        mode = adapt.channel_mode

        student = create_backbone(model)
        if model.pretrained:
            self.load_reports.append(
                load_pretrained_backbone(student, model.pretrained, model.pretrained_format, channel_mode=mode,
                                         what="model.pretrained")
            )
        adapt_backbone(student, adapt)

        t_model = ModelConfig(name=d.teacher_name, img_size=d.teacher_img_size or model.img_size,
                              in_chans=model.in_chans)
        teacher = create_backbone(t_model)
        # read once (the restricted reader refuses a file that would run code); backbone and head come from it
        t_source = resolve_source(d.teacher_checkpoint)
        t_weights = read_weights(t_source, d.teacher_format, "distill.teacher_checkpoint")
        self.load_reports.append(load_pretrained_backbone(teacher, t_source, d.teacher_format, channel_mode=mode,
                                                          preloaded=t_weights, what="distill.teacher_checkpoint"))
        teacher.requires_grad_(False)

        self.student = nn.ModuleDict({"backbone": student})
        self.teacher = nn.ModuleDict({"backbone": teacher})
        ds, dt = student.embed_dim, teacher.embed_dim
        if d.dino_weight > 0:
            head_cfg, head_sd = _teacher_head(t_source, t_weights[0], d.teacher_format, dino.head)
            t_head = DINOHead(dt, head_cfg)
            t_head.load_state_dict(head_sd)
            self.teacher["dino_head"] = t_head
            self.student["dino_head"] = DINOHead(ds, head_cfg)
            self.dino_loss = DINOLoss(head_cfg.out_dim, dino.student_temp, dino.center_momentum)
        if d.cls_cosine_weight > 0:
            self.student["cls_proj"] = _projector(ds, dt)
        if d.patch_cosine_weight > 0:
            self.student["patch_proj"] = _projector(ds, dt)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.cosine = CosineFeatureLoss()
        self._pending: list[Tensor] = []  # teacher DINO logits of the step's micro-batches, for the centre
        if global_size % teacher.patch_size:
            raise ValueError(
                f"crops.global_size={global_size} is not a multiple of the teacher patch size "
                f"{teacher.patch_size} ({d.teacher_name})"
            )

    def eval_backbone(self) -> Backbone:
        """The student backbone: the model being produced."""
        return self.student["backbone"]

    def teacher_temperature(self, step: int) -> float:
        """Teacher softmax temperature at ``step`` (the ``dino`` section's warm-up schedule)."""
        c = self.dino_cfg
        return linear_warmup_constant(step, c.warmup_teacher_temp_steps, c.warmup_teacher_temp, c.teacher_temp)

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:
        """Weighted distillation terms for one multi-crop batch (view-major tensors)."""
        d = self.dcfg
        glob: Tensor = batch["global_crops"]
        n_g, b = glob.shape[:2]
        flat = glob.flatten(0, 1)
        local: Tensor | None = batch.get("local_crops")
        use_dino = "dino_head" in self.student
        temp = self.teacher_temperature(step)

        with torch.no_grad():
            t_out = self.teacher["backbone"].forward_features(flat)
            if use_dino:
                t_logits = self.teacher["dino_head"](t_out.cls).float()
                if self.dino_cfg.centering == "sinkhorn":
                    t_probs = self.dino_loss.teacher_probs_sinkhorn(t_logits, temp, self.dino_cfg.sinkhorn_iterations)
                else:
                    t_probs = self.dino_loss.teacher_probs_centered(t_logits, temp)

        s_out = self.student["backbone"].forward_features(flat)
        terms: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        if use_dino:
            student_logits = self.student_crop_logits(s_out.cls, local, n_g, b)
            terms["dino_loss"] = self.dino_loss(student_logits, t_probs.view(n_g, b, -1), skip_same_view=False)
            weights["dino_loss"] = d.dino_weight
            self._pending.append(t_logits.detach())
        if "cls_proj" in self.student:
            terms["cls_cosine_loss"] = self.cosine(self.student["cls_proj"](s_out.cls), t_out.cls)
            weights["cls_cosine_loss"] = d.cls_cosine_weight
        if "patch_proj" in self.student:
            target = match_patch_grid(t_out.patch, t_out.grid, s_out.grid)
            terms["patch_cosine_loss"] = self.cosine(self.student["patch_proj"](s_out.patch), target)
            weights["patch_cosine_loss"] = d.patch_cosine_weight
        loss = sum(weights[k] * v for k, v in terms.items())

        out = {"loss": loss, **{k: v.detach() for k, v in terms.items()}}
        with torch.no_grad():
            out["teacher_temp"] = torch.tensor(temp)
            if use_dino:  # the same teacher-target statistics the dino method logs
                out.update(teacher_target_stats(t_probs, terms["dino_loss"]))
        return out

    def before_optimizer_step(self, step: int) -> None:
        """Head/projector-only warm-up: no student-backbone update for ``optim.freeze_backbone_steps`` steps."""
        if step < self.freeze_backbone_steps:
            for p in self.student["backbone"].parameters():
                p.grad = None

    def start_step(self, step: int) -> None:
        """Forget teacher logits gathered for a step that was skipped (non-finite loss)."""
        self._pending = []

    @torch.no_grad()
    def after_optimizer_step(self, step: int, applied: Tensor | None = None) -> None:
        """Update the DINO center from this step's teacher logits, of all its micro-batches (centering only);
        ``applied`` = 0 (a skipped step, on the device) keeps it as it was."""
        if self._pending and self.dino_cfg.centering == "center":
            self.dino_loss.update_center(torch.cat(self._pending), applied)
        self._pending = []


def _projector(d_in: int, d_out: int) -> nn.Linear:
    """Student -> teacher width projection; the identity when widths match (training starts from plain matching)."""
    proj = nn.Linear(d_in, d_out)
    if d_in == d_out:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(d_in))
            proj.bias.zero_()
    return proj


def _teacher_head(source: Path, obj: Any, fmt: str, fallback: HeadConfig) -> tuple[HeadConfig, dict[str, Tensor]]:
    """The teacher's DINO head (config and weights) from the medfoundry checkpoint ``obj`` read from ``source``."""
    from medfoundry.models.convert import PretrainedLoadError, medfoundry_ckpt

    which = fmt.split(":", 1)[1] if fmt.startswith("medfoundry:") else "auto"
    if not medfoundry_ckpt.is_training_checkpoint(obj):
        raise PretrainedLoadError(
            f"distill.dino_weight > 0 needs the teacher's DINO head, but {source} is not a medfoundry training "
            "checkpoint (released backbones ship without heads). Set distill.dino_weight=0 to distil by feature "
            "matching only, or continue-pretrain the teacher with medfoundry first."
        )
    section, sd = medfoundry_ckpt.head_state(obj, which)
    fields = {f.name for f in dataclasses.fields(HeadConfig)}
    head = dataclasses.replace(fallback, **{k: v for k, v in section.items() if k in fields})
    return head, sd
