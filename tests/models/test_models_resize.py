"""Resizing done right: pos-embed resampling keeps pretrained features (real images), patch size, channels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models_testutil import DIM, hf_dinov2, hf_dinov2_to_meta, perturb, vit_backbone

from medfoundry.models.pretrained import load_pretrained_backbone
from medfoundry.models.resize import (
    adapt_in_chans,
    reconcile_pos_prefix,
    resample_patch_embed,
    resample_pos_embed,
)


def _real_images(tmp_path, n: int = 8) -> list[torch.Tensor]:
    """Grey frames of real CT/MR/X-ray/US DICOMs bundled with pydicom-data, in [0, 1], (1, 1, H, W) each."""
    from PIL import Image

    from medfoundry.data.bundled import export_pydicom_samples

    paths = export_pydicom_samples(tmp_path / "png", max_side=256)
    step = max(1, len(paths) // n)
    out = []
    for p in paths[::step][:n]:
        a = np.asarray(Image.open(p)).astype(np.float32) / 65535.0
        out.append(torch.from_numpy(a)[None, None])
    return out


def _prep(images: list[torch.Tensor], size: int) -> torch.Tensor:
    x = torch.cat([F.interpolate(i, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                   for i in images])
    return ((x - 0.45) / 0.225).expand(-1, 3, -1, -1)


def _smooth_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """Low-frequency 2D sin-cos position codes, like the smooth embeddings of released DINOv2 weights."""
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    freqs = 4 * 2 * math.pi / grid / (100 ** (torch.arange(dim // 4) / (dim // 4)))
    y, x = y.flatten()[:, None] * freqs, x.flatten()[:, None] * freqs
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)[None]


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_models_resized_pos_embed_keeps_features_on_real_images(tmp_path):
    """A 518 px (37x37) checkpoint imported at 224 px (16x16): features of real images stay those of the original.

    The original runs at its native 518 px; the resized model at 224 px on the same images. Class
    tokens (centred over images) and patch tokens (original's 37x37 map average-pooled to 16x16)
    correlate > 0.95 / > 0.9, better than a model whose position embeddings were re-initialised
    (what a silent wrong resize gives; patch tokens, the position-sensitive ones, by > 0.1).
    """
    meta = hf_dinov2_to_meta(hf_dinov2(reg=0, seed=11))
    meta["pos_embed"] = torch.cat([meta["pos_embed"][:, :1], _smooth_pos_embed(37, DIM)], dim=1)
    torch.save(meta, tmp_path / "dinov2_518.pth")
    native = vit_backbone(img_size=518)
    resized = vit_backbone(img_size=224)
    load_pretrained_backbone(native, tmp_path / "dinov2_518.pth", verbose=False)
    report = load_pretrained_backbone(resized, tmp_path / "dinov2_518.pth", verbose=False)
    assert any("37x37 -> 16x16" in a for a in report.adapted)
    broken = vit_backbone(img_size=224)
    load_pretrained_backbone(broken, tmp_path / "dinov2_518.pth", verbose=False)
    with torch.no_grad():
        broken.vit.pos_embed[:, 1:].normal_(0, float(resized.vit.pos_embed[:, 1:].std()))

    images = _real_images(tmp_path)
    with torch.no_grad():
        ref = native.forward_features(_prep(images, 518))
        small = _prep(images, 224)
        out, bad = resized.forward_features(small), broken.forward_features(small)
    ref_patch = F.adaptive_avg_pool2d(ref.patch.transpose(1, 2).reshape(len(images), DIM, 37, 37), (16, 16))
    ref_patch = ref_patch.flatten(2).transpose(1, 2)
    cls_good = _corr(ref.cls - ref.cls.mean(0), out.cls - out.cls.mean(0))
    cls_bad = _corr(ref.cls - ref.cls.mean(0), bad.cls - bad.cls.mean(0))
    patch_good, patch_bad = _corr(ref_patch, out.patch), _corr(ref_patch, bad.patch)
    print(f"class-token corr {cls_good:.3f} (re-initialised pos-embed: {cls_bad:.3f}); "
          f"patch corr {patch_good:.3f} ({patch_bad:.3f})")
    assert cls_good > 0.95 and patch_good > 0.9
    assert cls_good > cls_bad and patch_good - patch_bad > 0.1


def test_models_resample_pos_embed_keeps_prefix_and_is_exact_at_same_size():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert resample_pos_embed(pos, (37, 37), 1) is pos
    out = resample_pos_embed(pos, (16, 16), 1)
    assert out.shape == (1, 1 + 256, 8) and torch.equal(out[:, 0], pos[:, 0])
    const = torch.ones(1, 37 * 37, 8) * 3.0  # a constant field stays constant
    assert torch.allclose(resample_pos_embed(const, (16, 16), 0), torch.full((1, 256, 8), 3.0), atol=1e-5)


def test_models_reconcile_prefix_is_function_preserving():
    """Folding Meta's class position into timm's cls_token gives the same class input token."""
    pos = torch.randn(1, 1 + 4, 8)
    cls = torch.randn(1, 1, 8)
    new_pos, new_cls, _, note = reconcile_pos_prefix(pos, 1, 0, cls, None)
    assert "folded" in note and torch.equal(new_pos, pos[:, 1:])
    assert torch.allclose(new_cls, cls + pos[:, :1])
    back, _, _, _ = reconcile_pos_prefix(new_pos, 0, 3, new_cls, torch.zeros(1, 2, 8))
    assert back.shape == (1, 3 + 4, 8) and torch.equal(back[:, :3], torch.zeros(1, 3, 8))


@pytest.mark.parametrize("mode", ["average", "repeat"])
@pytest.mark.parametrize("in_chans", [1, 6])
def test_models_channel_adaptation_keeps_activations(mode, in_chans):
    """On a grey image (all channels equal), adapted weights give the 3-channel model's activations."""
    weight = torch.randn(16, 3, 8, 8)
    adapted = adapt_in_chans(weight, in_chans, mode)
    assert adapted.shape == (16, in_chans, 8, 8)
    grey = torch.rand(2, 1, 32, 32)
    ref = F.conv2d(grey.expand(-1, 3, -1, -1), weight, stride=8)
    got = F.conv2d(grey.expand(-1, in_chans, -1, -1), adapted, stride=8)
    if mode == "average" or in_chans % 3 == 0:
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    else:  # repeat to 1 channel keeps the magnitude only approximately (R kernel x 3)
        assert got.std() / ref.std() > 0.3


def test_models_channel_adaptation_on_import(tmp_path):
    """A 3-channel checkpoint into a 1-channel backbone: grey input gives the RGB model's features."""
    ref = perturb(vit_backbone(img_size=64, patch=8))
    torch.save(ref.vit.state_dict(), tmp_path / "rgb.pth")
    grey_model = vit_backbone(img_size=64, patch=8, in_chans=1)
    report = load_pretrained_backbone(grey_model, tmp_path / "rgb.pth", channel_mode="average", verbose=False)
    assert any("3 -> 1 input channels" in a for a in report.adapted)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert (grey_model(x) - ref(x.expand(-1, 3, -1, -1))).abs().max() < 1e-4


def test_models_patch_embed_resize_on_import(tmp_path):
    """/16 weights into a /8 model and back: FlexiViT's pseudo-inverse resize keeps the patch tokens.

    Growing the kernel is exact (an 8x8 patch and its bicubic 16x16 upsampling give the same token);
    shrinking it is exact up to least squares for smooth patches.
    """
    w8 = torch.randn(8, 3, 8, 8)
    x8 = torch.rand(1, 3, 8, 8)
    x16 = F.interpolate(x8, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    w16 = resample_patch_embed(w8, (16, 16))
    assert torch.allclose((w8 * x8).sum((1, 2, 3)), (w16 * x16).sum((1, 2, 3)), rtol=1e-4, atol=1e-4)
    weight = torch.randn(8, 3, 16, 16)
    smooth = F.interpolate(torch.rand(1, 3, 4, 4), size=(16, 16), mode="bicubic", align_corners=False)
    shrunk = F.interpolate(smooth, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    a = (weight * smooth).sum((1, 2, 3))
    b = (resample_patch_embed(weight, (8, 8)) * shrunk).sum((1, 2, 3))
    assert F.cosine_similarity(a, b, dim=0) > 0.99
    src = perturb(vit_backbone(img_size=64, patch=16))
    torch.save(src.vit.state_dict(), tmp_path / "p16.pth")
    dst = vit_backbone(img_size=64, patch=8)
    report = load_pretrained_backbone(dst, tmp_path / "p16.pth", verbose=False)
    assert any("patch size (16, 16) -> (8, 8)" in a for a in report.adapted)
    assert any("4x4 -> 8x8" in a for a in report.adapted)
