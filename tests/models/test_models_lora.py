"""LoRA through peft: only adapters train (count printed and checked), merged == unmerged, DINO teacher/EMA line up."""

from __future__ import annotations

import pytest
import torch
from models_testutil import eva_backbone, perturb

from medfoundry.config import load_config
from medfoundry.config.schema import ModelConfig, OptimConfig
from medfoundry.methods.dino.method import DINOMethod
from medfoundry.models.lora import apply_lora, has_lora, lora_parameter_names, merge_lora, merged_copy
from medfoundry.models.registry import create_backbone
from medfoundry.train.optim import build_optimizer


def _expected_lora_params(depth: int, dim: int, rank: int, mlp: int) -> int:
    per_block = rank * ((dim + 3 * dim) + (dim + dim) + (dim + mlp) + (mlp + dim))  # qkv, proj, fc1, fc2
    return depth * per_block


def _randomise_adapters(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("name", ["vit_tiny_patch8", "vit_tiny_patch8_reg2", "vit_tiny_patch8_rope"])
def test_models_lora_only_adapters_train_and_merge_is_exact(name):
    backbone = create_backbone(ModelConfig(name=name, img_size=64)).eval()
    n = apply_lora(backbone, rank=4, alpha=8)
    assert n == _expected_lora_params(4, 64, 4, 256) == 16384
    trainable = [k for k, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in k for k in trainable)
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == n
    assert not any("patch_embed" in k for k in lora_parameter_names(backbone))  # conv 'proj' not targeted

    _randomise_adapters(backbone)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        unmerged = backbone.forward_features(x)
        merged = merged_copy(backbone).eval()
        assert has_lora(backbone) and not has_lora(merged)
        out = merged.forward_features(x)
    assert (out.patch - unmerged.patch).abs().max() < 1e-4 and (out.cls - unmerged.cls).abs().max() < 1e-4
    plain = create_backbone(ModelConfig(name=name, img_size=64))
    plain.load_state_dict(merged.state_dict(), strict=True)  # plain parameter names after merging
    merge_lora(backbone)
    assert not has_lora(backbone)


def test_models_lora_refuses_bypassed_qkv():
    with pytest.raises(ValueError, match="bypass|ignored"):
        apply_lora(eva_backbone(qkv_bias=True), rank=2)
    backbone = eva_backbone(qkv_bias=True)
    assert apply_lora(backbone, rank=2, targets=["proj", "fc1", "fc2"]) > 0


def test_models_lora_dino_method_trains_only_adapters(capsys):
    """In a LoRA dino run only adapters (and heads) train; the EMA teacher has the same structure; frozen
    base weights stay bit-identical in student and teacher; the LoRA count is printed."""
    cfg = load_config(None, ["model.name=vit_tiny_patch8", "model.img_size=64", "dino.head.out_dim=64",
                             "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "adapt.lora_rank=4",
                             "adapt.lora_alpha=8", "dino.teacher_momentum=0.5"])
    torch.manual_seed(0)
    method = DINOMethod(cfg.model, cfg.dino, 10, cfg.adapt)
    printed = capsys.readouterr().out
    assert "16,384 LoRA parameters" in printed and "trainable backbone parameters 16,384 of" in printed
    student, teacher = method.student["backbone"], method.teacher["backbone"]
    assert [k for k, _ in student.named_parameters()] == [k for k, _ in teacher.named_parameters()]
    trainable = [k for k, p in method.named_parameters() if p.requires_grad]
    backbone_trainable = [k for k in trainable if ".backbone." in k]
    assert backbone_trainable and all(".lora_" in k for k in backbone_trainable)
    assert sum(p.numel() for k, p in method.named_parameters() if p.requires_grad and ".backbone." in k) == 16384
    assert not any(k.startswith("teacher.") for k in trainable)

    before = {k: v.clone() for k, v in method.state_dict().items()}
    opt = build_optimizer(method, OptimConfig(lr=1e-2, weight_decay=0.0, weight_decay_end=0.0), student.depth)
    batch = {"global_crops": torch.randn(2, 4, 3, 64, 64), "local_crops": torch.randn(2, 4, 3, 32, 32)}
    for step in range(3):
        method.train()
        out = method(batch, step)
        out["loss"].backward()
        method.before_optimizer_step(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(step)
    after = method.state_dict()
    for key, value in after.items():
        if ".backbone." in key and ".lora_" not in key:
            assert torch.equal(value, before[key]), key  # frozen base weights untouched, student and teacher
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    for key in s_sd:
        if ".lora_" not in key:
            assert torch.equal(s_sd[key], t_sd[key]), key
    moved = [k for k in after if ".lora_B" in k and not torch.equal(after[k], before[k])]
    assert any(k.startswith("student.") for k in moved) and any(k.startswith("teacher.") for k in moved)


def test_models_lora_teacher_export_equals_unmerged(tmp_path):
    """The merged HF export of a LoRA backbone gives the unmerged (peft) model's output."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    from medfoundry.models.export import export_backbone

    backbone = perturb(create_backbone(ModelConfig(name="vit_tiny_patch8_reg2", img_size=64))).eval()
    apply_lora(backbone, rank=4, alpha=8)
    _randomise_adapters(backbone)
    export_backbone(backbone, "hf", tmp_path / "hf")
    assert has_lora(backbone)  # the export merged a copy
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = backbone.forward_features(x)
        hf = AutoModel.from_pretrained(tmp_path / "hf").eval()(pixel_values=x).last_hidden_state
    assert (hf[:, 0] - ref.cls).abs().max() < 1e-4
    assert (hf[:, 3:] - ref.patch).abs().max() < 1e-4
