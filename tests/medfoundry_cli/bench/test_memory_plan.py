"""The ViT-7B memory plan: its per-token formulas against tensors saved for the backward, and the plan's numbers.

The block and head formulas are checked by counting the bytes autograd saves (``saved_tensors_hooks``,
each storage once, parameters excluded) on narrow models of the same architecture under bf16 autocast on
the CPU. CUDA autocast runs ``layer_norm`` in fp32; that policy is reproduced by a norm that casts its
input to fp32 (what autocast does for an fp32-listed op), so both variants of the formula are tested.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from medfoundry.config.schema import HeadConfig
from medfoundry.models.backbone import Backbone
from medfoundry.models.heads import DINOHead
from medfoundry_cli.bench.memory_plan import (
    H100_80GB_BYTES,
    HeadShape,
    activation_bytes_per_image,
    block_saved_bytes_per_token,
    head_mlp_saved_bytes,
    inputs_from_config,
    per_step_bytes,
    plan,
)

ROOT = Path(__file__).resolve().parents[3]


def saved_bytes(fn, module: nn.Module) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs under bf16 autocast (no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        fn()
    return sum(seen.values())


class Fp32LayerNorm(nn.Module):
    """CUDA autocast's treatment of ``layer_norm``: inputs cast to fp32, an fp32 output."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.ln = ln

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln = self.ln
        return nn.functional.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)


def narrow_7b(depth: int, dim: int, heads: int, norm_fp32: bool) -> Backbone:
    """timm's ViT-7B/16 architecture at a small width, in bf16 as FSDP2 gathers it for compute."""
    import timm

    vit = timm.create_model("vit_7b_patch16_dinov3", pretrained=False, num_classes=0, global_pool="token",
                            dynamic_img_size=True, img_size=64, embed_dim=dim, depth=depth, num_heads=heads)
    if norm_fp32:
        for blk in vit.blocks:
            blk.norm1, blk.norm2 = Fp32LayerNorm(blk.norm1), Fp32LayerNorm(blk.norm2)
    return Backbone(vit, name="narrow_7b").to(torch.bfloat16).train()


def per_token_per_block(dim: int, heads: int, norm_fp32: bool, checkpointing: bool) -> float:
    """Saved bytes per token and block: differences over depth (1 vs 3) and batch (2 vs 4) cancel the rest."""
    torch.manual_seed(0)
    side = 64
    tokens = (side // 16) ** 2 + 5
    got = {}
    for depth in (1, 3):
        model = narrow_7b(depth, dim, heads, norm_fp32)
        model.set_grad_checkpointing(checkpointing)
        for batch in (2, 4):
            x = torch.randn(batch, 3, side, side, dtype=torch.bfloat16)
            got[depth, batch] = saved_bytes(lambda m=model, x=x: m.forward_features(x), model)
    return (got[3, 4] - got[1, 4] - got[3, 2] + got[1, 2]) / (2 * 2 * tokens)


@pytest.mark.parametrize("norm_fp32", [True, False], ids=["cuda-autocast-norms", "bf16-norms"])
@pytest.mark.parametrize("dim,heads", [(256, 2), (384, 3)])
def test_block_formula_is_what_autograd_saves(norm_fp32: bool, dim: int, heads: int) -> None:
    hidden = narrow_7b(1, dim, heads, False).vit.blocks[0].mlp.fc1_g.out_features
    assert per_token_per_block(dim, heads, norm_fp32, checkpointing=False) == pytest.approx(
        block_saved_bytes_per_token(dim, hidden, heads, norm_fp32=norm_fp32), rel=1e-9)
    # with activation checkpointing a block keeps only its bf16 input
    assert per_token_per_block(dim, heads, norm_fp32, checkpointing=True) == pytest.approx(2 * dim, rel=1e-9)


def test_head_formula_is_what_autograd_saves() -> None:
    cfg = HeadConfig(out_dim=1024, hidden_dim=128, bottleneck_dim=32, nlayers=3)
    head = DINOHead(64, cfg).to(torch.bfloat16)  # bf16 parameters, as FSDP2 gathers them
    got = {}
    for n in (4, 8):
        x = torch.randn(n, 64, dtype=torch.bfloat16, requires_grad=True)
        got[n] = saved_bytes(lambda x=x: head(x), head)
    shape = HeadShape(cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.nlayers)
    per_token = (got[8] - got[4]) / 4
    assert per_token == head_mlp_saved_bytes(64, shape)
    # the intercept: the weight-normalised prototype weight, recomputed every step
    assert got[4] - 4 * per_token == 2 * cfg.out_dim * cfg.bottleneck_dim + 4 * cfg.out_dim


@pytest.fixture(scope="module")
def vit7b():
    return inputs_from_config()


def test_plan_counts_come_from_the_meta_model(vit7b) -> None:
    assert abs(vit7b.backbone_params - 6_716e6) <= 0.01 * 6_716e6  # Meta's README: ViT-7B/16 6,716M
    heads = vit7b.student_params - vit7b.backbone_params
    assert heads > 0
    assert vit7b.dim == 4096 and vit7b.depth == 40 and vit7b.mlp_hidden == 8192 and vit7b.num_heads == 32
    assert vit7b.teacher_params == vit7b.student_params and vit7b.root_params == 2 * heads
    assert vit7b.student_tokens == 2 * (16 * 16 + 5) + 8 * (7 * 7 + 5)


def test_plan_numbers_are_sane(vit7b) -> None:
    p8, p16 = plan(vit7b, n_gpus=8), plan(vit7b, n_gpus=16)
    assert p8.state["student weights"] == 4 * vit7b.student_params / 8
    assert p8.state["teacher EMA weights"] == 4 * vit7b.teacher_params / 8
    assert p8.state["AdamW exp_avg + exp_avg_sq"] == 8 * vit7b.student_trainable / 8
    assert p16.state["gradients"] == pytest.approx(p8.state["gradients"] / 2)
    assert plan(vit7b, n_gpus=8, master_bytes=2).state["student weights"] == p8.state["student weights"] / 2
    rows = {r.mode.name: r for r in p8.modes}
    bf16, ac = rows["bf16"], rows["bf16 + AC"]
    assert ac.per_image_total < bf16.per_image_total / 5  # checkpointing keeps 2D (8 KB) of ~197 KB per token and block
    assert rows["fp8 (torchao)"].per_image_total == bf16.per_image_total  # torchao saves bf16 inputs
    assert rows["fp8-saved, hypothetical"].per_image_total < bf16.per_image_total
    for row in p8.modes:
        fits = row.fixed + row.largest_batch * row.per_image_total
        assert fits <= p8.budget < fits + row.per_image_total
    assert ac.largest_batch > bf16.largest_batch >= 1
    assert p8.budget < H100_80GB_BYTES
    assert p8.checkpoint["periodic .dcp: extra GPU bytes"] == 0
    assert per_step_bytes(vit7b)["weight-norm prototype weights"] > 0
    blocks = activation_bytes_per_image(vit7b, ac.mode)["blocks"]
    assert blocks == 40 * 954 * 2 * 4096 + 954 * block_saved_bytes_per_token(4096, 8192, 32)


def test_script_prints_the_8xh100_plan(capsys) -> None:
    spec = importlib.util.spec_from_file_location("memory_plan_vit7b", ROOT / "benchmarks" / "memory_plan_vit7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    out = capsys.readouterr().out
    assert "vit_7b_patch16_dinov3 DINO + iBOT on 8×H100 80 GB" in out
    for needle in ("sharded state: student weights", "bf16 + AC", "fp8 (torchao) + AC", "max batch/GPU",
                   "checkpoint periodic .dcp: extra GPU bytes"):
        assert needle in out
