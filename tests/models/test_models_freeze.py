"""Layer freezing (patterns, first N blocks, all but last N), head-only warm-up and layer-wise lr decay groups."""

from __future__ import annotations

import pytest
import torch

from medfoundry.config import load_config
from medfoundry.config.schema import ModelConfig, OptimConfig
from medfoundry.methods.dino.method import DINOMethod
from medfoundry.models.freeze import (
    apply_freezing,
    block_index,
    freeze_all_but_last_blocks,
    freeze_first_blocks,
    freeze_patterns,
)
from medfoundry.models.lora import adapt_backbone
from medfoundry.models.registry import create_backbone
from medfoundry.train.optim import build_optimizer


def _bb(name: str = "vit_tiny_patch8_reg2"):
    return create_backbone(ModelConfig(name=name, img_size=64))


def _trainable(bb) -> set[str]:
    return {k for k, p in bb.named_parameters() if p.requires_grad}


def test_models_freeze_first_blocks_and_embeddings():
    bb = _bb()
    frozen = freeze_first_blocks(bb, 2)
    for name in frozen:
        idx = block_index(name)
        assert idx is None or idx < 2
    left = _trainable(bb)
    embeddings = {"vit.patch_embed.proj.weight", "vit.cls_token", "vit.reg_token", "vit.pos_embed", "mask_token"}
    assert embeddings.isdisjoint(left)
    assert all(block_index(k) in (2, 3) for k in left if block_index(k) is not None)
    assert "vit.norm.weight" in left and "vit.blocks.2.attn.qkv.weight" in left
    with pytest.raises(ValueError, match="has 4 blocks"):
        freeze_first_blocks(_bb(), 5)


def test_models_unfreeze_last_blocks():
    bb = _bb()
    freeze_all_but_last_blocks(bb, 1)
    left = _trainable(bb)
    assert left and all(k.startswith(("vit.blocks.3.", "vit.norm.")) for k in left)
    bb0 = _bb()
    freeze_all_but_last_blocks(bb0, 0)
    assert _trainable(bb0) == {"vit.norm.weight", "vit.norm.bias"}


def test_models_freeze_patterns():
    bb = _bb("vit_tiny_patch8_rope")
    frozen = freeze_patterns(bb, ["vit.patch_embed.*", "vit.blocks.0.*"])
    assert "vit.patch_embed.proj.weight" in frozen and "vit.blocks.0.gamma_1" in frozen
    assert "vit.blocks.1.gamma_1" in _trainable(bb)
    with pytest.raises(ValueError, match="matches no backbone parameter"):
        freeze_patterns(bb, ["vit.block.0.*"])  # typo must not silently train everything
    assert apply_freezing(_bb(), patterns=["*norm*"], embeddings=True)


def test_models_adapt_backbone_from_config(capsys):
    cfg = load_config(None, ["adapt.freeze_first_n_blocks=1", "adapt.freeze_patterns=[vit.blocks.3.mlp.*]"])
    bb = _bb()
    summary = adapt_backbone(bb, cfg.adapt)
    assert summary["trainable"] < summary["total"]
    assert "vit.blocks.3.mlp.fc1.weight" not in _trainable(bb) and "vit.blocks.3.attn.qkv.weight" in _trainable(bb)
    assert "frozen by freezing rules" in capsys.readouterr().out


def _method(*overrides: str) -> DINOMethod:
    cfg = load_config(None, ["model.name=vit_tiny_patch8", "model.img_size=64", "dino.head.out_dim=64",
                             "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", *overrides])
    return DINOMethod(cfg.model, cfg.dino, 10, cfg.adapt, cfg.optim.freeze_backbone_steps)


def test_models_head_only_warmup_then_unfreeze():
    """optim.freeze_backbone_steps=2: steps 0-1 update only the heads, step 2 moves the backbone too."""
    torch.manual_seed(0)
    method = _method("optim.freeze_backbone_steps=2")
    opt = build_optimizer(method, OptimConfig(lr=1e-2), method.student["backbone"].depth)
    batch = {"global_crops": torch.randn(2, 4, 3, 64, 64)}
    snapshots = []
    for step in range(3):
        snap = {k: v.clone() for k, v in method.student.state_dict().items()}
        out = method(batch, step)
        out["loss"].backward()
        method.before_optimizer_step(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(step)
        snapshots.append((snap, {k: v.clone() for k, v in method.student.state_dict().items()}))
    for step, (pre, post) in enumerate(snapshots):
        backbone_moved = any(not torch.equal(pre[k], post[k]) for k in pre if k.startswith("backbone."))
        head_moved = any(not torch.equal(pre[k], post[k]) for k in pre if k.startswith("dino_head.mlp"))
        assert head_moved
        assert backbone_moved == (step >= 2), step


def test_models_layer_decay_groups_for_dino_names():
    method = _method("adapt.lora_rank=2")
    opt = build_optimizer(method, OptimConfig(layer_decay=0.5), method.student["backbone"].depth)
    scale = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    assert scale["student.backbone.vit.blocks.3.attn.qkv.lora_A.default.weight"] == 0.5
    assert scale["student.backbone.vit.blocks.0.mlp.fc1.lora_B.default.weight"] == 0.5**4
    assert scale["student.dino_head.mlp.0.weight"] == 1.0
    method = _method()
    opt = build_optimizer(method, OptimConfig(layer_decay=0.5), 4)
    scale = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    assert scale["student.backbone.vit.patch_embed.proj.weight"] == 0.5**5
    assert scale["student.backbone.vit.norm.weight"] == 1.0
