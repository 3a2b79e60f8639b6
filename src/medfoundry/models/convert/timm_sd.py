"""timm state dicts (``VisionTransformer`` / ``Eva`` ``state_dict()``, ``.pth`` or ``.safetensors``) -> backbone.

timm's own names are medfoundry's names below ``vit.``, so the mapping is the identity; what a
timm file may add is skipped with a reason: the classifier (``head.*``, ``head_drop``), a pooling
norm the backbone does not use (``fc_norm.*`` when it is an ``Identity``), and RoPE buffers (which
are recomputed). A timm hub folder (``config.json`` with ``architecture`` + ``model.safetensors``)
is read the same way. Position-embedding prefix rows are inferred from shapes by the loader.
"""

from __future__ import annotations

from torch import Tensor, nn

from medfoundry.models.backbone import Backbone
from medfoundry.models.convert import Converted, unwrap_state_dict


def convert(obj: dict, backbone: Backbone) -> Converted:
    """Map a timm state dict onto ``backbone`` (identity under ``vit.``; heads skipped)."""
    out = Converted(pos_prefix=None)
    sd, opened = unwrap_state_dict(obj)
    if opened:
        out.notes.append(f"weights taken from checkpoint entry {'/'.join(opened)}")
    fc_norm = getattr(backbone.vit, "fc_norm", None)
    for key, value in sd.items():
        if key.startswith(("head.", "head_drop.")):
            out.skip(key, "classifier head (medfoundry backbones have none)")
        elif key.startswith("fc_norm.") and (fc_norm is None or isinstance(fc_norm, nn.Identity)):
            out.skip(key, "pooling norm unused by class-token features")
        elif key.startswith("rope.") or key.endswith(".k_bias"):
            out.skip(key, "fixed buffer (recomputed by the model)")
        elif key == "mask_token":
            out.put(key, "mask_token", value.reshape(1, -1))
        else:
            out.put(key, f"vit.{key}", value)
    return out


def looks_like(sd: dict[str, Tensor]) -> bool:
    """timm keys: ``patch_embed.proj.weight`` and ``blocks.N`` at top level, no Meta mask/storage tokens."""
    return "patch_embed.proj.weight" in sd and any(k.startswith("blocks.") for k in sd)
