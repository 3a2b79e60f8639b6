"""Apply parallelism from outside the model (torchtitan's idea): the method stays a plain module.

``parallelize`` wraps a training method for the current process group:

* ``ddp``: DistributedDataParallel over the whole method. DDP registers only parameters that require
  grad (the student), so the EMA teacher is never all-reduced; buffers are not re-broadcast because
  the centers are already all-reduced by the losses.
* ``fsdp``: FSDP2 (``fully_shard``) per transformer block of every backbone (student, teacher, Gram
  anchor alike), then per backbone, then the whole method (heads and the rest). Student and teacher
  are sharded identically, so the EMA update runs on local shards. With bf16 the parameters are
  gathered in bf16 and gradients reduced in fp32.

Optionally each block is compiled with ``torch.compile`` (``dist.compile``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medfoundry.config.schema import DistConfig
from medfoundry.models.backbone import Backbone


def parallelize(method: nn.Module, cfg: DistConfig, device: torch.device, precision: str = "fp32") -> nn.Module:
    """Return the module the loop calls: ``method`` itself (one process, FSDP) or a DDP wrapper."""
    import torch.distributed as dist

    if cfg.compile:
        for backbone in _backbones(method):
            for block in backbone.blocks:
                block.compile()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return method
    if cfg.strategy == "fsdp":
        apply_fsdp(method, precision)
        return method
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(method, device_ids=ids, broadcast_buffers=False)


def apply_fsdp(method: nn.Module, precision: str = "fp32") -> None:
    """Shard ``method`` in place with FSDP2: blocks, then backbones, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs = {}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for backbone in _backbones(method):
        for block in backbone.blocks:
            fully_shard(block, **kwargs)
        fully_shard(backbone, **kwargs)
        for name in ("forward_features", "last_attention"):
            register_fsdp_forward_method(backbone, name)
    fully_shard(method, **kwargs)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor shard (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap(module).parameters())


def unwrap(module: nn.Module) -> nn.Module:
    """The method inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def _backbones(method: nn.Module) -> list[Backbone]:
    return [m for m in method.modules() if isinstance(m, Backbone)]
