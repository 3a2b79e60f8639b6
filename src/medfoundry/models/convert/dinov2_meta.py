"""Meta's DINOv2 ``.pth`` (facebookresearch/dinov2 ``DinoVisionTransformer``) -> medfoundry backbone.

Source layout (released backbones such as ``dinov2_vitb14_reg4_pretrain.pth``, or the ``teacher``
entry of a DINOv2 training checkpoint with its ``backbone.`` prefix):

* ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + 37*37, D) for 518 px at /14 (the first row is the
  class position), ``register_tokens`` (1, R, D) which get no position embedding,
  ``mask_token`` (1, D), ``patch_embed.proj.{weight,bias}``;
* ``blocks.N.*`` or, with ``block_chunks`` > 0 (FSDP wrapping), ``blocks.C.N.*`` where N is the
  global block index (each chunk is padded with ``Identity`` modules, which hold no weights);
* per block ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1``/``mlp.fc2``
  (or ``mlp.w12``/``mlp.w3`` for the SwiGLU giant), ``ls2.gamma``; final ``norm``.

Target: timm ``VisionTransformer`` keys under ``vit.``; layer scale ``ls1.gamma`` keeps its name,
SwiGLU ``w12``/``w3`` become timm's packed ``fc1``/``fc2``. Position-embedding prefix handling
(class position folded into ``cls_token`` for timm's register models) and grid resizing happen in
:mod:`medfoundry.models.pretrained`.
"""

from __future__ import annotations

import re

from torch import Tensor

from medfoundry.models.backbone import Backbone
from medfoundry.models.convert import (
    Converted,
    prepare_meta_state_dict,
    put_layer_scale,
    put_qkv_bias,
    require_layout,
)

_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")
_PLAIN = re.compile(r"^blocks\.(\d+)\.(.+)$")
_RENAMES = {"mlp.w12.weight": "mlp.fc1.weight", "mlp.w12.bias": "mlp.fc1.bias",
            "mlp.w3.weight": "mlp.fc2.weight", "mlp.w3.bias": "mlp.fc2.bias"}


def looks_like(sd: dict[str, Tensor]) -> bool:
    """Meta DINOv2 keys: a ``mask_token`` next to an absolute ``pos_embed`` and no DINOv3 storage tokens."""
    keys = {k.removeprefix("backbone.") for k in sd}
    return "mask_token" in keys and "pos_embed" in keys and "storage_tokens" not in keys


def convert(obj: dict, backbone: Backbone) -> Converted:
    """Map a Meta DINOv2 state dict (optionally wrapped / chunked) onto ``backbone``'s keys."""
    require_layout(backbone, eva=False, fmt="DINOv2")
    out = Converted(pos_prefix=1)
    sd = prepare_meta_state_dict(obj, out)
    chunked = any(_CHUNKED.match(k) for k in sd)
    if chunked:
        out.notes.append("chunked blocks (blocks.C.N.*) flattened to blocks.N.*")
    for key, value in sd.items():
        if key in ("cls_token", "pos_embed", "mask_token"):
            out.put(key, key if key == "mask_token" else f"vit.{key}", value)
        elif key == "register_tokens":
            out.put(key, "vit.reg_token", value)
        elif key.startswith(("patch_embed.", "norm.")):
            out.put(key, f"vit.{key}", value)
        elif key.startswith("head."):
            out.skip(key, "classification head (not part of the backbone)")
        elif key.startswith("blocks."):
            match = (_CHUNKED if chunked else _PLAIN).match(key)
            if match is None:
                out.put(key, f"vit.{key}", value)
                continue
            block, rest = int(match.group(1)), match.group(2)
            if rest in ("ls1.gamma", "ls2.gamma"):
                put_layer_scale(out, backbone, key, block, int(rest[2]), value)
            elif rest == "attn.qkv.bias":
                q, k, v = value.chunk(3)
                put_qkv_bias(out, backbone, [key], block, q, k, v)
            else:
                out.put(key, f"vit.blocks.{block}.{_RENAMES.get(rest, rest)}", value)
        else:
            out.put(key, f"vit.{key}", value)  # unknown: the loader reports it if the target has no such key
    return out
