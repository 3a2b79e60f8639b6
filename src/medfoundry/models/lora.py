"""LoRA adapters on a backbone through peft, merging them back, and ``adapt_backbone`` (LoRA + freezing).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") replaces the update of
a frozen linear ``W`` by a low-rank product: ``y = W x + (alpha / r) * B A x`` with ``A`` (r x in)
random and ``B`` (out x r) zero at the start, so training starts from the pretrained function.
medfoundry injects peft's ``lora.Linear`` in place (``peft.inject_adapter_in_model``) into the
attention and MLP linears of the transformer blocks (``qkv``, ``proj``, ``fc1``, ``fc2`` by default)
and keeps the ``Backbone`` structure, so the loop, checkpoints (``*.base_layer.weight``,
``*.lora_A.default.weight`` ...) and the EMA teacher (which gets the same adapters) work unchanged.
Exports merge the adapters into plain weights (:func:`merge_lora`).
"""

from __future__ import annotations

import copy
import re

from torch import nn

from medfoundry.config.adapt import AdaptConfig
from medfoundry.models.backbone import Backbone
from medfoundry.models.freeze import apply_freezing, count_parameters

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")


def lora_target_regex(targets: list[str] | tuple[str, ...]) -> str:
    """peft ``target_modules`` regex: the named linears inside transformer blocks only.

    A bare ``proj`` would also match the patch-embedding convolution ``patch_embed.proj``; the
    regex requires ``blocks.N.`` in the module path.
    """
    if not targets:
        raise ValueError("adapt.lora_targets is empty")
    alternatives = "|".join(re.escape(t) for t in targets)
    return rf"(.*\.)?blocks\.\d+\.(.*\.)?({alternatives})"


def lora_parameter_names(module: nn.Module) -> list[str]:
    """Names of the LoRA adapter parameters (``lora_A`` / ``lora_B`` ...) in ``module``."""
    return [n for n, _ in module.named_parameters() if ".lora_" in n]


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` contains peft LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def _check_eva_fused_bias(backbone: Backbone, targets: list[str] | tuple[str, ...]) -> None:
    """timm's Eva attention with q/v biases calls ``F.linear(x, self.qkv.weight, bias)``, bypassing a wrapped qkv."""
    if "qkv" not in targets:
        return
    for i, blk in enumerate(backbone.vit.blocks):
        if getattr(blk.attn, "q_bias", None) is not None and getattr(blk.attn, "qkv", None) is not None:
            raise ValueError(
                f"LoRA on 'qkv' of backbone '{backbone.name}' (block {i}): this timm Eva attention applies its q/v "
                "biases through the raw qkv weight, so a qkv adapter would be ignored. Drop 'qkv' from "
                "adapt.lora_targets or use a backbone without qkv bias."
            )


def apply_lora(
    backbone: Backbone,
    rank: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    trainable: list[str] | tuple[str, ...] = (),
) -> int:
    """Inject LoRA adapters into ``backbone`` in place; only the adapters (and ``trainable`` globs) train.

    Returns the number of LoRA parameters. The base weights, embeddings and norms are frozen (peft's
    rule); ``trainable`` re-enables extra backbone parameters by glob (e.g. ``["vit.norm.*"]``).
    """
    import fnmatch

    from peft import LoraConfig, inject_adapter_in_model

    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    if has_lora(backbone):
        raise ValueError(f"backbone '{backbone.name}' already has LoRA adapters")
    _check_eva_fused_bias(backbone, targets)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_regex(targets),
        bias="none",
    )
    inject_adapter_in_model(config, backbone)
    names = lora_parameter_names(backbone)
    if not names:
        raise ValueError(f"adapt.lora_targets={list(targets)} matched no linear layer in backbone '{backbone.name}'")
    for name, p in backbone.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora or any(fnmatch.fnmatchcase(name, pat) for pat in trainable))
    return sum(p.numel() for n, p in backbone.named_parameters() if ".lora_" in n)


def merge_lora(module: nn.Module) -> nn.Module:
    """Merge every LoRA adapter into its base linear and put the plain ``nn.Linear`` back, in place.

    After merging the module has exactly the parameter names of a never-adapted one
    (``...attn.qkv.weight``) and the same function (up to float rounding).
    """
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in wrapped:
        layer.merge()
        base = layer.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, base)
    return module


def merged_copy(backbone: Backbone) -> Backbone:
    """A deep copy of ``backbone`` with LoRA merged (the original keeps its adapters)."""
    clone = copy.deepcopy(backbone)
    if has_lora(clone):
        merge_lora(clone)
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def adapt_backbone(backbone: Backbone, cfg: AdaptConfig, verbose: bool = True) -> dict:
    """Apply the ``adapt`` section (an ``AdaptConfig``) to a backbone: LoRA first, then freezing rules.

    Call it on the student after pretrained weights are loaded and on the EMA teacher too (with
    ``verbose=False``) so both have the same parameter structure. Returns a summary dict with the
    LoRA parameter count, the frozen names and ``(trainable, total)`` counts; prints one line.
    """
    summary: dict = {"lora_params": 0, "frozen": []}
    if cfg.lora_rank > 0:
        summary["lora_params"] = apply_lora(
            backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.lora_trainable
        )
    summary["frozen"] = apply_freezing(
        backbone,
        patterns=list(cfg.freeze_patterns),
        embeddings=cfg.freeze_embeddings,
        first_n_blocks=cfg.freeze_first_n_blocks,
        unfreeze_last_n_blocks=cfg.unfreeze_last_n_blocks,
    )
    trainable, total = count_parameters(backbone)
    summary["trainable"], summary["total"] = trainable, total
    changed = cfg.lora_rank > 0 or summary["frozen"]
    if verbose and changed:
        parts = []
        if cfg.lora_rank > 0:
            parts.append(f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on {list(cfg.lora_targets)}: "
                         f"{summary['lora_params']:,} LoRA parameters")
        if summary["frozen"]:
            parts.append(f"{len(summary['frozen'])} tensors frozen by freezing rules")
        print(f"adapt {backbone.name}: {'; '.join(parts)}; trainable backbone parameters {trainable:,} of {total:,} "
              f"({100.0 * trainable / max(total, 1):.2f}%)", flush=True)
    return summary


__all__ = [
    "DEFAULT_TARGETS",
    "adapt_backbone",
    "apply_lora",
    "has_lora",
    "lora_parameter_names",
    "lora_target_regex",
    "merge_lora",
    "merged_copy",
]
