"""medfoundry training checkpoints (teacher or student tower, heads skipped, LoRA merged) and exports import."""

from __future__ import annotations

import json

import pytest
import torch
from models_testutil import perturb

from medfoundry.checkpoints.format import capture_rng, save_checkpoint
from medfoundry.config import load_config
from medfoundry.config.loader import to_dict
from medfoundry.config.schema import ModelConfig
from medfoundry.methods.dino.method import DINOMethod
from medfoundry.models.lora import has_lora
from medfoundry.models.pretrained import (
    LoadReport,
    backbone_from_weights,
    load_pretrained_backbone,
    record_load_reports,
)
from medfoundry.models.registry import create_backbone


def _tiny_cfg(name: str = "vit_tiny_patch8_reg2", *overrides: str):
    return load_config(None, [f"model.name={name}", "model.img_size=64", "dino.head.out_dim=64",
                              "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", *overrides])


def _save_run(tmp_path, cfg, method, step: int = 7):
    state = {"step": step, "method": method.state_dict(), "optimizer": {}, "rng": capture_rng(),
             "config": to_dict(cfg), "format": "medfoundry-train-v1"}
    return save_checkpoint(tmp_path / "run", step, state, keep_last=2)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_models_medfoundry_checkpoint_towers(tmp_path, which):
    cfg = _tiny_cfg()
    method = DINOMethod(cfg.model, cfg.dino, 10, cfg.adapt)
    perturb(method.student)  # student and teacher now differ
    ckpt = _save_run(tmp_path, cfg, method)
    tower = method.student if which == "student" else method.teacher
    backbone = create_backbone(cfg.model).eval()
    fmt = f"medfoundry:{which}" if which == "student" else "auto"  # auto = the evaluated (teacher) tower
    report = load_pretrained_backbone(backbone, tmp_path / "run" if which == "teacher" else ckpt, fmt)
    assert report.format.startswith("medfoundry")
    assert report.missing == []
    assert any(k.startswith("student.dino_head") for k, _ in report.skipped)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tower["backbone"].eval().forward_features(x)
        out = backbone.forward_features(x)
    assert (out.cls - ref.cls).abs().max() < 1e-4 and (out.patch - ref.patch).abs().max() < 1e-4
    assert torch.equal(backbone.mask_token, tower["backbone"].mask_token)


def test_models_medfoundry_lora_checkpoint_merged(tmp_path):
    """A LoRA run's checkpoint loads into a plain backbone with the adapters merged: same features."""
    cfg = _tiny_cfg("vit_tiny_patch8", "adapt.lora_rank=4", "adapt.lora_alpha=8")
    method = DINOMethod(cfg.model, cfg.dino, 10, cfg.adapt)
    with torch.no_grad():  # non-zero adapters (B starts at 0)
        for name, p in method.teacher.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ckpt = _save_run(tmp_path, cfg, method)
    backbone, report = backbone_from_weights(ckpt)
    assert not has_lora(backbone)
    assert any("LoRA merged into 16 weights" in n for n in report.notes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = method.teacher["backbone"].eval()(x)
        assert (backbone.eval()(x) - ref).abs().max() < 1e-4


def test_models_medfoundry_report_json(tmp_path):
    cfg = _tiny_cfg()
    method = DINOMethod(cfg.model, cfg.dino, 10)
    _save_run(tmp_path, cfg, method)
    backbone = create_backbone(ModelConfig(name="vit_tiny_patch8_reg2", img_size=32))
    report = load_pretrained_backbone(backbone, tmp_path / "run", record_to=tmp_path / "load.json", verbose=False)
    assert any("8x8 -> 4x4" in a for a in report.adapted)
    saved = json.loads((tmp_path / "load.json").read_text())
    assert saved["format"] == "medfoundry" and len(saved["converted"]) == len(report.converted)
    assert record_load_reports([report], tmp_path / "runx").name == "pretrained_load.json"
    assert isinstance(report, LoadReport) and "keys converted" in report.summary()


def test_models_dino_run_records_pretrained_load(tmp_path):
    """model.pretrained in a dino run: the load is reported and recorded in RUN/pretrained_load.json."""
    from medfoundry.methods import get_method_entry

    cfg = _tiny_cfg()
    method = DINOMethod(cfg.model, cfg.dino, 10)
    _save_run(tmp_path, cfg, method)
    run2 = _tiny_cfg("vit_tiny_patch8_reg2", f"model.pretrained={tmp_path / 'run'}", f"output_dir={tmp_path / 'r2'}")
    built = get_method_entry("dino").build(run2)
    assert torch.equal(built.student["backbone"].vit.cls_token, method.teacher["backbone"].vit.cls_token)
    recorded = json.loads((tmp_path / "r2" / "pretrained_load.json").read_text())
    assert recorded[0]["format"] == "medfoundry"
