"""Apply data parallelism from outside the model (torchtitan's idea): the method stays a plain module."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medfoundry.config.schema import DistConfig


def parallelize(method: nn.Module, cfg: DistConfig, device: torch.device) -> nn.Module:
    """Wrap ``method`` for the current process group; returns it unchanged for a single process.

    DDP registers only parameters that require grad (the student), so the EMA teacher is never
    all-reduced; buffers are not re-broadcast because the centers are already all-reduced by the losses.
    """
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return method
    if cfg.strategy == "fsdp":
        raise NotImplementedError(
            "dist.strategy=fsdp is not available yet (scale-out issue); use dist.strategy=ddp"
        )
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(method, device_ids=ids, broadcast_buffers=False)


def unwrap(module: nn.Module) -> nn.Module:
    """The method inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module
