"""Teacher targets with an EMA center, shared by the DINO and iBOT losses (Caron et al. 2021; Zhou et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._dist import all_reduce_sum

__all__ = ["CenteredTeacherLoss"]


@torch.no_grad()
def _ema_update_center(center: Tensor, teacher_logits: Tensor, momentum: float, applied: Tensor | None = None) -> None:
    """In-place ``center <- m * center + (1 - m) * mean(teacher_logits)`` over the global batch.

    The per-prototype sums and the row count are packed into one tensor and all-reduced
    together, so ranks holding different numbers of rows (iBOT masked patches) are weighted
    correctly. If the global batch is empty, or ``applied`` is 0 (a step skipped on the device for a
    non-finite loss), the center is left unchanged. No host sync.
    """
    x = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).float()
    stats = torch.cat([x.sum(dim=0), x.new_full((1,), float(x.shape[0]))])
    stats = all_reduce_sum(stats)
    count = stats[-1]
    batch_mean = stats[:-1] / count.clamp_min(1.0)
    updated = center.float() * momentum + batch_mean.unsqueeze(0) * (1.0 - momentum)
    keep = count > 0 if applied is None else (count > 0) & (applied > 0)
    center.copy_(torch.where(keep, updated, center.float()))


class CenteredTeacherLoss(nn.Module):
    """Base of the self-distillation losses: the student temperature and the teacher's EMA center.

    Centering (Caron et al. 2021) subtracts an exponential moving average of the teacher logits
    before the sharpened softmax, so no single prototype dominates. DINO keeps one center for class
    tokens, iBOT (Zhou et al. 2022) a separate one for patch tokens; both use this class.

    Args:
        out_dim: number of prototypes ``K``.
        student_temp: student softmax temperature (0.1 in DINO/DINOv2).
        center_momentum: EMA momentum of the center (0.9 in DINO/DINOv2; 0.999 in DINO-X for CT).

    Buffers:
        center: ``(1, K)`` float32 EMA of the teacher logits, zero-initialised.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim <= 0:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, student_temp={self.student_temp}, "
            f"center_momentum={self.center_momentum}"
        )

    @torch.no_grad()
    def teacher_probs_centered(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher targets ``softmax((t - center) / teacher_temp)``; the center is not updated here.

        Args:
            teacher_logits: ``(..., K)`` teacher head outputs.
            teacher_temp: teacher temperature (typically warmed up 0.04 -> 0.07); low values sharpen.

        Returns:
            float32 probabilities with the same shape as ``teacher_logits``.
        """
        return F.softmax((teacher_logits.detach().float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor, applied: Tensor | None = None) -> None:
        """EMA update ``center = m * center + (1 - m) * mean`` over the global batch of this step.

        Per-prototype sums and the row count are all-reduced together, so ranks holding different
        numbers of rows (iBOT masked patches) are weighted by their counts; an empty global batch
        leaves the center unchanged.

        Args:
            teacher_logits: ``(N, K)`` (or ``(..., K)``) teacher head outputs of this rank.
            applied: 0-dim tensor, 0 when the step was skipped on the device (the center is kept); None: update.
        """
        _ema_update_center(self.center, teacher_logits, self.center_momentum, applied)
