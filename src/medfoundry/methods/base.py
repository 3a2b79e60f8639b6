"""The contract between a training method and the loop.

A method is an ``nn.Module`` whose ``forward(batch, step)`` returns ``{"loss": scalar, **metrics}``.
The loop knows nothing else about it: it calls the two hooks around the optimizer step, optimises
the parameters that require grad, and checkpoints ``state_dict()`` (student, teacher, centers ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medfoundry.models.backbone import Backbone


class Method(nn.Module):
    """Base class for training methods (DINO, CLIP, distillation)."""

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Compute ``{"loss": ..., metric_name: value, ...}`` for one batch."""
        raise NotImplementedError

    def start_step(self, step: int) -> None:
        """Called once per optimizer step before its first forward; with ``train.grad_accum_steps`` > 1 the step's
        micro-batches follow, and state gathered across them for ``after_optimizer_step`` (DINO's teacher outputs
        for the centre) starts empty here, so a skipped step leaves nothing behind."""

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward and clipping, before ``optimizer.step()`` (e.g. freeze a layer's grads)."""

    def after_optimizer_step(self, step: int, applied: Tensor | None = None) -> None:
        """Called after ``optimizer.step()`` (e.g. EMA teacher update, center update).

        ``applied`` (``train.nonfinite_check=device``): a 0-dim float tensor on the device, 0 when the step was
        skipped for a non-finite loss (the optimizer did not move), else 1; state updated here must then stay
        exactly as it was, decided on the device (a lerp weight times ``applied``, a ``torch.where``), never by
        reading it on the host. None: the step is applied (the host already skipped a non-finite one)."""

    def eval_backbone(self) -> Backbone:  # pragma: no cover - abstract
        """The backbone whose features are evaluated and exported (the teacher for DINO)."""
        raise NotImplementedError

    def backbones(self) -> dict[str, Backbone]:
        """Named trainable backbones, for layer-wise lr decay and freezing."""
        return {}

    def metrics_after_step(self, step: int) -> dict[str, float]:
        """Scalars to log once the optimizer step is done (e.g. the EMA momentum just used); none by default."""
        return {}


class StudentTeacherMethod(Method):
    """A method with a trained ``student`` and a ``teacher`` that never trains (EMA or frozen): DINO, distillation.

    ``self.student`` and ``self.teacher`` are ``nn.ModuleDict``s with a ``"backbone"``; the student's backbone is
    the trainable one, and ``train()`` keeps the teacher in eval mode (no dropout/drop-path, frozen norms).
    """

    student: nn.ModuleDict
    teacher: nn.ModuleDict

    def backbones(self) -> dict[str, Backbone]:
        """The student's backbone (the only one with trainable parameters)."""
        return {"student.backbone": self.student["backbone"]}

    def student_local_cls(self, local: Tensor | None) -> Tensor | None:
        """Student class tokens ``(n_local * batch, D)`` of the local crops ``local`` ``(n_local, batch, C, h, w)``
        (view-major), or None without local crops."""
        if local is None:
            return None
        return self.student["backbone"].forward_features(local.flatten(0, 1)).cls

    def student_crop_logits(self, global_cls: Tensor, local: Tensor | None, n_global: int, batch: int) -> Tensor:
        """Student DINO-head logits of every crop, ``(n_global + n_local, batch, K)`` float: the global crops'
        class tokens ``global_cls`` first, then the local crops ``local`` ``(n_local, batch, C, h, w)`` (if any)
        through the student backbone (the multi-crop student side of Caron et al. 2021).

        The head runs once on the class tokens of all crops concatenated (as DINOv2's ``ssl_meta_arch.py``
        does), so its prototype matrix and weight norm are evaluated once per step, not once per crop group.
        """
        local_cls = self.student_local_cls(local)
        cls = global_cls if local_cls is None else torch.cat([global_cls, local_cls])
        logits = self.student["dino_head"](cls)
        return logits.view(-1, batch, logits.shape[-1]).float()

    def train(self, mode: bool = True) -> StudentTeacherMethod:
        """Set ``mode`` on the student; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self
