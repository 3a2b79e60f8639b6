"""Checkpoint converters: one module per source format, each mapping keys to medfoundry's ``Backbone``.

Every converter takes the source state dict and the target :class:`~medfoundry.models.backbone.Backbone`
and returns a :class:`Converted`: tensors keyed by the backbone's own ``state_dict`` names
(``vit.*`` and ``mask_token``), the (source, target) pairs it converted and the source keys it
skipped with a reason. Resizing, channel adaptation, shape checks and the missing-key report are
done once, in :mod:`medfoundry.models.pretrained`.

Target layouts: DINOv2-style backbones are timm ``VisionTransformer`` (``blocks.i.ls1.gamma``,
``attn.qkv.bias``), DINOv3-style ones timm ``Eva`` (``blocks.i.gamma_1``, ``attn.q_bias`` /
``attn.v_bias``, no stored key bias).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from medfoundry.errors import UserError
from medfoundry.models.backbone import Backbone


class PretrainedLoadError(UserError, RuntimeError):
    """A checkpoint cannot be loaded into the backbone; the message says which key and why."""


@dataclass
class Converted:
    """The result of one converter, before resizing and loading."""

    tensors: dict[str, Tensor] = field(default_factory=dict)  # backbone state_dict key -> tensor
    converted: list[tuple[str, str]] = field(default_factory=list)  # (source key, target key)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source key, reason)
    pos_prefix: int | None = None  # prefix rows of the source pos_embed (None: infer from shapes)
    notes: list[str] = field(default_factory=list)  # format-specific remarks for the report

    def put(self, src: str | list[str], dst: str, value: Tensor) -> None:
        """Record ``value`` for target key ``dst``, converted from ``src`` (one key or several fused)."""
        self.tensors[dst] = value
        for s in [src] if isinstance(src, str) else src:
            self.converted.append((s, dst))

    def skip(self, src: str, reason: str) -> None:
        """Record a source key that is deliberately not loaded."""
        self.skipped.append((src, reason))


def is_eva(backbone: Backbone) -> bool:
    """Whether the backbone wraps timm's ``Eva`` (DINOv3-style RoPE layout)."""
    from timm.models.eva import Eva

    return isinstance(backbone.vit, Eva)


def require_layout(backbone: Backbone, eva: bool, fmt: str) -> None:
    """Fail clearly when weights of one family are loaded into the other."""
    if is_eva(backbone) != eva:
        want = "a RoPE backbone (family dinov3, timm Eva)" if eva else "an absolute-pos-embed ViT (dinov2/vit family)"
        raise PretrainedLoadError(
            f"{fmt} weights need {want}; backbone '{backbone.name}' is a {type(backbone.vit).__name__}. "
            "Pick a matching model.name (see `medfoundry models`)."
        )


def unwrap_state_dict(obj: dict) -> tuple[dict, list[str]]:
    """Find the weights inside common training-checkpoint wrappers.

    Handles ``{"model": ...}``, ``{"state_dict": ...}``, ``{"module": ...}``, ``{"model_ema": ...}``
    and Meta's DINO training checkpoints ``{"teacher": {"backbone.*", "dino_head.*"}}``. Returns the
    flat dict and the wrapper keys that were opened, outermost first.
    """
    opened: list[str] = []
    for _ in range(3):
        for key in ("teacher", "model", "state_dict", "module", "model_ema"):
            inner = obj.get(key) if isinstance(obj, dict) else None
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in list(inner.values())[:8]):
                obj = inner
                opened.append(key)
                break
        else:
            break
    return obj, opened


def prepare_meta_state_dict(obj: dict, out: Converted) -> dict[str, Tensor]:
    """Open wrappers and strip the ``backbone.`` prefix of Meta training checkpoints (heads are skipped)."""
    sd, opened = unwrap_state_dict(obj)
    if opened:
        out.notes.append(f"weights taken from checkpoint entry {'/'.join(opened)}")
    if any(k.startswith("backbone.") for k in sd):
        sd = strip_prefix(sd, "backbone.", out)
    return sd


def strip_prefix(sd: dict[str, Tensor], prefix: str, out: Converted) -> dict[str, Tensor]:
    """Keep the keys under ``prefix`` (prefix removed); the others are recorded as skipped."""
    if not prefix:
        return dict(sd)
    kept = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            kept[k[len(prefix):]] = v
        else:
            out.skip(k, f"outside '{prefix}' (training head or other module)")
    return kept


def layer_scale_key(backbone: Backbone, block: int, which: int) -> str | None:
    """Backbone key of the layer-scale gain ``which`` (1 = attention, 2 = MLP) of ``block``, or None."""
    blk = backbone.vit.blocks[block]
    if is_eva(backbone):
        return f"vit.blocks.{block}.gamma_{which}" if getattr(blk, f"gamma_{which}", None) is not None else None
    ls = getattr(blk, f"ls{which}", None)
    return f"vit.blocks.{block}.ls{which}.gamma" if ls is not None and hasattr(ls, "gamma") else None


def put_layer_scale(out: Converted, backbone: Backbone, src: str, block: int, which: int, gamma: Tensor) -> None:
    """Store a layer-scale gain, or skip it when the target has none and the gain is exactly 1."""
    if block >= len(backbone.vit.blocks):  # the loader reports it as a key the target does not have
        out.put(src, f"vit.blocks.{block}.ls{which}.gamma", gamma)
        return
    key = layer_scale_key(backbone, block, which)
    if key is not None:
        out.put(src, key, gamma)
    elif torch.allclose(gamma.float(), torch.ones_like(gamma, dtype=torch.float32)):
        out.skip(src, "layer scale of 1 (identity); the target has no layer scale")
    else:
        raise PretrainedLoadError(
            f"'{src}' is a layer-scale gain but backbone '{backbone.name}' has no layer scale; "
            "use a backbone with layer scale (e.g. a *_dinov2 or *_reg* model)"
        )


def put_qkv_bias(out: Converted, backbone: Backbone, srcs: list[str], block: int, q: Tensor | None,
                 k: Tensor | None, v: Tensor | None) -> None:
    """Store q/k/v biases in the target layout (fused ``qkv.bias`` or Eva's ``q_bias``/``v_bias``).

    Absent biases count as zero. A non-zero bias the target cannot hold is an error (it would
    change the features silently); an all-zero one is skipped with a note.
    """
    if block >= len(backbone.vit.blocks):  # the loader reports it as a key the target does not have
        out.put(srcs, f"vit.blocks.{block}.attn.qkv.bias", torch.cat([t for t in (q, k, v) if t is not None]))
        return
    attn = backbone.vit.blocks[block].attn
    dim = backbone.embed_dim
    ref = next(t for t in (q, k, v) if t is not None) if any(t is not None for t in (q, k, v)) else None
    if ref is None:
        return
    zeros = torch.zeros(dim, dtype=ref.dtype)
    q, k, v = (t if t is not None else zeros for t in (q, k, v))
    if is_eva(backbone):
        if k.abs().max() > 0:
            raise PretrainedLoadError(f"block {block}: non-zero key bias in {srcs}; timm Eva fixes the key bias at 0")
        if getattr(attn, "q_bias", None) is not None:
            out.put(srcs, f"vit.blocks.{block}.attn.q_bias", q)
            out.tensors[f"vit.blocks.{block}.attn.v_bias"] = v
            return
        if q.abs().max() > 0 or v.abs().max() > 0:
            raise PretrainedLoadError(
                f"block {block}: the checkpoint has non-zero query/value biases ({srcs}) but backbone "
                f"'{backbone.name}' has none; use an architecture with qkv bias (timm *_qkvb)"
            )
        for s in srcs:
            out.skip(s, "all-zero qkv bias; the target has no qkv bias")
        return
    if attn.qkv.bias is not None:
        out.put(srcs, f"vit.blocks.{block}.attn.qkv.bias", torch.cat([q, k, v]))
    elif torch.cat([q, k, v]).abs().max() > 0:
        raise PretrainedLoadError(
            f"block {block}: the checkpoint has a non-zero qkv bias ({srcs}) but backbone '{backbone.name}' has none"
        )
    else:
        for s in srcs:
            out.skip(s, "all-zero qkv bias; the target has no qkv bias")


__all__ = [
    "Converted",
    "PretrainedLoadError",
    "is_eva",
    "prepare_meta_state_dict",
    "layer_scale_key",
    "put_layer_scale",
    "put_qkv_bias",
    "require_layout",
    "strip_prefix",
    "unwrap_state_dict",
]
