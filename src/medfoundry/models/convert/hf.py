"""HuggingFace ``Dinov2Model`` / ``Dinov2WithRegistersModel`` / ``DINOv3ViTModel`` folders -> medfoundry backbone.

A folder written by ``save_pretrained`` holds ``config.json`` (``model_type`` ``dinov2``,
``dinov2_with_registers`` or ``dinov3_vit``) and ``model.safetensors`` (or sharded files with an
index, or ``pytorch_model.bin``). Both the legacy key names that ``save_pretrained`` writes and the
names of the in-memory modules of recent transformers releases are accepted:

DINOv2 (``embeddings.*``, ``encoder.layer.N.*``, ``layernorm.*``):
  ``embeddings.position_embeddings`` (1, 1 + N, D) with a class row, ``embeddings.mask_token`` (1, D),
  ``embeddings.register_tokens``, ``embeddings.patch_embeddings.projection``;
  ``attention.attention.{query,key,value}`` or ``attention.{q,k,v}_proj`` (fused into timm's
  ``attn.qkv``), ``attention.output.dense`` or ``attention.o_proj``, ``layer_scale{1,2}.lambda1``,
  ``mlp.fc1/fc2`` or SwiGLU ``mlp.weights_in/weights_out`` / ``mlp.{gate,up,down}_proj``.

DINOv3 (``embeddings.*``, ``layer.N.*`` or ``model.layer.N.*``, ``norm.*``):
  ``embeddings.patch_embeddings`` (a plain conv), ``embeddings.register_tokens``,
  ``embeddings.mask_token`` (1, 1, D); ``attention.{q,k,v,o}_proj`` (no key bias),
  ``layer_scale{1,2}.lambda1``, ``mlp.up_proj/down_proj`` (+ ``gate_proj`` when gated). The RoPE
  frequencies are not stored; ``rope_theta`` from the config is checked against the target.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from medfoundry.models.backbone import Backbone
from medfoundry.models.convert import (
    Converted,
    PretrainedLoadError,
    put_layer_scale,
    put_qkv_bias,
    require_layout,
)

MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")
_LAYER = re.compile(r"^(?:encoder\.|model\.)?layer\.(\d+)\.(.+)$")
_WRAPPER_PREFIXES = ("dinov2.", "dinov2_with_registers.", "dinov3_vit.", "backbone.")


def is_hf_folder(path: Path) -> bool:
    """A folder with a ``config.json`` whose ``model_type`` is one of :data:`MODEL_TYPES`."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") in MODEL_TYPES
    except (OSError, ValueError):
        return False


def read_folder(path: Path, what: str = "pretrained weights") -> tuple[dict[str, Tensor], dict]:
    """The state dict and config of a ``save_pretrained`` folder (single or sharded files).

    safetensors files hold tensors only; a ``pytorch_model.bin`` is a pickle and goes through the restricted
    reader (:func:`medfoundry.safe_load.load_torch_file`), which refuses one that would run code.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    files: list[Path]
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    else:
        raise PretrainedLoadError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin found")
    sd: dict[str, Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd.update(load_file(str(f)))
        else:
            from medfoundry.safe_load import load_torch_file

            sd.update(load_torch_file(f, f"{what} (HuggingFace folder)"))
    return sd, config


def looks_like(sd: dict[str, Tensor]) -> bool:
    """HuggingFace key names: ``embeddings.*`` with ``encoder.layer.N`` / ``layer.N`` blocks."""
    keys = [k.removeprefix(p) for k in sd for p in _WRAPPER_PREFIXES if k.startswith(p)] or list(sd)
    return any(k.startswith("embeddings.") for k in keys) and any(_LAYER.match(k) for k in keys)


def convert(sd: dict[str, Tensor], backbone: Backbone, config: dict | None = None) -> Converted:
    """Map a HF DINOv2/DINOv3 state dict (with its ``config.json`` contents) onto ``backbone``'s keys."""
    config = config or {}
    model_type = config.get("model_type") or ("dinov3_vit" if any(".q_proj." in k for k in sd)
                                              and not any("position_embeddings" in k for k in sd) else "dinov2")
    dinov3 = model_type == "dinov3_vit"
    require_layout(backbone, eva=dinov3, fmt=f"HuggingFace {model_type}")
    out = Converted(pos_prefix=1 if not dinov3 else 0)
    out.notes.append(f"HuggingFace model_type={model_type}")
    blocks: dict[int, dict[str, tuple[str, Tensor]]] = {}
    for raw, value in sd.items():
        key = raw
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        match = _LAYER.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = (raw, value)
        elif key == "embeddings.cls_token":
            out.put(raw, "vit.cls_token", value)
        elif key == "embeddings.mask_token":
            out.put(raw, "mask_token", value.reshape(1, -1))
        elif key == "embeddings.register_tokens":
            if value.shape[1] or getattr(backbone.vit, "reg_token", None) is not None:
                out.put(raw, "vit.reg_token", value)
            else:
                out.skip(raw, "zero register tokens")
        elif key == "embeddings.position_embeddings":
            out.put(raw, "vit.pos_embed", value)
        elif key in ("embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.weight"):
            out.put(raw, "vit.patch_embed.proj.weight", value)
        elif key in ("embeddings.patch_embeddings.projection.bias", "embeddings.patch_embeddings.bias"):
            out.put(raw, "vit.patch_embed.proj.bias", value)
        elif key.startswith(("layernorm.", "norm.")):
            out.put(raw, "vit.norm." + key.split(".", 1)[1], value)
        elif key.startswith(("classifier.", "pooler.")):
            out.skip(raw, "task head (not part of the backbone)")
        elif key.startswith("rope_embeddings."):
            out.skip(raw, "RoPE frequencies (recomputed)")
        else:
            out.put(raw, f"vit.{key}", value)  # unknown: reported by the loader if the target lacks it
    for block, parts in sorted(blocks.items()):
        _convert_block(out, backbone, block, parts, dinov3)
    if dinov3:
        out.notes.append(_check_rope(config, backbone))
    return out


def _take(parts: dict[str, tuple[str, Tensor]], *names: str) -> tuple[str, Tensor] | None:
    for name in names:
        if name in parts:
            return parts.pop(name)
    return None


def _convert_block(out: Converted, backbone: Backbone, i: int, parts: dict[str, tuple[str, Tensor]],
                   dinov3: bool) -> None:
    pre = f"vit.blocks.{i}."
    qkv = {}
    for role, legacy in (("q", "query"), ("k", "key"), ("v", "value")):
        for kind in ("weight", "bias"):
            got = _take(parts, f"attention.{role}_proj.{kind}", f"attention.attention.{legacy}.{kind}")
            if got is not None:
                qkv[(role, kind)] = got
    weights = [qkv.get((r, "weight")) for r in "qkv"]
    if any(w is None for w in weights):
        raise PretrainedLoadError(f"layer {i}: incomplete attention weights (found {sorted(qkv)})")
    out.put([w[0] for w in weights], pre + "attn.qkv.weight", torch.cat([w[1] for w in weights]))
    biases = [qkv.get((r, "bias")) for r in "qkv"]
    if any(b is not None for b in biases):
        put_qkv_bias(out, backbone, [b[0] for b in biases if b is not None], i,
                     *(b[1] if b is not None else None for b in biases))
    for kind in ("weight", "bias"):
        got = _take(parts, f"attention.o_proj.{kind}", f"attention.output.dense.{kind}")
        if got is not None:
            out.put(got[0], pre + f"attn.proj.{kind}", got[1])
        gate, up = _take(parts, f"mlp.gate_proj.{kind}"), _take(parts, f"mlp.up_proj.{kind}")
        down = _take(parts, f"mlp.down_proj.{kind}")
        if gate is not None and up is not None and not dinov3:  # DINOv2 SwiGLU -> timm packed fc1 = [gate; up]
            out.put([gate[0], up[0]], pre + f"mlp.fc1.{kind}", torch.cat([gate[1], up[1]]))
        elif gate is not None and up is not None:  # DINOv3 gated MLP -> timm SwiGLU
            out.put(gate[0], pre + f"mlp.fc1_g.{kind}", gate[1])
            out.put(up[0], pre + f"mlp.fc1_x.{kind}", up[1])
        elif up is not None:
            out.put(up[0], pre + f"mlp.fc1.{kind}", up[1])
        if down is not None:
            out.put(down[0], pre + f"mlp.fc2.{kind}", down[1])
        packed_in, packed_out = _take(parts, f"mlp.weights_in.{kind}"), _take(parts, f"mlp.weights_out.{kind}")
        if packed_in is not None:
            out.put(packed_in[0], pre + f"mlp.fc1.{kind}", packed_in[1])
        if packed_out is not None:
            out.put(packed_out[0], pre + f"mlp.fc2.{kind}", packed_out[1])
    for which in (1, 2):
        got = _take(parts, f"layer_scale{which}.lambda1")
        if got is not None:
            put_layer_scale(out, backbone, got[0], i, which, got[1])
    for rest, (raw, value) in parts.items():  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
        out.put(raw, pre + rest, value)


def _check_rope(config: dict, backbone: Backbone) -> str:
    from medfoundry.models.convert.dinov3_meta import check_rope_periods

    theta = float(config.get("rope_theta", 100.0))
    head_dim = backbone.embed_dim // backbone.vit.blocks[0].attn.num_heads
    periods = theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)
    return check_rope_periods(periods, backbone) + f" (rope_theta={theta})"
