"""Schedules are pure functions of the step; optimizer groups follow the no-decay and layer-decay rules."""

from __future__ import annotations

import copy

import pytest
import torch

from medfoundry.config import ModelConfig, OptimConfig
from medfoundry.models import create_backbone
from medfoundry.schedules import cosine, linear_warmup_constant
from medfoundry.train.optim import apply_schedules, build_optimizer, layer_id, param_groups


def test_cosine_with_warmup_endpoints() -> None:
    assert cosine(0, 100, 1.0, 0.1, warmup_steps=10) == 0.0
    assert cosine(5, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.5)
    assert cosine(10, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(1.0)
    assert cosine(99, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert cosine(500, 100, 1.0, 0.1) == pytest.approx(0.1)
    mid = cosine(55, 106, 1.0, 0.0, warmup_steps=5)  # cosine spans steps 5..105
    assert mid == pytest.approx(0.5, abs=1e-6)


def test_teacher_temperature_warmup() -> None:
    assert linear_warmup_constant(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup_constant(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup_constant(50, 10, 0.04, 0.07) == 0.07
    assert linear_warmup_constant(3, 0, 0.04, 0.07) == 0.07


def test_no_weight_decay_on_biases_norms_and_tokens() -> None:
    model = torch.nn.ModuleDict({"backbone": create_backbone(ModelConfig(name="vit_tiny_patch8", img_size=32))})
    groups = param_groups(model, OptimConfig())
    no_decay = {n for g in groups if g["wd_scale"] == 0 for n in g["names"]}
    decay = {n for g in groups if g["wd_scale"] == 1 for n in g["names"]}
    assert "backbone.vit.cls_token" in no_decay and "backbone.mask_token" in no_decay
    assert "backbone.vit.blocks.0.norm1.weight" in no_decay and "backbone.vit.blocks.0.attn.qkv.bias" in no_decay
    assert "backbone.vit.blocks.0.attn.qkv.weight" in decay


def test_layer_decay_scales_by_depth() -> None:
    model = torch.nn.ModuleDict({"backbone": create_backbone(ModelConfig(name="vit_tiny_patch8", img_size=32))})
    opt = build_optimizer(model, OptimConfig(layer_decay=0.5), depth=4)
    scales = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    assert scales["backbone.vit.blocks.3.attn.qkv.weight"] == pytest.approx(0.5)
    assert scales["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.5**4)
    assert scales["backbone.vit.patch_embed.proj.weight"] == pytest.approx(0.5**5)
    assert layer_id("backbone.vit.norm.weight", 4) == 5
    apply_schedules(opt, OptimConfig(lr=1.0, min_lr=1.0, layer_decay=0.5), step=0, total_steps=10)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lrs["backbone.vit.blocks.3.attn.qkv.weight"] == pytest.approx(0.5)


def test_everything_frozen_is_an_error() -> None:
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        build_optimizer(model, OptimConfig())


def test_patch_embed_lr_mult_composes_with_layer_decay() -> None:
    """DINOv2's ``patch_embed_lr_mult`` (0.2; dinov2/utils/param_groups.py): the patch embedding's lr multiplier is
    its layer-decay rate times the multiplier; position embedding, tokens and blocks keep theirs."""
    model = torch.nn.ModuleDict({"backbone": create_backbone(ModelConfig(name="vit_tiny_patch8", img_size=32)),
                                 "head": torch.nn.Linear(4, 4)})
    cfg = OptimConfig(lr=1.0, min_lr=1.0, layer_decay=0.5, patch_embed_lr_mult=0.2)
    opt = build_optimizer(model, cfg, depth=4)
    apply_schedules(opt, cfg, step=0, total_steps=10)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lrs["backbone.vit.patch_embed.proj.weight"] == pytest.approx(0.5**5 * 0.2)
    assert lrs["backbone.vit.patch_embed.proj.bias"] == pytest.approx(0.5**5 * 0.2)
    assert lrs["backbone.vit.pos_embed"] == pytest.approx(0.5**5)
    assert lrs["backbone.vit.cls_token"] == pytest.approx(0.5**5)
    assert lrs["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.5**4)
    assert lrs["head.weight"] == pytest.approx(1.0)
    plain = build_optimizer(model, OptimConfig(patch_embed_lr_mult=0.2))  # without layer decay: the multiplier alone
    scales = {n: g["lr_scale"] for g in plain.param_groups for n in g["names"]}
    assert scales["backbone.vit.patch_embed.proj.weight"] == pytest.approx(0.2)
    assert {s for n, s in scales.items() if "patch_embed" not in n} == {1.0}


def test_patch_embed_lr_mult_in_a_dino_run_config() -> None:
    """Set from the config, it reaches the student's patch embedding only (the teacher has no trainable params)."""
    from medfoundry.config import load_config
    from medfoundry.methods import get_method_entry
    from medfoundry.recipes import recipes_dir

    cfg = load_config(recipes_dir() / "tiny_dino_cpu.yaml", ["optim.patch_embed_lr_mult=0.2", "model.img_size=32",
                                                                "crops.global_size=32", "crops.local_size=16"])
    torch.manual_seed(0)
    method = get_method_entry("dino").build(cfg)
    scales = {n: g["lr_scale"] for g in param_groups(method, cfg.optim, 12) for n in g["names"]}
    embed = {n: s for n, s in scales.items() if ".patch_embed." in n}
    assert set(embed) == {"student.backbone.vit.patch_embed.proj.weight", "student.backbone.vit.patch_embed.proj.bias"}
    assert list(embed.values()) == [pytest.approx(0.2)] * 2
    assert {s for n, s in scales.items() if n not in embed} == {1.0}


def test_patch_embed_lr_mult_must_not_be_negative() -> None:
    from medfoundry.config import load_config
    from medfoundry.config.loader import ConfigError

    with pytest.raises(ConfigError, match=r"'optim.patch_embed_lr_mult' = -0.2 must be >= 0"):
        load_config(None, ["optim.patch_embed_lr_mult=-0.2"])

def test_adamw_is_fused_on_cpu_and_matches_foreach() -> None:
    """On CPU the default AdamW is torch's fused kernel; fed the same gradients over scheduled steps (warm-up, weight
    decay, layer decay, a no-decay group) it moves the parameters as the ``foreach`` AdamW does, to float rounding."""
    torch.manual_seed(0)
    base = torch.nn.ModuleDict({"backbone": create_backbone(ModelConfig(name="vit_tiny_patch8", img_size=32)),
                                "head": torch.nn.Linear(64, 16)})
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.04, weight_decay_end=0.4, layer_decay=0.7,
                      warmup_steps=1)
    models = {kind: copy.deepcopy(base) for kind in ("fused", "foreach")}
    opts = {"fused": build_optimizer(models["fused"], cfg, depth=4),
            "foreach": build_optimizer(models["foreach"], cfg, depth=4, fused=False)}
    assert opts["fused"].defaults["fused"] and not opts["fused"].defaults["foreach"]
    assert opts["foreach"].defaults["foreach"] and not opts["foreach"].defaults["fused"]
    for step in range(5):
        grads = [torch.randn_like(p) for p in base.parameters()]
        for kind, model in models.items():
            apply_schedules(opts[kind], cfg, step, total_steps=5)
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opts[kind].step()
    for (name, start), p, q in zip(base.named_parameters(), models["fused"].parameters(),
                                   models["foreach"].parameters()):
        assert (p - start).abs().max() > 1e-3, name  # every parameter moved
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
    for p, q in zip(models["fused"].parameters(), models["foreach"].parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opts["fused"].state[p][key], opts["foreach"].state[q][key], rtol=1e-6, atol=1e-7)
