"""Meta DINOv2 ``.pth`` import: a random model in Meta's key layout gives the reference model's features.

The reference is transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (an independent
implementation of Meta's network) with perturbed random weights; its weights are rewritten in Meta's
``DinoVisionTransformer`` layout (``pos_embed`` for 518 px = 37x37 patches at /14, ``ls1.gamma``,
``register_tokens``, ``mask_token``, optionally ``block_chunks``) and saved as a ``.pth``.
"""

from __future__ import annotations

import pytest
import torch
from models_testutil import hf_dinov2, hf_dinov2_to_meta, hf_tokens, max_diff, vit_backbone

from medfoundry.models.pretrained import PretrainedLoadError, load_pretrained_backbone


@pytest.mark.parametrize("reg", [0, 4])
@pytest.mark.parametrize("chunks", [0, 2])
def test_models_dinov2_meta_matches_reference(tmp_path, reg, chunks):
    ref = hf_dinov2(reg=reg, seed=reg + chunks)
    path = tmp_path / "dinov2_meta.pth"
    torch.save(hf_dinov2_to_meta(ref, chunks=chunks), path)
    x = torch.randn(2, 3, 518, 518)
    expected = hf_tokens(ref, x, reg)

    backbone = vit_backbone(img_size=518, reg=reg)
    assert max_diff(backbone, expected, x) > 0.1  # random init is far away: the comparison has teeth
    report = load_pretrained_backbone(backbone, path, "auto")
    assert report.format == "dinov2"
    assert max_diff(backbone, expected, x) < 1e-4
    assert report.missing == []
    assert ("mask_token", "mask_token") in report.converted
    assert torch.equal(backbone.mask_token, ref.embeddings.mask_token.detach().reshape(1, -1))
    if reg:
        assert any("folded into cls_token" in a for a in report.adapted)
    converted_sources = {s for s, _ in report.converted}
    if chunks:
        assert "blocks.1.1.ls1.gamma" in converted_sources
    assert len(converted_sources) + len(report.skipped) == len(hf_dinov2_to_meta(ref, chunks=chunks))


def test_models_dinov2_meta_training_checkpoint_wrapper(tmp_path, capsys):
    """Meta's training checkpoints nest the backbone as {'teacher': {'backbone.*', 'dino_head.*'}}."""
    ref = hf_dinov2(reg=0)
    meta = {f"backbone.{k}": v for k, v in hf_dinov2_to_meta(ref).items()}
    meta["dino_head.mlp.0.weight"] = torch.zeros(8, 64)
    torch.save({"teacher": meta, "iteration": 5}, tmp_path / "teacher_checkpoint.pth")
    backbone = vit_backbone(img_size=518)
    report = load_pretrained_backbone(backbone, tmp_path / "teacher_checkpoint.pth")
    assert report.format == "dinov2"
    assert [k for k, _ in report.skipped] == ["dino_head.mlp.0.weight"]
    x = torch.randn(1, 3, 518, 518)
    assert max_diff(backbone, hf_tokens(ref, x, 0), x) < 1e-4
    printed = capsys.readouterr().out
    assert "35 keys converted, 1 skipped, 0 missing" in printed


def test_models_dinov2_meta_resized_grid_and_errors(tmp_path):
    ref = hf_dinov2(reg=0)
    torch.save(hf_dinov2_to_meta(ref), tmp_path / "w.pth")
    small = vit_backbone(img_size=224)
    report = load_pretrained_backbone(small, tmp_path / "w.pth", "dinov2", verbose=False)
    assert any("37x37 -> 16x16" in a for a in report.adapted)
    assert small.vit.pos_embed.shape == (1, 1 + 16 * 16, 64)
    # class position row is kept aside, not interpolated
    assert torch.equal(small.vit.pos_embed[:, 0], ref.embeddings.position_embeddings.detach()[:, 0])

    deeper = vit_backbone(img_size=518, depth=3)
    with pytest.raises(PretrainedLoadError, match="not in the checkpoint and would stay random"):
        load_pretrained_backbone(deeper, tmp_path / "w.pth", verbose=False)
    shallower = vit_backbone(img_size=518, depth=1)
    with pytest.raises(PretrainedLoadError, match="does not have"):
        load_pretrained_backbone(shallower, tmp_path / "w.pth", verbose=False)
    no_ls = vit_backbone(img_size=518, layer_scale=False)
    with pytest.raises(PretrainedLoadError, match="layer scale"):
        load_pretrained_backbone(no_ls, tmp_path / "w.pth", verbose=False)
    wrong_regs = vit_backbone(img_size=518, reg=4)
    with pytest.raises(PretrainedLoadError):
        load_pretrained_backbone(wrong_regs, tmp_path / "w.pth", verbose=False)
    with pytest.raises(PretrainedLoadError, match="not found"):
        load_pretrained_backbone(small, tmp_path / "nope.pth")
