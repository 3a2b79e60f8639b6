"""Minimal, explicit collectives used by the loss modules.

Every helper is a no-op (or returns the single-process value) when ``torch.distributed`` is not
available or not initialised, so the losses run unchanged in a plain single-process script, in
unit tests, and under ``torchrun``. Reductions operate **in place** on the tensor they are given
and return it, which lets call sites write ``total = all_reduce_sum(x.sum())``. None of these
helpers carries gradients across ranks: they are meant for no-grad statistics (teacher centers,
Sinkhorn-Knopp normalisers, counts).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_max", "all_reduce_mean", "all_reduce_sum", "is_initialized", "world_size"]


def is_initialized() -> bool:
    """Return True when a default ``torch.distributed`` process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default process group, or 1 when not running distributed."""
    return dist.get_world_size() if is_initialized() else 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks in place and return it (identity when not distributed)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average ``t`` over all ranks in place and return it (identity when not distributed)."""
    n = world_size()
    if n > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(n)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise maximum of ``t`` over all ranks, in place (identity when not distributed)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
