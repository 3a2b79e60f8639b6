"""The dino method: active loss terms follow the config, the teacher is an EMA of the student."""

from __future__ import annotations

import pytest
import torch

from medfoundry.config import load_config
from medfoundry.methods.dino import DINOMethod

BASE = ["model.name=vit_tiny_patch8_rope", "model.img_size=32", "model.in_chans=1", "dino.head.out_dim=32",
        "dino.head.hidden_dim=16", "dino.head.bottleneck_dim=8"]


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 3, 16, generator=g) < 0.4
    return {"global_crops": torch.randn(2, 3, 1, 32, 32, generator=g),
            "local_crops": torch.randn(4, 3, 1, 16, 16, generator=g), "masks": masks}


@pytest.mark.parametrize(
    "extra,terms",
    [([], {"dino_loss"}),
     (["dino.ibot_weight=1", "dino.koleo_weight=0.1", "dino.kde_weight=0.05", "dino.gram_weight=1"],
      {"dino_loss", "ibot_loss", "koleo_loss", "kde_loss", "gram_loss"}),
     (["dino.ibot_weight=1", "dino.ibot_separate_head=true", "dino.centering=sinkhorn"], {"dino_loss", "ibot_loss"})],
)
def test_active_terms_and_total(extra: list[str], terms: set[str]) -> None:
    cfg = load_config(None, [*BASE, *extra])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    out = method(_batch(), step=0)
    present = {k for k in out if k.endswith("_loss")}
    assert present == terms
    weights = {"dino_loss": cfg.dino.dino_weight, "ibot_loss": cfg.dino.ibot_weight,
               "koleo_loss": cfg.dino.koleo_weight, "kde_loss": cfg.dino.kde_weight, "gram_loss": cfg.dino.gram_weight}
    expected = sum(weights[t] * out[t] for t in terms)
    torch.testing.assert_close(out["loss"].detach(), expected)
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())


def test_gram_waits_for_its_start_step() -> None:
    cfg = load_config(None, [*BASE, "dino.gram_weight=1", "dino.gram_start_step=5"])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    assert "gram_loss" not in method(_batch(), step=4)
    assert "gram_loss" in method(_batch(), step=5)


def test_teacher_is_ema_of_student_and_center_moves() -> None:
    cfg = load_config(None, [*BASE, "dino.teacher_momentum=0.9", "dino.teacher_momentum_end=0.9"])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    t_before = {n: p.clone() for n, p in method.teacher.named_parameters()}
    method(_batch(), step=0)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_optimizer_step(0)
    student = dict(method.student.named_parameters())
    for n, p in method.teacher.named_parameters():
        if student[n].requires_grad:
            torch.testing.assert_close(p, 0.9 * t_before[n] + 0.1 * student[n])
        else:  # frozen parameters (weight-norm gain, LoRA base weights) are not averaged
            torch.testing.assert_close(p, t_before[n])
    assert method.dino_loss.center.abs().sum() > 0


def test_last_layer_frozen_early() -> None:
    cfg = load_config(None, [*BASE, "dino.freeze_last_layer_steps=3"])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    method(_batch(), step=0)["loss"].backward()
    method.before_optimizer_step(2)
    last = [p for n, p in method.student.named_parameters() if "last_layer" in n and p.requires_grad]
    assert last and all(p.grad is None for p in last)
