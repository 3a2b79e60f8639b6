"""Feature-matching losses for knowledge distillation into a smaller student.

DINOv3 (Siméoni et al. 2025, "DINOv3", section on distilling the 7B model into smaller ViTs and
ConvNeXts) trains the students with the *same* self-distillation objectives, with the frozen large
model as teacher: the DINO class-token loss and the iBOT patch loss on the teacher's head outputs
(:class:`medfoundry.losses.DINOLoss`). Distillation papers commonly add direct feature regression,
which transfers the teacher's embedding geometry even when no head is available (released
backbones ship without heads); the form used here is the cosine distance between the student's
tokens, linearly projected to the teacher's width, and the teacher's tokens.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CosineFeatureLoss", "match_patch_grid"]


def match_patch_grid(patches: Tensor, grid: tuple[int, int], target_grid: tuple[int, int]) -> Tensor:
    """Resample patch tokens (B, H*W, D) from ``grid`` to ``target_grid`` (bilinear; other patch sizes)."""
    if tuple(grid) == tuple(target_grid):
        return patches
    b, _, d = patches.shape
    img = patches.transpose(1, 2).reshape(b, d, grid[0], grid[1])
    img = F.interpolate(img.float(), size=tuple(target_grid), mode="bilinear", align_corners=False)
    return img.reshape(b, d, -1).transpose(1, 2).to(patches.dtype)


class CosineFeatureLoss(nn.Module):
    """Mean ``1 - cos(student, teacher)`` over tokens; the teacher side is detached.

    Scale-free (only directions are matched), so the student need not reproduce the teacher's
    feature norms, and bounded in [0, 2], so it mixes well with the DINO cross-entropy.

    Args:
        eps: numerical floor of the norms.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``student`` and ``teacher`` of the same shape (..., D) -> scalar float32 loss."""
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
        cos = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1, eps=self.eps)
        return (1.0 - cos).mean()
