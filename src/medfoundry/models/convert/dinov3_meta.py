"""Meta's DINOv3 ``.pth`` (facebookresearch/dinov3 ``DinoVisionTransformer``) -> medfoundry RoPE backbone.

Source layout (``dinov3_vit*16_pretrain_*.pth`` or the ``teacher``/``backbone.`` entry of a training
checkpoint):

* ``cls_token`` (1, 1, D), ``storage_tokens`` (1, R, D) (DINOv3's registers), ``mask_token`` (1, D),
  ``patch_embed.proj.{weight,bias}``, ``rope_embed.periods`` (D_head / 4) - a persistent buffer
  holding the RoPE periods (``base ** (2i / (D_head / 2))`` with ``base`` = 100);
* per block ``norm1``, ``attn.qkv.weight``, ``attn.qkv.bias`` with ``attn.qkv.bias_mask`` (the
  key third of the bias is multiplied by 0: ``LinearKMaskedBias``), ``attn.proj``, ``ls1.gamma``,
  ``norm2``, ``mlp.fc1``/``mlp.fc2`` (or SwiGLU ``mlp.w1``/``w2``/``w3``), ``ls2.gamma``;
* final ``norm``; optionally ``cls_norm`` (untied class-token norm) and ``local_cls_norm``
  (7B training only).

The sizes (facebookresearch/dinov3 ``hub/backbones.py``): ViT-S/B/L use the GELU MLP; ViT-S+/16 and
ViT-H+/16 (``ffn_layer="swiglu"``, ``ffn_ratio=6``) and ViT-7B/16 (``"swiglu64"``, ``ffn_ratio=3``) a
SwiGLU of hidden width ``int(D * ratio * 2 / 3)`` rounded up to a multiple of 8 / 64 (1536, 5120,
8192), which is timm's ``fc1_g``/``fc1_x`` width. S+/H+ have ``attn.qkv.bias`` + ``bias_mask``;
the 7B has no qkv bias but ``local_cls_norm`` (``untie_global_and_local_cls_norm``).

Target: timm ``Eva`` keys under ``vit.``: ``reg_token``, ``blocks.N.gamma_1``/``gamma_2``,
``attn.q_bias``/``attn.v_bias`` (the key bias is a fixed zero buffer), SwiGLU ``fc1_g``/``fc1_x``/
``fc2``. The RoPE periods are not loaded but checked against the ones the target computes.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from medfoundry.models.backbone import Backbone
from medfoundry.models.convert import (
    Converted,
    PretrainedLoadError,
    prepare_meta_state_dict,
    put_layer_scale,
    put_qkv_bias,
    require_layout,
)

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_RENAMES = {"mlp.w1.weight": "mlp.fc1_g.weight", "mlp.w1.bias": "mlp.fc1_g.bias",
            "mlp.w2.weight": "mlp.fc1_x.weight", "mlp.w2.bias": "mlp.fc1_x.bias",
            "mlp.w3.weight": "mlp.fc2.weight", "mlp.w3.bias": "mlp.fc2.bias"}


def looks_like(sd: dict[str, Tensor]) -> bool:
    """Meta DINOv3 keys: ``storage_tokens`` or ``rope_embed.periods``, or a mask token without ``pos_embed``."""
    keys = {k.removeprefix("backbone.") for k in sd}
    return (
        "storage_tokens" in keys
        or "rope_embed.periods" in keys
        or ("mask_token" in keys and "pos_embed" not in keys and "cls_token" in keys)
    )


def check_rope_periods(periods: Tensor, backbone: Backbone) -> str:
    """Compare the checkpoint's RoPE periods with the target's; returns a note or raises.

    Equal within 1e-4, or equal to the target's rounded to bfloat16 (how Meta's released
    checkpoints store them), is a match; anything else means another RoPE base and is refused.
    """
    rope = getattr(backbone.vit, "rope", None)
    target = getattr(rope, "periods", None)
    if target is None:
        raise PretrainedLoadError(f"backbone '{backbone.name}' has no DINOv3 RoPE module to match rope_embed.periods")
    want, got = target.float().cpu(), periods.float().cpu()
    if want.shape == got.shape and torch.allclose(want, got, rtol=1e-4):
        return "RoPE periods match the target's (computed, not loaded)"
    # Meta's released checkpoints hold the periods rounded to bfloat16 (a bf16 buffer at training time)
    if want.shape == got.shape and torch.allclose(want.to(torch.bfloat16).float(), got, rtol=1e-4):
        return ("RoPE periods match the target's rounded to bfloat16, as Meta's checkpoints store them; the target "
                "keeps float32 periods (as timm does), so features differ from Meta's code by that rounding")
    raise PretrainedLoadError(
        f"rope_embed.periods of the checkpoint {periods.flatten()[:4].tolist()}... differ from the target's "
        f"{target.flatten()[:4].tolist()}... (RoPE base/min/max period); the features would change"
    )


def convert(obj: dict, backbone: Backbone) -> Converted:
    """Map a Meta DINOv3 state dict onto ``backbone``'s (timm Eva) keys."""
    require_layout(backbone, eva=True, fmt="DINOv3")
    out = Converted(pos_prefix=0)
    sd = prepare_meta_state_dict(obj, out)
    masks = {k: v for k, v in sd.items() if k.endswith("qkv.bias_mask")}
    for key, value in sd.items():
        if key == "cls_token":
            out.put(key, "vit.cls_token", value)
        elif key == "storage_tokens":
            out.put(key, "vit.reg_token", value)
        elif key == "mask_token":
            out.put(key, "mask_token", value.reshape(1, -1))
        elif key == "rope_embed.periods":
            out.skip(key, check_rope_periods(value, backbone))
        elif key.startswith(("patch_embed.", "norm.")):
            out.put(key, f"vit.{key}", value)
        elif key.startswith("local_cls_norm."):
            out.skip(key, "local-crop class-token norm, used only in DINOv3 7B training")
        elif key.startswith("cls_norm."):
            raise PretrainedLoadError(
                f"'{key}': this checkpoint unties the class-token norm (untie_cls_and_patch_norms); "
                "medfoundry backbones apply one final norm to all tokens"
            )
        elif key.startswith(("head.", "projectors.")):
            out.skip(key, "head / distillation projector (not part of the backbone)")
        elif key.startswith("blocks."):
            match = _BLOCK.match(key)
            if match is None:
                out.put(key, f"vit.{key}", value)
                continue
            block, rest = int(match.group(1)), match.group(2)
            if rest == "attn.qkv.bias_mask":
                out.skip(key, "key-bias mask, applied to attn.qkv.bias")
            elif rest == "attn.qkv.bias":
                mask = masks.get(key + "_mask")
                if mask is not None and torch.isnan(mask).any():  # never initialised: Meta's default mask
                    mask = torch.ones_like(value)
                    mask[value.shape[0] // 3: 2 * value.shape[0] // 3] = 0
                bias = value * mask.to(value.dtype) if mask is not None else value
                q, k, v = bias.chunk(3)
                put_qkv_bias(out, backbone, [key], block, q, k, v)
            elif rest in ("ls1.gamma", "ls2.gamma"):
                put_layer_scale(out, backbone, key, block, int(rest[2]), value)
            else:
                out.put(key, f"vit.blocks.{block}.{_RENAMES.get(rest, rest)}", value)
        else:
            out.put(key, f"vit.{key}", value)
    return out
