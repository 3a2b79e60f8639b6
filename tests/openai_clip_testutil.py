"""A randomly filled checkpoint in OpenAI CLIP's key layout (text + tiny visual), built with open_clip's own modules."""

from __future__ import annotations

import torch


def random_openai_state_dict(width: int = 64, layers: int = 2, embed: int = 32, seed: int = 0) -> dict:
    """A randomly filled OpenAI-layout CLIP state dict (text + a tiny ViT visual part), fp16-representable."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(embed, CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32, head_width=64),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=width // 64, layers=layers),
                 quick_gelu=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            base = 1.0 if (k.endswith(".weight") and ("ln_" in k or "ln_final" in k)) else 0.0
            v = base + torch.randn(v.shape, generator=g) * (0.1 if base else 0.05)
            v = v.half().float()  # OpenAI weights are partly fp16; keep both loaders exact
        sd[k] = v
    return sd
