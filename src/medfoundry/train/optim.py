"""Optimizer construction: AdamW parameter groups with no decay on 1-D parameters, layer-wise lr decay and the
patch embedding's lr multiplier."""

from __future__ import annotations

import re

import torch
from torch import nn

from medfoundry.config.schema import OptimConfig
from medfoundry.schedules import cosine

_BLOCK_RE = re.compile(r"\.blocks\.(\d+)\.")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, gains, tokens, position embeddings and scalars get no weight decay (DINO/timm rule)."""
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or any(t in name for t in ("cls_token", "reg_token", "mask_token", "pos_embed", "logit_scale"))
    )


def layer_id(name: str, depth: int) -> int:
    """Depth index for layer-wise lr decay: 0 for embeddings, i+1 for block i, depth+1 for the rest."""
    match = _BLOCK_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(t in name for t in ("patch_embed", "cls_token", "reg_token", "pos_embed", "mask_token")):
        return 0
    return depth + 1


def is_patch_embed(name: str) -> bool:
    """Whether parameter ``name`` belongs to a backbone's patch embedding (timm's ``vit.patch_embed.*``)."""
    dotted = f".{name}"
    return ".backbone." in dotted and ".patch_embed." in dotted


def lr_scale(name: str, cfg: OptimConfig, depth: int | None) -> float:
    """The lr multiplier of parameter ``name``: layer-wise decay times, for the patch embedding, the
    ``optim.patch_embed_lr_mult``.

    Both follow DINOv2 (``dinov2/utils/param_groups.py``, ``get_params_groups_with_decay``): a backbone
    parameter at depth index ``i`` (:func:`layer_id`) gets ``layer_decay ** (depth + 1 - i)``, and a parameter
    whose name contains ``patch_embed`` additionally gets ``patch_embed_lr_mult`` (0.2 in DINOv2's
    ``ssl_default_config.yaml``, kept by OpenMidnight), so the two compose by multiplication.
    """
    scale = 1.0
    if cfg.layer_decay != 1.0 and depth is not None and ".backbone." in f".{name}":
        scale = cfg.layer_decay ** (depth + 1 - layer_id(name, depth))
    if cfg.patch_embed_lr_mult != 1.0 and is_patch_embed(name):
        scale *= cfg.patch_embed_lr_mult
    return scale


def param_groups(model: nn.Module, cfg: OptimConfig, depth: int | None = None) -> list[dict]:
    """Groups keyed by (weight decay on/off, lr scale); each group records ``lr_scale`` (:func:`lr_scale`) and
    ``wd_scale``."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p)
        scale = lr_scale(name, cfg, depth)
        key = (decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_scale": scale, "wd_scale": 1.0 if decay else 0.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


#: Device types whose parameters get torch's fused AdamW kernel by default.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, cfg: OptimConfig, depth: int | None = None,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW, fused wherever torch has the fused kernel for the parameters' device (CPU and CUDA), ``foreach``
    elsewhere; or, with ``optim.name=sgd``, SGD with momentum over the trainable parameters.

    The fused kernel updates each parameter, its moments and the weight decay in one pass with no temporaries; the
    ``foreach`` path (what dinov2's ``ssl_meta_arch.py`` asks for) makes a parameter-sized ``sqrt`` temporary per
    parameter (64 MB for DINOv2's prototypes) and passes over the moments several times. On one CPU thread the
    fused step of a ViT-S/16 + DINOv2 head (44 M parameters) measured 42 ms against 214 ms
    (``benchmarks/bench_optimizer_step.py``, 2-core CPU machine); the two agree to float rounding
    (``tests/train/test_train_schedules_optim.py``). A fused AdamW can also skip its step on a device flag
    (``found_inf``: ``train.nonfinite_check=device``). ``fused=False`` asks for ``foreach``."""
    groups = param_groups(model, cfg, depth)
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen")
    if cfg.name == "sgd":  # weight decay (per group, set by apply_schedules) is SGD's L2 term
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
    if fused is None:
        fused = all(p.device.type in FUSED_ADAMW_DEVICES for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0, fused=fused or None,
                             foreach=None if fused else True)


def apply_schedules(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, total_steps: int) -> dict:
    """Set lr and weight decay of every group for ``step``; returns the base values for logging."""
    lr = cosine(step, total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps, 0.0)
    wd = cosine(step, total_steps, cfg.weight_decay, cfg.weight_decay_end)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = wd * group.get("wd_scale", 1.0)
    return {"lr": lr, "weight_decay": wd}
