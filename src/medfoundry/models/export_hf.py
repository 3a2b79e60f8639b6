"""Export to HuggingFace transformers: ``Dinov2Model``, ``Dinov2WithRegistersModel`` or ``DINOv3ViTModel``.

Meta/HF place a position embedding on the class token and none on registers; timm's register models
fold the class position into ``cls_token``, which is exactly representable (class position row = 0).
The written folder loads with ``transformers.AutoModel.from_pretrained(DIR)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from medfoundry.models.backbone import Backbone
from medfoundry.models.convert import is_eva
from medfoundry.models.export import (
    ExportError,
    ExportResult,
    _fail_if_far,
    _native_size,
    _norm_eps,
    _probe,
    _tokens,
    num_registers,
)


def _assign(target: dict[str, Tensor], candidates: list[str], value: Tensor, filled: set[str]) -> None:
    for name in candidates:
        if name in target:
            if target[name].shape != value.shape:
                raise ExportError(f"HF key {name}: shape {tuple(target[name].shape)} vs {tuple(value.shape)}")
            target[name] = value.detach().clone().to(target[name].dtype)
            filled.add(name)
            return
    raise ExportError(f"none of the HF keys {candidates} exist in the transformers model")


def _check_plain_vit(backbone: Backbone) -> None:
    vit = backbone.vit
    if not backbone.has_class_token:
        raise ExportError("HF/timm export needs a class token")
    if not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity):
        raise ExportError("backbones with a pre-norm (norm_pre) have no HF DINO equivalent")
    for blk in vit.blocks:
        attn = blk.attn
        for n in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, n, nn.Identity()), nn.Identity):
                raise ExportError(f"attention {n} is not supported by the HF DINO models")


def _layer_scale(blk: nn.Module, which: int, dim: int) -> Tensor:
    ls = getattr(blk, f"ls{which}", None)
    if ls is not None and hasattr(ls, "gamma"):
        return ls.gamma
    gamma = getattr(blk, f"gamma_{which}", None)
    if isinstance(gamma, Tensor):
        return gamma
    return torch.ones(dim)


def _qkv_split(blk: nn.Module, dim: int) -> tuple[list[Tensor], list[Tensor | None]]:
    attn = blk.attn
    weights = list(attn.qkv.weight.chunk(3))
    if getattr(attn, "q_bias", None) is not None:
        biases = [attn.q_bias, torch.zeros(dim), attn.v_bias]
    elif attn.qkv.bias is not None:
        biases = list(attn.qkv.bias.chunk(3))
    else:
        biases = [None, None, None]
    return weights, biases


def to_hf_dinov2(backbone: Backbone):
    """A transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` with the backbone's weights."""
    import transformers
    from timm.layers import Mlp

    _check_plain_vit(backbone)
    vit, d = backbone.vit, backbone.embed_dim
    blk0 = vit.blocks[0]
    swiglu = not isinstance(blk0.mlp, Mlp)
    hidden = blk0.mlp.fc2.in_features
    mlp_ratio = hidden / d if not swiglu else 4
    if not swiglu and hidden % d:
        raise ExportError(f"MLP width {hidden} is not an integer multiple of {d}; HF Dinov2 needs an integer mlp_ratio")
    n_reg = num_registers(backbone)
    common = dict(
        hidden_size=d,
        num_hidden_layers=backbone.depth,
        num_attention_heads=blk0.attn.num_heads,
        mlp_ratio=int(mlp_ratio),
        image_size=_native_size(backbone),
        patch_size=backbone.patch_size,
        num_channels=backbone.in_chans,
        qkv_bias=blk0.attn.qkv.bias is not None,
        layerscale_value=1.0,
        layer_norm_eps=_norm_eps(vit.norm),
        use_swiglu_ffn=swiglu,
        hidden_act="gelu",
    )
    if n_reg:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=n_reg, **common))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    sd = model.state_dict()
    filled: set[str] = set()

    no_embed_class = bool(getattr(vit, "no_embed_class", False))
    n_prefix = 0 if no_embed_class else int(vit.num_prefix_tokens)
    pos = vit.pos_embed.detach()
    cls_token = vit.cls_token.detach()
    reg_tokens = vit.reg_token.detach() if n_reg else None
    grid = pos[:, n_prefix:]
    if n_prefix >= 1:
        cls_pos = pos[:, :1]
    else:
        cls_pos = torch.zeros(1, 1, d)
    if n_prefix > 1 and reg_tokens is not None:  # registers with own positions: fold them in (never resampled)
        reg_tokens = reg_tokens + pos[:, 1:n_prefix]
    _assign(sd, ["embeddings.cls_token"], cls_token, filled)
    _assign(sd, ["embeddings.position_embeddings"], torch.cat([cls_pos, grid], dim=1), filled)
    _assign(sd, ["embeddings.mask_token"], backbone.mask_token.detach().reshape(1, d), filled)
    if n_reg:
        _assign(sd, ["embeddings.register_tokens"], reg_tokens, filled)
    proj = vit.patch_embed.proj
    _assign(sd, ["embeddings.patch_embeddings.projection.weight"], proj.weight, filled)
    _assign(sd, ["embeddings.patch_embeddings.projection.bias"],
            proj.bias if proj.bias is not None else torch.zeros(d), filled)
    for i, blk in enumerate(vit.blocks):
        pre = f"encoder.layer.{i}."
        weights, biases = _qkv_split(blk, d)
        for role, legacy, w, b in zip("qkv", ("query", "key", "value"), weights, biases):
            _assign(sd, [f"{pre}attention.{role}_proj.weight", f"{pre}attention.attention.{legacy}.weight"], w, filled)
            if b is not None:
                _assign(sd, [f"{pre}attention.{role}_proj.bias", f"{pre}attention.attention.{legacy}.bias"], b, filled)
        _assign(sd, [f"{pre}attention.o_proj.weight", f"{pre}attention.output.dense.weight"], blk.attn.proj.weight,
                filled)
        _assign(sd, [f"{pre}attention.o_proj.bias", f"{pre}attention.output.dense.bias"],
                blk.attn.proj.bias if blk.attn.proj.bias is not None else torch.zeros(d), filled)
        for n in ("norm1", "norm2"):
            _assign(sd, [f"{pre}{n}.weight"], getattr(blk, n).weight, filled)
            _assign(sd, [f"{pre}{n}.bias"], getattr(blk, n).bias, filled)
        for which in (1, 2):
            _assign(sd, [f"{pre}layer_scale{which}.lambda1"], _layer_scale(blk, which, d), filled)
        mlp = blk.mlp
        for kind in ("weight", "bias"):
            fc1 = getattr(mlp.fc1, kind)
            fc2 = getattr(mlp.fc2, kind)
            if fc1 is None or fc2 is None:
                raise ExportError("HF Dinov2 MLPs have biases; this backbone's MLP has none")
            if swiglu:
                gate, up = fc1.chunk(2)
                if f"{pre}mlp.gate_proj.{kind}" in sd:
                    _assign(sd, [f"{pre}mlp.gate_proj.{kind}"], gate, filled)
                    _assign(sd, [f"{pre}mlp.up_proj.{kind}"], up, filled)
                    _assign(sd, [f"{pre}mlp.down_proj.{kind}"], fc2, filled)
                else:
                    _assign(sd, [f"{pre}mlp.weights_in.{kind}"], fc1, filled)
                    _assign(sd, [f"{pre}mlp.weights_out.{kind}"], fc2, filled)
            else:
                _assign(sd, [f"{pre}mlp.fc1.{kind}"], fc1, filled)
                _assign(sd, [f"{pre}mlp.fc2.{kind}"], fc2, filled)
    _assign(sd, ["layernorm.weight"], vit.norm.weight, filled)
    _assign(sd, ["layernorm.bias"], vit.norm.bias, filled)
    _load_all(model, sd, filled)
    return model


def to_hf_dinov3(backbone: Backbone):
    """A transformers ``DINOv3ViTModel`` with the (timm Eva) backbone's weights."""
    import transformers

    _check_plain_vit(backbone)
    vit, d = backbone.vit, backbone.embed_dim
    rope = vit.rope
    if getattr(rope, "normalize_coords", "separate") != "separate" or getattr(rope, "temperature", None) is None:
        raise ExportError("HF DINOv3ViT supports RoPE with a base period (rope_theta) and 'separate' coordinates only")
    blk0 = vit.blocks[0]
    gated = hasattr(blk0.mlp, "fc1_g")
    fc_in = blk0.mlp.fc1_g if gated else blk0.mlp.fc1
    attn0 = blk0.attn
    has_qv_bias = getattr(attn0, "q_bias", None) is not None
    config = transformers.DINOv3ViTConfig(
        hidden_size=d,
        intermediate_size=fc_in.out_features,
        num_hidden_layers=backbone.depth,
        num_attention_heads=attn0.num_heads,
        patch_size=backbone.patch_size,
        image_size=_native_size(backbone),
        num_channels=backbone.in_chans,
        rope_theta=float(rope.temperature),
        query_bias=has_qv_bias,
        key_bias=False,
        value_bias=has_qv_bias,
        proj_bias=attn0.proj.bias is not None,
        mlp_bias=fc_in.bias is not None,
        layerscale_value=1.0,
        use_gated_mlp=gated,
        num_register_tokens=num_registers(backbone),
        layer_norm_eps=_norm_eps(vit.norm),
        hidden_act="silu" if gated else "gelu",
        pos_embed_rescale=None,
    )
    if getattr(attn0, "qkv", None) is None:
        raise ExportError("Eva attention without a fused qkv is not supported")
    model = transformers.DINOv3ViTModel(config)
    sd = model.state_dict()
    filled: set[str] = set()
    layer = "model.layer." if any(k.startswith("model.layer.") for k in sd) else "layer."
    _assign(sd, ["embeddings.cls_token"], vit.cls_token, filled)
    _assign(sd, ["embeddings.mask_token"], backbone.mask_token.detach().reshape(1, 1, d), filled)
    if num_registers(backbone):
        _assign(sd, ["embeddings.register_tokens"], vit.reg_token, filled)
    elif "embeddings.register_tokens" in sd:
        filled.add("embeddings.register_tokens")
    proj = vit.patch_embed.proj
    _assign(sd, ["embeddings.patch_embeddings.weight"], proj.weight, filled)
    _assign(sd, ["embeddings.patch_embeddings.bias"], proj.bias if proj.bias is not None else torch.zeros(d), filled)
    for i, blk in enumerate(vit.blocks):
        pre = f"{layer}{i}."
        weights, biases = _qkv_split(blk, d)
        for role, w, b in zip("qkv", weights, biases):
            _assign(sd, [f"{pre}attention.{role}_proj.weight"], w, filled)
            if b is not None and role != "k":
                _assign(sd, [f"{pre}attention.{role}_proj.bias"], b, filled)
        _assign(sd, [f"{pre}attention.o_proj.weight"], blk.attn.proj.weight, filled)
        if blk.attn.proj.bias is not None:
            _assign(sd, [f"{pre}attention.o_proj.bias"], blk.attn.proj.bias, filled)
        for n in ("norm1", "norm2"):
            _assign(sd, [f"{pre}{n}.weight"], getattr(blk, n).weight, filled)
            _assign(sd, [f"{pre}{n}.bias"], getattr(blk, n).bias, filled)
        for which in (1, 2):
            _assign(sd, [f"{pre}layer_scale{which}.lambda1"], _layer_scale(blk, which, d), filled)
        mlp = blk.mlp
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ExportError("Eva MLPs with an inner norm have no HF DINOv3 equivalent")
        pairs = [("gate_proj", mlp.fc1_g), ("up_proj", mlp.fc1_x)] if gated else [("up_proj", mlp.fc1)]
        pairs.append(("down_proj", mlp.fc2))
        for hf_name, lin in pairs:
            _assign(sd, [f"{pre}mlp.{hf_name}.weight"], lin.weight, filled)
            if lin.bias is not None:
                _assign(sd, [f"{pre}mlp.{hf_name}.bias"], lin.bias, filled)
    _assign(sd, ["norm.weight"], vit.norm.weight, filled)
    _assign(sd, ["norm.bias"], vit.norm.bias, filled)
    _load_all(model, sd, filled)
    return model


def _load_all(model: nn.Module, sd: dict[str, Tensor], filled: set[str]) -> None:
    left = sorted(set(sd) - filled)
    if left:
        raise ExportError(f"HF weights not covered by the export mapping: {left[:8]}")
    model.load_state_dict(sd, strict=True)
    model.eval()


def export_hf(backbone: Backbone, out_dir: Path, check: bool = True, tol: float = 1e-4) -> ExportResult:
    """Write a transformers ``save_pretrained`` folder; with ``check`` reload it via ``AutoModel``."""
    model = to_hf_dinov3(backbone) if is_eva(backbone) else to_hf_dinov2(backbone)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    result = ExportResult("hf", out_dir, sorted(out_dir.iterdir()),
                          load_hint=f"transformers.AutoModel.from_pretrained({str(out_dir)!r})")
    if check:
        from transformers import AutoModel

        reloaded = AutoModel.from_pretrained(str(out_dir)).eval()
        x = _probe(backbone)
        with torch.no_grad():
            ours = _tokens(backbone, x)
            theirs = reloaded(pixel_values=x).last_hidden_state
        result.max_abs_diff = float((ours - theirs).abs().max())
        _fail_if_far(result.max_abs_diff, tol, "HF export")
    return result
