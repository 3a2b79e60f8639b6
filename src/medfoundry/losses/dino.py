"""DINO image-level (CLS token) self-distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .centering import CenteredTeacherLoss
from .sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss"]


class DINOLoss(CenteredTeacherLoss):
    """Cross-entropy between teacher and student prototype distributions over pairs of views.

    Implements the self-distillation objective of Caron et al. 2021 (DINO, "Emerging Properties
    in Self-Supervised Vision Transformers"), with the two teacher-target options used by
    Oquab et al. 2023 (DINOv2): *centering* (softmax of centered, sharpened teacher logits with
    an EMA center, DINO) or *Sinkhorn-Knopp* (SwAV-style balanced assignments, DINOv2).

    The loss itself is ``H(p_t, p_s) = -sum_k p_t[k] * log softmax(s / student_temp)[k]``
    averaged over the batch and over all (student view, teacher view) pairs. Following the
    original DINO code, the pair (i, i) is skipped when ``skip_same_view`` because the first
    ``n_t`` student views are the very crops the teacher saw; predicting a view from itself
    gives no learning signal. The method is responsible for any extra weighting (e.g. DINOv2's
    separate global/local terms).

    Args:
        out_dim: number of prototypes ``K`` (head output dimension).
        student_temp: student softmax temperature (0.1 in DINO/DINOv2).
        center_momentum: EMA momentum of the teacher center (0.9 in DINO/DINOv2).

    Buffers:
        center: ``(1, K)`` float32 EMA of the teacher logits, zero-initialised.
    """

    @torch.no_grad()
    def teacher_probs_sinkhorn(
        self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> Tensor:
        """DINOv2 teacher targets via Sinkhorn-Knopp over the global batch (Oquab et al. 2023).

        Args:
            teacher_logits: ``(N, K)`` teacher head outputs of this rank (e.g. both global
                crops stacked); the global batch is the sum of ``N`` over ranks.
            teacher_temp: teacher temperature.
            n_iterations: Sinkhorn-Knopp iterations.

        Returns:
            ``(N, K)`` float32 targets whose rows sum to 1. See :func:`sinkhorn_knopp`.
        """
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=n_iterations)

    @staticmethod
    def entropy(probs: Tensor) -> Tensor:
        """Per-row Shannon entropy ``-sum_k p log p`` (nats), with ``0 log 0 = 0``. For logging."""
        return -torch.special.xlogy(probs, probs).sum(dim=-1)

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, skip_same_view: bool = True) -> Tensor:
        """Average cross-entropy over the batch and over (student view, teacher view) pairs.

        Args:
            student_logits: ``(n_s, B, K)`` student head outputs, one slice per view; the first
                ``n_t`` views must be the teacher's (global) views when ``skip_same_view``.
            teacher_probs: ``(n_t, B, K)`` teacher targets (rows sum to 1), e.g. from
                :meth:`teacher_probs_centered` or :meth:`teacher_probs_sinkhorn`. Detached.
            skip_same_view: drop pairs whose student and teacher view indices are equal.

        Returns:
            Scalar float32 loss ``sum_{valid (s, t)} mean_b H(t_b, s_b) / n_valid_pairs``.
        """
        if student_logits.ndim != 3 or teacher_probs.ndim != 3:
            raise ValueError(
                "expected student_logits (n_s, B, K) and teacher_probs (n_t, B, K), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
            )
        n_s, batch, n_protos = student_logits.shape
        n_t = teacher_probs.shape[0]
        if teacher_probs.shape[1:] != (batch, n_protos):
            raise ValueError(
                f"teacher_probs shape {tuple(teacher_probs.shape)} does not match student (., {batch}, "
                f"{n_protos})"
            )
        pair_mask = torch.ones(n_t, n_s, dtype=torch.bool, device=student_logits.device)
        if skip_same_view:
            same = torch.arange(min(n_s, n_t), device=student_logits.device)
            pair_mask[same, same] = False
        n_pairs = n_t * n_s - (min(n_s, n_t) if skip_same_view else 0)  # pair_mask.sum(), without a host read
        if n_pairs == 0:
            raise ValueError(
                f"no (student, teacher) view pairs left with n_s={n_s}, n_t={n_t}, skip_same_view=True; "
                "pass skip_same_view=False"
            )
        if batch == 0:
            return student_logits.sum() * 0.0

        log_p_student = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        targets = teacher_probs.detach().float()
        # cross_entropy[t, s] = -(1/B) * sum_{b,k} targets[t, b, k] * log_p_student[s, b, k]
        cross_entropy = -torch.einsum("tbk,sbk->ts", targets, log_p_student) / batch
        return cross_entropy[pair_mask].sum() / n_pairs
