"""HuggingFace folders (``save_pretrained`` of Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel) import."""

from __future__ import annotations

import pytest
import torch
from models_testutil import eva_backbone, hf_dinov2, hf_dinov3, hf_tokens, max_diff, vit_backbone

from medfoundry.models.pretrained import load_pretrained_backbone


@pytest.mark.parametrize("reg", [0, 4])
def test_models_hf_dinov2_folder(tmp_path, reg):
    ref = hf_dinov2(reg=reg, image_size=224, seed=3)
    ref.save_pretrained(tmp_path / "hf")
    backbone = vit_backbone(img_size=224, reg=reg)
    report = load_pretrained_backbone(backbone, tmp_path / "hf")
    assert report.format == "hf"
    x = torch.randn(2, 3, 224, 224)
    assert max_diff(backbone, hf_tokens(ref, x, reg), x) < 1e-4
    assert report.missing == [] and report.skipped == []


def test_models_hf_dinov3_folder(tmp_path):
    ref = hf_dinov3(reg=2, qkv_bias=True, seed=4)
    ref.save_pretrained(tmp_path / "hf3")
    backbone = eva_backbone(reg=2, qkv_bias=True)
    report = load_pretrained_backbone(backbone, tmp_path / "hf3", "hf")
    x = torch.randn(2, 3, 64, 64)
    assert max_diff(backbone, hf_tokens(ref, x, 2), x) < 1e-4
    assert any("rope_theta" in n for n in report.notes)


def test_models_hf_folder_at_other_size(tmp_path):
    """A 518 px HF checkpoint loads into a 224 px model (pos-embed grid resampled, class row kept)."""
    ref = hf_dinov2(reg=0)
    ref.save_pretrained(tmp_path / "hf")
    backbone = vit_backbone(img_size=224)
    report = load_pretrained_backbone(backbone, tmp_path / "hf", verbose=False)
    assert any("37x37 -> 16x16" in a for a in report.adapted)
