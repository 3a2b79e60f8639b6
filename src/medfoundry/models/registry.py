"""Backbone registry and the one factory that builds any registered backbone.

Names follow timm's where a timm architecture exists (``vit_base_patch14_dinov2``,
``vit_base_patch16_dinov3`` ...); the ``vit_tiny_*`` entries are small models for CPU tests and
demos. ``medfoundry models`` prints the table.

DINOv3's SwiGLU sizes are registered too: ViT-S+/16, ViT-H+/16 (each with a ``*_qkvb`` variant in the
layout of Meta's checkpoints) and ViT-7B/16 (6.7 B parameters, 27 GB in fp32: build it inside
``with torch.device("meta"):`` to inspect it without allocating, and train it sharded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import timm
from torch import nn

from medfoundry.config.names import register_names
from medfoundry.config.schema import ModelConfig
from medfoundry.models.backbone import Backbone


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered backbone and what it is."""

    name: str
    family: str  # dinov2 (absolute pos-embed), dinov3 (RoPE), vit (plain DINO ViT)
    description: str
    build: Callable[..., nn.Module]  # (img_size, in_chans, drop_path_rate) -> timm model
    cpu_friendly: bool = False  # small enough for CPU tests


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (names must be unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[BackboneSpec]:
    """All registered backbones, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; the error lists close names."""
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.3)
        raise KeyError(
            f"unknown backbone 'model.name={name}'; close names: {close or sorted(_REGISTRY)[:5]} "
            "(run `medfoundry models` for the full list)"
        )
    return _REGISTRY[name]


def create_backbone(cfg: ModelConfig) -> Backbone:
    """Build the backbone described by ``cfg`` (random init; weights are loaded separately)."""
    spec = get_spec(cfg.name)
    vit = spec.build(img_size=cfg.img_size, in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path_rate)
    backbone = Backbone(vit, name=cfg.name)
    if cfg.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


def _timm(timm_name: str, **fixed) -> Callable[..., nn.Module]:
    def build(img_size: int, in_chans: int, drop_path_rate: float) -> nn.Module:
        return timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            **fixed,
        )

    return build


def _tiny_vit(img_size: int, in_chans: int, drop_path_rate: float, reg_tokens: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=img_size,
        patch_size=8,
        in_chans=in_chans,
        num_classes=0,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=4.0,
        init_values=0.1 if reg_tokens else None,
        reg_tokens=reg_tokens,
        no_embed_class=reg_tokens > 0,
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
    )


def _tiny_rope(img_size: int, in_chans: int, drop_path_rate: float) -> nn.Module:
    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    return Eva(
        img_size=img_size,
        patch_size=8,
        in_chans=in_chans,
        num_classes=0,
        embed_dim=64,
        depth=4,
        num_heads=4,
        qkv_bias=False,
        init_values=0.1,
        rope_type="dinov3",
        rope_temperature=100,
        rope_rotate_half=True,
        use_rot_pos_emb=True,
        use_abs_pos_emb=False,
        num_reg_tokens=2,
        use_fc_norm=False,
        global_pool="token",
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(LayerNorm, eps=1e-5),
    )


def _register_defaults() -> None:
    for size in ("small", "base", "large", "giant"):
        for reg in ("", "_reg4"):
            name = f"vit_{size}_patch14{reg}_dinov2"
            register_backbone(
                BackboneSpec(
                    name,
                    "dinov2",
                    f"DINOv2 ViT-{size[0].upper()}/14{' + 4 registers' if reg else ''}, layer scale, abs pos-embed",
                    _timm(name),
                )
            )
    for size in ("small", "base", "large"):
        name = f"vit_{size}_patch16_dinov3"
        register_backbone(
            BackboneSpec(
                name,
                "dinov3",
                f"DINOv3 ViT-{size[0].upper()}/16: RoPE, 4 registers, layer scale (class-token pooling)",
                _timm(name, global_pool="token"),
            )
        )
        register_backbone(
            BackboneSpec(
                f"{name}_qkvb",
                "dinov3",
                f"DINOv3 ViT-{size[0].upper()}/16 with q/v biases (Meta's non-distilled checkpoints)",
                _timm(f"{name}_qkvb", global_pool="token"),
            )
        )
    for size, short, meta_name in (("small_plus", "S+", "dinov3_vits16plus"), ("huge_plus", "H+", "dinov3_vith16plus")):
        name = f"vit_{size}_patch16_dinov3"
        register_backbone(
            BackboneSpec(
                name,
                "dinov3",
                f"DINOv3 ViT-{short}/16 (Meta's {meta_name}): SwiGLU MLP, RoPE, 4 registers, layer scale",
                _timm(name, global_pool="token"),
            )
        )
        register_backbone(
            BackboneSpec(
                f"{name}_qkvb",
                "dinov3",
                f"DINOv3 ViT-{short}/16 with q/v biases, the layout of Meta's {meta_name} checkpoint",
                _timm(f"{name}_qkvb", global_pool="token"),
            )
        )
    register_backbone(  # Meta's 7B has no qkv bias (qkv_bias=False), so there is no *_qkvb variant
        BackboneSpec(
            "vit_7b_patch16_dinov3",
            "dinov3",
            "DINOv3 ViT-7B/16 (Meta's dinov3_vit7b16): SwiGLU MLP, RoPE, 4 registers, layer scale, no qkv bias; "
            "train it sharded (docs/cluster.md, memory plan)",
            _timm("vit_7b_patch16_dinov3", global_pool="token"),
        )
    )
    for size, timm_name in (("small", "vit_small_patch16_224"), ("base", "vit_base_patch16_224"),
                            ("large", "vit_large_patch16_224")):
        register_backbone(
            BackboneSpec(
                f"vit_{size}_patch16",
                "vit",
                f"ViT-{size[0].upper()}/16 as in DINO (abs pos-embed, no registers)",
                _timm(timm_name),
            )
        )
    register_backbone(
        BackboneSpec("vit_tiny_patch8", "vit", "tiny ViT (64-d, 4 blocks, patch 8) for CPU tests", _tiny_vit, True)
    )
    register_backbone(
        BackboneSpec(
            "vit_tiny_patch8_reg2",
            "dinov2",
            "tiny DINOv2-style ViT with 2 registers for CPU tests",
            partial(_tiny_vit, reg_tokens=2),
            True,
        )
    )
    register_backbone(
        BackboneSpec("vit_tiny_patch8_rope", "dinov3", "tiny DINOv3-style RoPE ViT for CPU tests", _tiny_rope, True)
    )


_register_defaults()


register_names("backbone", lambda: list(_REGISTRY))  # config checks model.name against this (config/names.py)
