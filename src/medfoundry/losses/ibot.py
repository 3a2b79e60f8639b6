"""iBOT masked-patch self-distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._dist import all_reduce_sum
from .dino import _ema_update_center
from .sinkhorn import sinkhorn_knopp

__all__ = ["IBOTPatchLoss"]


class IBOTPatchLoss(nn.Module):
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
    def teacher_probs_centered(self, teacher_patch_logits: Tensor, teacher_temp: float) -> Tensor:
        """iBOT teacher targets ``softmax((t - center) / teacher_temp)`` (Zhou et al. 2022).

        Args:
            teacher_patch_logits: ``(M, K)`` teacher logits of the masked positions.
            teacher_temp: teacher temperature.

        Returns:
            ``(M, K)`` float32 probabilities. The center is not updated here.
        """
        return F.softmax((teacher_patch_logits.detach().float() - self.center) / teacher_temp, dim=-1)

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
        count = torch.tensor(
            float(teacher_patch_logits.shape[0]), dtype=torch.float32, device=teacher_patch_logits.device
        )
        n_global = int(round(all_reduce_sum(count).item()))
        return sinkhorn_knopp(
            teacher_patch_logits, teacher_temp, n_iterations=n_iterations, n_rows_global=n_global
        )

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: Tensor) -> None:
        """EMA update of the patch center with the mean over all masked patches of all ranks.

        Sums and counts are all-reduced, so ranks with different numbers of masked patches are
        weighted by their patch counts. A globally empty set leaves the center unchanged.

        Args:
            teacher_patch_logits: ``(M, K)`` teacher logits of this rank's masked patches.
        """
        _ema_update_center(self.center, teacher_patch_logits, self.center_momentum)

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
