"""iBOT masked-patch self-distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .centering import CenteredTeacherLoss
from .sinkhorn import sinkhorn_knopp

__all__ = ["IBOTPatchLoss"]


class IBOTPatchLoss(CenteredTeacherLoss):
    """Masked image modelling by self-distillation on patch tokens (Zhou et al. 2022, iBOT).

    The student sees a global crop with some patches masked; for each masked patch, the loss is
    the cross-entropy between the teacher's prototype distribution for the *unmasked* patch and
    the student's prediction. Teacher targets are obtained either by centering + sharpening
    (iBOT, with its own EMA center) or by Sinkhorn-Knopp over all masked patches of all ranks
    (Oquab et al. 2023, DINOv2).

    Weighting follows the DINOv2 reference (``forward_masked``): every image contributes
    equally regardless of how many of its patches are masked, i.e. the loss is
    ``(1 / n_images) * sum_images mean_{masked tokens of image} CE``; images without masked
    tokens contribute 0 but still count in ``n_images``. The normaliser is local to the rank
    (as in DINOv2); DDP/FSDP gradient averaging then averages over ranks.

    Args:
        out_dim: number of patch prototypes ``K``.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the patch center (0.9).

    Buffers:
        center: ``(1, K)`` float32 EMA of teacher patch logits, zero-initialised.
    """

    @torch.no_grad()
    def teacher_probs_sinkhorn(
        self, teacher_patch_logits: Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> Tensor:
        """DINOv2 Sinkhorn-Knopp targets over all masked patches of all ranks (Oquab et al. 2023).

        The number of masked patches differs per rank, so the global count is all-reduced and
        used as the batch size of the transport problem. Must be called on every rank, also by
        ranks with ``M == 0``.

        Args:
            teacher_patch_logits: ``(M, K)`` teacher logits of this rank's masked patches.
            teacher_temp: teacher temperature.
            n_iterations: Sinkhorn-Knopp iterations.

        Returns:
            ``(M, K)`` float32 targets whose rows sum to 1.
        """
        # n_rows_global=None: sinkhorn_knopp all-reduces the row count itself (a device tensor, no host read)
        return sinkhorn_knopp(teacher_patch_logits, teacher_temp, n_iterations=n_iterations)

    def forward(
        self,
        student_patch_logits: Tensor,
        teacher_patch_probs: Tensor,
        image_index: Tensor,
        n_images: int,
    ) -> Tensor:
        """Per-image-averaged cross-entropy over masked patch tokens.

        Args:
            student_patch_logits: ``(M, K)`` student logits at the masked positions.
            teacher_patch_probs: ``(M, K)`` teacher targets for the same positions (detached).
            image_index: ``(M,)`` int64 index in ``[0, n_images)`` of the image each token
                comes from.
            n_images: number of images on this rank (masked or not), the normaliser.

        Returns:
            Scalar float32 loss. When ``M == 0`` a zero that is still connected to
            ``student_patch_logits`` (so ``backward()`` works and yields zero gradients).
        """
        if student_patch_logits.ndim != 2 or student_patch_logits.shape != teacher_patch_probs.shape:
            raise ValueError(
                "expected student_patch_logits and teacher_patch_probs of equal shape (M, K), got "
                f"{tuple(student_patch_logits.shape)} and {tuple(teacher_patch_probs.shape)}"
            )
        n_tokens = student_patch_logits.shape[0]
        if image_index.shape != (n_tokens,):
            raise ValueError(f"image_index must have shape ({n_tokens},), got {tuple(image_index.shape)}")
        if n_images <= 0:
            raise ValueError(f"n_images must be positive, got {n_images}")
        if n_tokens == 0:
            return student_patch_logits.float().sum() * 0.0

        image_index = image_index.to(device=student_patch_logits.device, dtype=torch.long)
        log_p_student = F.log_softmax(student_patch_logits.float() / self.student_temp, dim=-1)
        token_ce = -(teacher_patch_probs.detach().float() * log_p_student).sum(dim=-1)
        tokens_per_image = torch.bincount(image_index, minlength=n_images).to(token_ce.dtype)
        if tokens_per_image.shape[0] != n_images:
            raise ValueError(f"image_index has values >= n_images={n_images}")
        token_weight = 1.0 / tokens_per_image[image_index]
        return (token_ce * token_weight).sum() / n_images
