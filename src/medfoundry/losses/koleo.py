"""KoLeo (Kozachenko-Leonenko) nearest-neighbour spreading regulariser."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """Differential-entropy regulariser from nearest-neighbour distances on the unit sphere.

    From Sablayrolles et al. 2019 ("Spreading vectors for similarity search", ICLR), based on
    the Kozachenko-Leonenko entropy estimator, and used on the student CLS tokens by Oquab et
    al. 2023 (DINOv2) with weight 0.1. With ``x_i`` L2-normalised and ``d_i`` the Euclidean
    distance from ``x_i`` to its nearest other row,
    ``loss = -(1/B) * sum_i log(d_i + eps)``; minimising it pushes nearest neighbours apart and
    spreads the batch uniformly over the sphere.

    Computed **per rank** on the local batch only, exactly like DINOv2 (no gather): the
    nearest neighbour is searched among this rank's ``B`` rows. DINOv2 also applies it
    separately to each global crop's CLS tokens so two views of one image are never
    neighbours; the caller should chunk accordingly. Nearest-neighbour indices are found without
    gradient; the distance to the selected neighbour carries gradient to both rows.
    """

    def forward(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """Compute the KoLeo loss of a batch of embeddings.

        Args:
            x: ``(B, D)`` embeddings (need not be normalised).
            eps: added inside the distance and the log to keep both finite for duplicates.

        Returns:
            Scalar float32 loss. With ``B < 2`` no neighbour exists and a zero connected to the
            graph is returned.
        """
        if x.ndim != 2:
            raise ValueError(f"x must be 2-D (B, D), got shape {tuple(x.shape)}")
        if x.shape[0] < 2:
            return x.float().sum() * 0.0
        z = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            similarity = z @ z.t()
            similarity.fill_diagonal_(float("-inf"))
            neighbour = similarity.argmax(dim=1)
        distance = F.pairwise_distance(z, z[neighbour], p=2.0, eps=eps)
        return -torch.log(distance + eps).mean()
