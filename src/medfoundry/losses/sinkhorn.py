"""Sinkhorn-Knopp teacher targets (SwAV / DINOv2 style), distributed-aware."""

from __future__ import annotations

import torch
from torch import Tensor

from ._dist import all_reduce_max, all_reduce_sum, world_size

__all__ = ["sinkhorn_knopp"]


@torch.no_grad()
def sinkhorn_knopp(
    logits: Tensor,
    temperature: float,
    n_iterations: int = 3,
    n_rows_global: int | Tensor | None = None,
) -> Tensor:
    """Turn teacher logits into balanced soft assignments with a few Sinkhorn-Knopp iterations.

    This replaces DINO's centering + sharpening of the teacher by an (approximate) optimal
    transport step: the assignment matrix ``Q`` of the *global* batch (all ranks) onto the ``K``
    prototypes is alternately rescaled so that every prototype receives the same total mass
    ``B_global / K`` and every sample a unit mass. It follows Caron et al. 2020 (SwAV, Alg. 1)
    as adopted for the teacher of Oquab et al. 2023 (DINOv2, ``centering: sinkhorn_knopp``) and
    Zhou et al. 2022 (iBOT) / DINOv2 for masked patch tokens.

    Order of operations per iteration (as in the DINOv2 reference): normalise each prototype's
    mass over the global batch to ``1/K`` (sums all-reduced), then each sample's mass to
    ``1/B_global`` (purely local); finally multiply by ``B_global``. Hence the returned rows sum
    to exactly 1 and the per-prototype column sums over the global batch approach
    ``B_global / K`` (exactly in the limit of many iterations; approximately after 3).

    Everything runs in float32 under ``no_grad``. A single global maximum is subtracted before
    exponentiation for numerical safety; being the same constant on every rank, it cancels in
    the first (global) normalisation, so the result equals the unshifted formula.

    Distributed contract: every rank must call this function collectively (same
    ``n_iterations``), even a rank that holds zero rows. Collectives used: one sum for the row
    count (only when ``n_rows_global`` is None), one max, one sum for the total mass and one
    ``(K,)`` sum per iteration.

    Args:
        logits: ``(B, K)`` teacher logits of this rank. ``B`` may differ across ranks (iBOT
            masked patches) and may be 0.
        temperature: teacher temperature (the logits are divided by it before ``exp``).
        n_iterations: number of Sinkhorn-Knopp iterations (DINOv2 uses 3).
        n_rows_global: total number of rows over all ranks. If None it is obtained by
            all-reducing the local ``B`` (equal to ``B * world_size`` for equal batches), kept as a
            0-dim device tensor so the step never waits for it on the host. Pass it when already
            known (an int, or such a tensor), e.g. the global number of masked patches for iBOT.

    Returns:
        ``(B, K)`` float32 tensor of soft targets whose rows sum to 1.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (B, K), got shape {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")

    scores = logits.detach().float() / temperature
    n_local, n_protos = scores.shape

    n_rows: int | Tensor
    if n_rows_global is None:  # over ranks the count stays a device tensor: no host read in the step
        n_rows = all_reduce_sum(scores.new_full((), float(n_local))) if world_size() > 1 else n_local
    else:
        n_rows = n_rows_global if isinstance(n_rows_global, Tensor) else int(n_rows_global)
    if isinstance(n_rows, int):
        if n_rows < n_local:
            raise ValueError(f"n_rows_global={n_rows} is smaller than the local number of rows {n_local}")
        if n_rows == 0:
            return scores.new_zeros((0, n_protos))

    if n_local > 0:
        shift = scores.max().clone()
    else:
        shift = torch.tensor(float("-inf"), dtype=torch.float32, device=scores.device)
    shift = all_reduce_max(shift)

    tiny = torch.finfo(torch.float32).tiny
    q = scores.sub_(shift).exp_()  # in place: ``scores`` is this function's own tensor (the division made it)
    q /= all_reduce_sum(q.sum()).clamp_min(tiny)
    for _ in range(n_iterations):
        per_prototype = all_reduce_sum(q.sum(dim=0, keepdim=True))
        q /= per_prototype.clamp_min(tiny)
        q /= n_protos
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny)
        q /= n_rows
    q *= n_rows
    return q
