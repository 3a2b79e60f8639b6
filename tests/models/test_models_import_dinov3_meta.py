"""Meta DINOv3 ``.pth`` import into a RoPE (timm Eva) backbone, checked against transformers' DINOv3ViTModel.

The Meta layout (facebookresearch/dinov3 ``DinoVisionTransformer``) is written by hand from the
reference's weights: ``storage_tokens``, ``rope_embed.periods`` (Meta's formula), ``attn.qkv.bias``
with a noisy key third masked by ``attn.qkv.bias_mask`` (``LinearKMaskedBias``), ``ls1.gamma``.
"""

from __future__ import annotations

import pytest
import torch
from models_testutil import eva_backbone, hf_dinov3, hf_dinov3_to_meta, hf_tokens, max_diff, vit_backbone

from medfoundry.models.pretrained import PretrainedLoadError, load_pretrained_backbone


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_models_dinov3_meta_matches_reference(tmp_path, qkv_bias):
    ref = hf_dinov3(reg=2, qkv_bias=qkv_bias)
    path = tmp_path / "dinov3.pth"
    meta = hf_dinov3_to_meta(ref)
    torch.save(meta, path)
    backbone = eva_backbone(reg=2, qkv_bias=qkv_bias)
    for size in ((64, 64), (96, 80)):  # RoPE: any size works without resizing anything
        x = torch.randn(2, 3, *size)
        if size == (64, 64):
            assert max_diff(backbone, hf_tokens(ref, x, 2), x) > 0.1
            report = load_pretrained_backbone(backbone, path)
            assert report.format == "dinov3"
        assert max_diff(backbone, hf_tokens(ref, x, 2), x) < 1e-4
    skipped = dict(report.skipped)
    assert "match" in skipped["rope_embed.periods"]
    assert report.missing == []
    assert {s for s, _ in report.converted} | set(skipped) == set(meta)


def test_models_dinov3_meta_errors(tmp_path):
    ref = hf_dinov3(reg=2, qkv_bias=True)
    meta = hf_dinov3_to_meta(ref)
    torch.save(meta, tmp_path / "w.pth")
    with pytest.raises(PretrainedLoadError, match="non-zero query/value biases"):
        load_pretrained_backbone(eva_backbone(reg=2, qkv_bias=False), tmp_path / "w.pth", verbose=False)
    with pytest.raises(PretrainedLoadError, match="RoPE backbone"):
        load_pretrained_backbone(vit_backbone(img_size=64, patch=8, reg=2), tmp_path / "w.pth", "dinov3")
    meta["rope_embed.periods"] = meta["rope_embed.periods"] * 2
    torch.save(meta, tmp_path / "w2.pth")
    with pytest.raises(PretrainedLoadError, match="periods"):
        load_pretrained_backbone(eva_backbone(reg=2, qkv_bias=True), tmp_path / "w2.pth", verbose=False)
