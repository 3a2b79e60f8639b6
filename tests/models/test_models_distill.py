"""Knowledge distillation: the cosine loss, the method, and `medfoundry train recipes/distill_tiny_cpu.yaml`."""

from __future__ import annotations

import json

import pytest
import torch
from models_testutil import perturb

from medfoundry.config import load_config
from medfoundry.config.schema import ModelConfig
from medfoundry.losses.distill import CosineFeatureLoss, match_patch_grid
from medfoundry.models.pretrained import PretrainedLoadError
from medfoundry.models.registry import create_backbone
from medfoundry.recipes import resolve_recipe
from medfoundry_cli.cli import main


def test_models_cosine_feature_loss():
    loss = CosineFeatureLoss()
    t = torch.randn(4, 10, 8)
    assert loss(t.clone(), t) < 1e-6
    assert abs(float(loss(-t, t)) - 2.0) < 1e-5
    s = torch.randn(4, 10, 8, requires_grad=True)
    teacher = torch.randn(4, 10, 8, requires_grad=True)
    loss(s, teacher).backward()
    assert s.grad is not None and teacher.grad is None
    patches = torch.randn(2, 16, 8)
    assert match_patch_grid(patches, (4, 4), (4, 4)) is patches
    assert match_patch_grid(patches, (4, 4), (2, 2)).shape == (2, 4, 8)


def _teacher_file(tmp_path):
    teacher = perturb(create_backbone(ModelConfig(name="vit_tiny_patch8_reg2", img_size=64)))
    torch.save(teacher.vit.state_dict(), tmp_path / "teacher_timm.pth")
    return tmp_path / "teacher_timm.pth"


def _distill_method(cfg):
    """The method from the sections its pipeline hands over."""
    from medfoundry.methods.distill.method import DistillMethod

    return DistillMethod(cfg.model, cfg.distill, cfg.dino, cfg.adapt, cfg.optim.freeze_backbone_steps,
                         cfg.crops.global_size)


def test_models_distill_feature_matching_without_head(tmp_path):
    """A headless (e.g. released) teacher: dino_weight > 0 fails clearly; cosine-only distillation trains."""
    path = _teacher_file(tmp_path)
    base = ["method=distill", "model.name=vit_tiny_patch8", "model.img_size=64", "crops.global_size=64",
            "distill.teacher_name=vit_tiny_patch8_reg2", f"distill.teacher_checkpoint={path}"]
    with pytest.raises(PretrainedLoadError, match="dino_weight=0"):
        _distill_method(load_config(None, base))
    method = _distill_method(load_config(None, [*base, "distill.dino_weight=0"]))
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert "cls_proj" in method.student and "dino_head" not in method.student
    batch = {"global_crops": torch.randn(2, 3, 3, 64, 64)}
    out = method(batch, 0)
    out["loss"].backward()
    assert set(out) >= {"loss", "cls_cosine_loss", "patch_cosine_loss"}
    assert method.teacher["backbone"].vit.cls_token.grad is None
    assert method.student["backbone"].vit.cls_token.grad is not None
    assert method.eval_backbone() is method.student["backbone"]


def test_models_distill_tiny_cpu_recipe_student_loss_falls(tmp_path):
    """`medfoundry train recipes/tiny_dino_cpu.yaml` (short) makes the teacher, then the distill recipe runs."""
    from medfoundry.data.bundled import export_pydicom_samples

    images = tmp_path / "images"
    export_pydicom_samples(images, max_side=128)
    common = [f"data.root={images}", "train.progress=false", "train.tensorboard=false"]
    teacher_run = tmp_path / "teacher"
    assert main(["train", str(resolve_recipe("tiny_dino_cpu")), f"output_dir={teacher_run}", "train.steps=3",
                 *common]) == 0
    run = tmp_path / "distill"
    assert main(["train", str(resolve_recipe("distill_tiny_cpu")), f"output_dir={run}",
                 f"distill.teacher_checkpoint={teacher_run}", *common]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 40
    for key in ("loss", "dino_loss", "patch_cosine_loss"):
        first = sum(r[key] for r in rows[:5]) / 5
        last = sum(r[key] for r in rows[-5:]) / 5
        print(f"{key}: first 5 steps {first:.3f} -> last 5 steps {last:.3f}")
        assert last < first, key
    loads = json.loads((run / "pretrained_load.json").read_text())
    assert loads[0]["format"] == "medfoundry" and loads[0]["missing"] == []
    # the distilled student is what the run exports
    assert main(["export", str(run), "--to", "safetensors", "--out", str(tmp_path / "student")]) == 0
    info = json.loads((tmp_path / "student" / "medfoundry_backbone.json").read_text())
    assert info["name"] == "vit_tiny_patch8" and info["in_chans"] == 1
