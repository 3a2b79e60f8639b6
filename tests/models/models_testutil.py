"""Shared builders for the ``tests/models`` suite: tiny backbones and reference models in original formats.

The reference models are transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` /
``DINOv3ViTModel`` (independent implementations of Meta's networks) with every parameter perturbed,
and helpers that rewrite their weights into Meta's original ``.pth`` key layouts (facebookresearch/dinov2
and facebookresearch/dinov3 ``DinoVisionTransformer``), so an import can be checked against the
reference model's own forward pass.
"""

from __future__ import annotations

import os
from functools import partial

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from medfoundry.models.backbone import Backbone  # noqa: E402

DIM, HEADS = 64, 4


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so that no weight sits at a trivially recognisable init value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def vit_backbone(img_size: int = 518, patch: int = 14, reg: int = 0, layer_scale: bool = True, depth: int = 2,
                 in_chans: int = 3, no_embed_class: bool | None = None, qkv_bias: bool = True) -> Backbone:
    """A tiny DINOv2-layout backbone (timm VisionTransformer) wrapped in medfoundry's Backbone."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=img_size, patch_size=patch, in_chans=in_chans, num_classes=0, embed_dim=DIM, depth=depth,
        num_heads=HEADS, init_values=1.0 if layer_scale else None, reg_tokens=reg, qkv_bias=qkv_bias,
        no_embed_class=(reg > 0) if no_embed_class is None else no_embed_class, dynamic_img_size=True,
    )
    return Backbone(vit, name="test_vit").eval()


def eva_backbone(img_size: int = 64, patch: int = 8, reg: int = 2, depth: int = 2, qkv_bias: bool = False,
                 in_chans: int = 3) -> Backbone:
    """A tiny DINOv3-layout backbone (timm Eva with DINOv3 RoPE) wrapped in medfoundry's Backbone."""
    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    vit = Eva(
        img_size=img_size, patch_size=patch, in_chans=in_chans, num_classes=0, embed_dim=DIM, depth=depth,
        num_heads=HEADS, qkv_bias=qkv_bias, init_values=1.0, rope_type="dinov3", rope_temperature=100,
        rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=reg,
        use_fc_norm=False, global_pool="token", dynamic_img_size=True, norm_layer=partial(LayerNorm, eps=1e-5),
    )
    return Backbone(vit, name="test_eva").eval()


def hf_dinov2(reg: int = 0, image_size: int = 518, patch: int = 14, depth: int = 2, seed: int = 0):
    """A perturbed random transformers Dinov2Model (or Dinov2WithRegistersModel when ``reg`` > 0)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(hidden_size=DIM, num_hidden_layers=depth, num_attention_heads=HEADS, image_size=image_size,
                  patch_size=patch, layerscale_value=1.0)
    if reg:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=reg, **common))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    return perturb(model, seed).eval()


def hf_dinov3(reg: int = 2, image_size: int = 64, patch: int = 8, depth: int = 2, qkv_bias: bool = True,
              seed: int = 0):
    """A perturbed random transformers DINOv3ViTModel (no key bias, as in DINOv3)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=DIM, intermediate_size=4 * DIM, num_hidden_layers=depth, num_attention_heads=HEADS,
        image_size=image_size, patch_size=patch, num_register_tokens=reg, query_bias=qkv_bias,
        value_bias=qkv_bias, key_bias=False, layerscale_value=1.0, pos_embed_rescale=None,
    )
    model = transformers.DINOv3ViTModel(cfg)
    model = perturb(model, seed)
    return model.eval()


def _hf_attn(sd: dict, pre: str) -> tuple[torch.Tensor, list]:
    """(fused qkv weight, [q, k, v] biases or None) of one HF layer, whatever the naming generation."""
    def get(role, legacy, kind):
        for key in (f"{pre}attention.{role}_proj.{kind}", f"{pre}attention.attention.{legacy}.{kind}"):
            if key in sd:
                return sd[key]
        return None
    w = torch.cat([get(r, lg, "weight") for r, lg in (("q", "query"), ("k", "key"), ("v", "value"))])
    b = [get(r, lg, "bias") for r, lg in (("q", "query"), ("k", "key"), ("v", "value"))]
    return w, b


def hf_dinov2_to_meta(model, chunks: int = 0) -> dict[str, torch.Tensor]:
    """Rewrite a HF DINOv2 model's weights in Meta's ``DinoVisionTransformer`` key layout.

    ``chunks`` > 0 writes the FSDP ``block_chunks`` layout ``blocks.C.N.*`` (N = global index).
    """
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = model.config
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, -1),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    depth = cfg.num_hidden_layers
    per_chunk = depth // chunks if chunks else depth
    for i in range(depth):
        pre = f"encoder.layer.{i}."
        blk = f"blocks.{i // per_chunk}.{i}." if chunks else f"blocks.{i}."
        w, b = _hf_attn(sd, pre)
        out[blk + "attn.qkv.weight"] = w
        out[blk + "attn.qkv.bias"] = torch.cat(b)
        o = "attention.o_proj" if f"{pre}attention.o_proj.weight" in sd else "attention.output.dense"
        out[blk + "attn.proj.weight"] = sd[f"{pre}{o}.weight"]
        out[blk + "attn.proj.bias"] = sd[f"{pre}{o}.bias"]
        for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            out[blk + f"{n}.weight"] = sd[f"{pre}{n}.weight"]
            out[blk + f"{n}.bias"] = sd[f"{pre}{n}.bias"]
        out[blk + "ls1.gamma"] = sd[f"{pre}layer_scale1.lambda1"]
        out[blk + "ls2.gamma"] = sd[f"{pre}layer_scale2.lambda1"]
    return out


def hf_dinov3_to_meta(model, k_bias_noise: bool = True) -> dict[str, torch.Tensor]:
    """Rewrite a HF DINOv3 model's weights in Meta's DINOv3 key layout.

    The key part of ``attn.qkv.bias`` is filled with noise (``k_bias_noise``) and masked out by
    ``attn.qkv.bias_mask`` exactly as Meta's ``LinearKMaskedBias`` does; ``rope_embed.periods``
    follows Meta's formula ``base ** (2 i / (D_head / 2))``.
    """
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, -1),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": cfg.rope_theta ** (2 * torch.arange(head_dim // 4) / (head_dim // 2)),
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    if cfg.num_register_tokens:
        out["storage_tokens"] = sd["embeddings.register_tokens"]
    prefix = "model.layer." if any(k.startswith("model.layer.") for k in sd) else "layer."
    d = cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        pre, blk = f"{prefix}{i}.", f"blocks.{i}."
        out[blk + "attn.qkv.weight"] = torch.cat([sd[f"{pre}attention.{r}_proj.weight"] for r in "qkv"])
        if cfg.query_bias:
            k_bias = torch.randn(d) if k_bias_noise else torch.zeros(d)
            out[blk + "attn.qkv.bias"] = torch.cat([sd[f"{pre}attention.q_proj.bias"], k_bias,
                                                    sd[f"{pre}attention.v_proj.bias"]])
            out[blk + "attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        out[blk + "attn.proj.weight"] = sd[f"{pre}attention.o_proj.weight"]
        out[blk + "attn.proj.bias"] = sd[f"{pre}attention.o_proj.bias"]
        for n in ("norm1", "norm2"):
            out[blk + f"{n}.weight"] = sd[f"{pre}{n}.weight"]
            out[blk + f"{n}.bias"] = sd[f"{pre}{n}.bias"]
        out[blk + "mlp.fc1.weight"] = sd[f"{pre}mlp.up_proj.weight"]
        out[blk + "mlp.fc1.bias"] = sd[f"{pre}mlp.up_proj.bias"]
        out[blk + "mlp.fc2.weight"] = sd[f"{pre}mlp.down_proj.weight"]
        out[blk + "mlp.fc2.bias"] = sd[f"{pre}mlp.down_proj.bias"]
        out[blk + "ls1.gamma"] = sd[f"{pre}layer_scale1.lambda1"]
        out[blk + "ls2.gamma"] = sd[f"{pre}layer_scale2.lambda1"]
    return out


@torch.no_grad()
def hf_tokens(model, x: torch.Tensor, n_reg: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cls, registers, patches) of a HF model's final-norm output."""
    h = model(pixel_values=x).last_hidden_state
    return h[:, 0], h[:, 1:1 + n_reg], h[:, 1 + n_reg:]


@torch.no_grad()
def max_diff(backbone: Backbone, ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor) -> float:
    """Largest absolute difference between the backbone's (cls, reg, patch) tokens and a reference."""
    out = backbone.eval().forward_features(x)
    diffs = [(out.cls - ref[0]).abs().max(), (out.patch - ref[2]).abs().max()]
    if ref[1].numel():
        diffs.append((out.reg - ref[1]).abs().max())
    return float(max(diffs))
