"""Gram-matrix patch-similarity loss (DINOv3 Gram anchoring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GramLoss"]


class GramLoss(nn.Module):
    """MSE between per-image patch Gram matrices of student and target features.

    Gram anchoring from Siméoni et al. 2025 (DINOv3): long self-distillation runs let dense
    (patch-level) features degrade even as global features improve; regularising the
    student's patch-to-patch similarity structure towards that of a reference network keeps
    local features clean while leaving the features themselves free to move. For every image
    ``b`` the Gram matrix ``G_b = P_b P_b^T`` of its ``N`` (optionally L2-normalised) patch
    features is computed for student and target, and the loss is the mean squared difference
    over all ``B * N * N`` entries.

    The module does not choose the target: DINOv3 anchors to a *frozen earlier checkpoint*
    (the "Gram teacher", refreshed periodically, and fed higher-resolution inputs whose
    features are downsampled), while online variants (e.g. DINO-X style) use the current EMA
    teacher's patch features. Either way the caller passes ``target_patches``; they are
    detached here so no gradient reaches the target network.

    Args:
        normalize: L2-normalise patch features first, so Gram entries are cosine similarities
            and the loss is invariant to feature norms (DINOv3 default ``apply_norm=True``).
        remove_negatives: clamp negative similarities to zero in both Gram matrices before the
            MSE (DINOv3's ``remove_neg`` option), so only positive affinities are matched.
    """

    def __init__(self, normalize: bool = True, remove_negatives: bool = False) -> None:
        super().__init__()
        self.normalize = normalize
        self.remove_negatives = remove_negatives

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, remove_negatives={self.remove_negatives}"

    def _gram(self, patches: Tensor) -> Tensor:
        feats = patches.float()
        if self.normalize:
            feats = F.normalize(feats, p=2, dim=-1)
        gram = feats @ feats.transpose(-1, -2)
        if self.remove_negatives:
            gram = gram.clamp_min(0.0)
        return gram

    def forward(self, student_patches: Tensor, target_patches: Tensor) -> Tensor:
        """Compute the Gram loss.

        Args:
            student_patches: ``(B, N, D)`` student patch features (e.g. backbone output tokens).
            target_patches: ``(B, N, D_t)`` target patch features for the same images and patch
                grid; ``D_t`` may differ from ``D`` since only ``N x N`` Gram matrices are
                compared. Detached.

        Returns:
            Scalar float32 loss ``mean_{b,i,j} (G_s[b,i,j] - G_t[b,i,j])^2``.
        """
        if student_patches.ndim != 3 or target_patches.ndim != 3:
            raise ValueError(
                "expected (B, N, D) student and target patches, got "
                f"{tuple(student_patches.shape)} and {tuple(target_patches.shape)}"
            )
        if student_patches.shape[:2] != target_patches.shape[:2]:
            raise ValueError(
                f"student (B, N)={tuple(student_patches.shape[:2])} does not match target "
                f"{tuple(target_patches.shape[:2])}"
            )
        with torch.no_grad():
            target_gram = self._gram(target_patches.detach())
        student_gram = self._gram(student_patches)
        return F.mse_loss(student_gram, target_gram)
