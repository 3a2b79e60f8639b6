"""timm state dicts (``.pth`` and ``.safetensors``, with a classifier head) import."""

from __future__ import annotations

import pytest
import torch
from models_testutil import eva_backbone, perturb, vit_backbone
from safetensors.torch import save_file

from medfoundry.models.pretrained import load_pretrained_backbone


@pytest.mark.parametrize("kind", ["vit", "vit_reg", "eva"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_models_timm_state_dict(tmp_path, kind, suffix):
    if kind == "eva":
        ref = perturb(eva_backbone(reg=2, qkv_bias=True)).vit
        target = eva_backbone(reg=2, qkv_bias=True)
        x = torch.randn(2, 3, 64, 64)
    else:
        reg = 2 if kind == "vit_reg" else 0
        ref = perturb(vit_backbone(img_size=64, patch=8, reg=reg)).vit
        target = vit_backbone(img_size=64, patch=8, reg=reg)
        x = torch.randn(2, 3, 64, 64)
    sd = {k: v.clone().contiguous() for k, v in ref.state_dict().items()}
    sd["head.weight"] = torch.zeros(10, 64)  # a classifier, as in timm hub files
    sd["head.bias"] = torch.zeros(10)
    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    report = load_pretrained_backbone(target, path)
    assert report.format == "timm"
    assert sorted(k for k, _ in report.skipped) == ["head.bias", "head.weight"]
    assert report.missing == ["mask_token"]
    with torch.no_grad():
        expected = ref.eval().forward_features(x)
        out = target.forward_features(x)
    got = torch.cat([out.cls[:, None], out.reg, out.patch], dim=1)
    assert (got - expected).abs().max() < 1e-4

