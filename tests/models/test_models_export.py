"""Export round trips: HF ``AutoModel.from_pretrained``, timm ``create_model``, safetensors; the CLI command."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from models_testutil import eva_backbone, perturb

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModel  # noqa: E402

from medfoundry.config.schema import ModelConfig  # noqa: E402
from medfoundry.models.export import export_backbone  # noqa: E402
from medfoundry.models.pretrained import backbone_from_weights  # noqa: E402
from medfoundry.models.registry import create_backbone  # noqa: E402

NAMES = ["vit_tiny_patch8", "vit_tiny_patch8_reg2", "vit_tiny_patch8_rope"]


def _backbone(name: str, in_chans: int = 3):
    return perturb(create_backbone(ModelConfig(name=name, img_size=64, in_chans=in_chans)), seed=5).eval()


def _ours(backbone, x) -> torch.Tensor:
    with torch.no_grad():
        out = backbone.forward_features(x)
    return torch.cat([out.cls[:, None], out.reg, out.patch], dim=1)


@pytest.mark.parametrize("name", NAMES)
def test_models_export_hf_round_trip(tmp_path, name):
    backbone = _backbone(name, in_chans=1)
    result = export_backbone(backbone, "hf", tmp_path / "hf")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    model = AutoModel.from_pretrained(tmp_path / "hf").eval()
    expected_type = "dinov3_vit" if "rope" in name else ("dinov2_with_registers" if "reg" in name else "dinov2")
    assert model.config.model_type == expected_type
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        theirs = model(pixel_values=x).last_hidden_state
    assert (theirs - _ours(backbone, x)).abs().max() < 1e-4
    if "rope" in name:  # RoPE: any input size matches too
        x = torch.randn(1, 1, 96, 48)
        with torch.no_grad():
            assert (model(pixel_values=x).last_hidden_state - _ours(backbone, x)).abs().max() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_models_export_timm_round_trip(tmp_path, name):
    backbone = _backbone(name)
    export_backbone(backbone, "timm", tmp_path / "timm", mean=[0.5, 0.5, 0.5], std=[0.25] * 3)
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    weights = tmp_path / "timm" / "model.safetensors"
    model = timm.create_model(config["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=0),
                              **config["model_args"]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model.forward_features(x) - _ours(backbone, x)).abs().max() < 1e-4
    local = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        assert (local.forward_features(x) - _ours(backbone, x)).abs().max() < 1e-4
    assert local.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) or list(local.pretrained_cfg["mean"]) == [0.5] * 3


def test_models_export_eva_with_qkv_bias(tmp_path):
    backbone = perturb(eva_backbone(qkv_bias=True))
    for to in ("hf", "timm"):
        assert export_backbone(backbone, to, tmp_path / to).max_abs_diff < 1e-4


def test_models_export_safetensors_round_trip(tmp_path):
    backbone = _backbone("vit_tiny_patch8_reg2")
    export_backbone(backbone, "safetensors", tmp_path / "st")
    reloaded, report = backbone_from_weights(tmp_path / "st", verbose=False)
    assert report.format == "medfoundry" and report.missing == []
    x = torch.randn(2, 3, 64, 64)
    assert (_ours(reloaded, x) - _ours(backbone, x)).abs().max() == 0


def test_models_export_cli_from_run(tmp_path, capsys):
    """`medfoundry export RUN --to hf` on a LoRA dino run: the evaluated (teacher) backbone, merged."""
    from medfoundry.checkpoints.format import capture_rng, save_checkpoint
    from medfoundry.config import load_config
    from medfoundry.config.loader import to_dict
    from medfoundry.methods.dino.method import DINOMethod
    from medfoundry_cli.cli import main

    cfg = load_config(None, ["model.name=vit_tiny_patch8_rope", "model.img_size=64", "model.in_chans=1",
                             "dino.head.out_dim=32", "dino.head.hidden_dim=16", "dino.head.bottleneck_dim=8",
                             "adapt.lora_rank=2", "crops.mean=[0.4]", "crops.std=[0.2]"])
    method = DINOMethod(cfg.model, cfg.dino, 10, cfg.adapt)
    with torch.no_grad():
        for k, p in method.teacher.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.1)
    save_checkpoint(tmp_path / "run", 3, {"step": 3, "method": method.state_dict(), "rng": capture_rng(),
                                          "config": to_dict(cfg), "format": "medfoundry-train-v1"}, 1)
    for to in ("hf", "timm", "safetensors"):
        assert main(["export", str(tmp_path / "run"), "--to", to, "--out", str(tmp_path / to)]) == 0
    assert "max abs diff" in capsys.readouterr().out
    model = AutoModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        theirs = model(pixel_values=x).last_hidden_state
    assert (theirs - _ours(method.teacher["backbone"].eval(), x)).abs().max() < 1e-4
    timm_cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert timm_cfg["pretrained_cfg"]["mean"] == [0.4]
    assert main(["export", str(tmp_path / "missing"), "--to", "hf", "--out", str(tmp_path / "x")]) == 1
