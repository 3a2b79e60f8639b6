"""Apply parallelism from outside the model (torchtitan's idea): the method stays a plain module.

``parallelize`` wraps a training method for the current process group:

* ``ddp``: DistributedDataParallel over the whole method. DDP registers only parameters that require
  grad (the student), so the EMA teacher is never all-reduced; buffers are not re-broadcast because
  the centers are already all-reduced by the losses.
* ``fsdp``: FSDP2 (``fully_shard``) per transformer block of every backbone (student, teacher, Gram
  anchor alike), then per backbone, then the whole method (heads and the rest). Student and teacher
  are sharded identically, so the EMA update runs on local shards. With bf16 the parameters are
  gathered in bf16 and gradients reduced in fp32.

Optionally each block's linears train in Float8 through torchao (``dist.float8``; needs a GPU of
compute capability >= 8.9 such as the H100) and each block is compiled with ``torch.compile``
(``dist.compile``).
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

    if cfg.float8:
        apply_float8(method, device)
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


def apply_float8(method: nn.Module, device: torch.device) -> None:
    """Swap the transformer blocks' linear layers for torchao's Float8 training linears (before sharding).

    Only linears whose in/out features are multiples of 16 are converted (a Float8 GEMM requirement).
    Raises a clear error when torchao is missing or the device cannot run Float8 matmuls.
    """
    from medfoundry.config.loader import ConfigError

    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ConfigError("dist.float8=true needs torchao: pip install torchao") from err
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(
            f"dist.float8=true needs a CUDA GPU of compute capability >= 8.9 (H100/H200/L40S); got {device}. "
            "Set dist.float8=false."
        )

    def only_aligned_linears(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    for backbone in _backbones(method):
        for block in backbone.blocks:
            convert_to_float8_training(block, module_filter_fn=only_aligned_linears)


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
