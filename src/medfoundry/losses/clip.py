"""Image-text contrastive losses: symmetric InfoNCE (CLIP) and pairwise sigmoid (SigLIP).

* :class:`ClipInfoNCELoss` - Radford et al., "Learning Transferable Visual Models From Natural
  Language Supervision", ICML 2021: cross-entropy over ``scale * cos(image_i, text_j)`` in both
  directions, the matching pair as the target, averaged.
* :class:`SigLIPLoss` - Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023:
  an independent binary logistic loss for every image-text pair, ``+1`` on the diagonal and ``-1``
  elsewhere, with a learnable scale and bias, summed over texts and averaged over images.

Under ``torch.distributed`` every rank sees the negatives of the whole global batch. Features are
gathered with :func:`torch.distributed.nn.functional.all_gather`, whose backward sums the gradients
that every rank's loss sends to a rank's features back to that rank; with the *local* scheme of
open_clip (Ilharco et al. 2021) each rank scores only its own rows against all columns, labels
offset by ``rank * local_batch``. DDP's gradient averaging then yields exactly the gradient of the
single-process loss over the global batch (tested with two gloo processes). The features passed in
are expected L2-normalised; ``logit_scale`` is the *exponentiated* scale (as in open_clip).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfoundry.losses._dist import is_initialized

__all__ = ["ClipInfoNCELoss", "SigLIPLoss", "gather_features"]


def _rank_world() -> tuple[int, int]:
    if is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_features(x: Tensor, with_grad: bool = True) -> Tensor:
    """Concatenate ``x`` (B, D) of all ranks along dim 0 (rank order); identity for one process.

    ``with_grad=True`` backpropagates into every rank's rows (gradients from all ranks are summed on
    the owner); ``with_grad=False`` gathers without autograd and puts the local, differentiable rows
    back in place (open_clip's ``gather_with_grad=False``).
    """
    rank, world = _rank_world()
    if world == 1:
        return x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated in favour of a private API; still the autograd-aware gather
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(x.contiguous()), dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


class ClipInfoNCELoss(nn.Module):
    """Symmetric InfoNCE over the global batch (CLIP).

    Args:
        local_loss: under DDP, score the local rows against all gathered columns (memory O(b * B)
            instead of O(B^2)); otherwise every rank computes the full B x B loss.
        gather_with_grad: let gathered features carry gradients back to the rank that owns them.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def logits(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
               logit_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits_per_image, logits_per_text, labels)`` for this rank."""
        rank, world = _rank_world()
        b = image_features.shape[0]
        if world > 1:
            all_img = gather_features(image_features, self.gather_with_grad)
            all_txt = gather_features(text_features, self.gather_with_grad)
            if self.local_loss:
                per_image = logit_scale * image_features @ all_txt.t()
                per_text = logit_scale * text_features @ all_img.t()
                labels = torch.arange(b, device=image_features.device) + rank * b
            else:
                per_image = logit_scale * all_img @ all_txt.t()
                per_text = per_image.t()
                labels = torch.arange(per_image.shape[0], device=image_features.device)
        else:
            per_image = logit_scale * image_features @ text_features.t()
            per_text = per_image.t()
            labels = torch.arange(b, device=image_features.device)
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text, labels

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None = None) -> Tensor:
        """Mean of image->text and text->image cross-entropy (scalar)."""
        per_image, per_text, labels = self.logits(image_features, text_features, logit_scale, logit_bias)
        return 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))


class SigLIPLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP) against the texts of the whole global batch.

    Each rank scores its images against all gathered texts (gathered with gradients); the per-rank
    value is ``-sum(log sigmoid(label * logit)) / local_images``, which DDP's averaging turns into the
    single-process loss over the global batch.
    """

    def __init__(self, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None = None) -> Tensor:
        """SigLIP loss (scalar) for normalised features, scale ``t`` and bias ``b``."""
        rank, world = _rank_world()
        b = image_features.shape[0]
        all_txt = gather_features(text_features, self.gather_with_grad) if world > 1 else text_features
        logits = logit_scale * image_features @ all_txt.t()
        if logit_bias is not None:
            logits = logits + logit_bias
        labels = -torch.ones_like(logits)
        idx = torch.arange(b, device=logits.device)
        labels[idx, idx + rank * b] = 1.0
        return -F.logsigmoid(labels * logits).sum() / b
