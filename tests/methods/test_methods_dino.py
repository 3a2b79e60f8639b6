"""The dino method: active loss terms follow the config, the teacher is an EMA of the student."""

from __future__ import annotations

import pytest
import torch

from medfoundry.config import load_config
from medfoundry.methods.dino.method import DINOMethod

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


def _reference_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo (``dinov2/loss/koleo_loss.py``) written out: -mean log distance to the nearest other row."""
    z = torch.nn.functional.normalize(x, eps=eps, p=2, dim=-1)
    dots = z @ z.t()
    dots.view(-1)[:: z.shape[0] + 1].fill_(-1)
    nearest = dots.argmax(dim=1)
    return -torch.log(torch.nn.functional.pairwise_distance(z, z[nearest], 2, eps=eps) + eps).mean()


def _reference_kde(x: torch.Tensor, kappa: float = 5.0) -> torch.Tensor:
    """OpenMidnight's KDE term per crop: mean_i log sum_j exp(kappa cos(x_i, x_j)) (up to constants)."""
    z = torch.nn.functional.normalize(x, dim=-1)
    return torch.logsumexp(kappa * z @ z.t(), dim=1).mean()


def test_koleo_and_kde_are_summed_over_global_crops() -> None:
    """DINOv2 (ssl_meta_arch.py: sum over student_cls_tokens.chunk(2)) and OpenMidnight sum, not average."""
    cfg = load_config(None, [*BASE, "dino.koleo_weight=0.1", "dino.kde_weight=0.05"])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    batch = _batch()
    out = method(batch, step=0)
    with torch.no_grad():
        cls = method.student["backbone"].forward_features(batch["global_crops"].flatten(0, 1)).cls.float()
    koleo_ref = sum(_reference_koleo(c) for c in cls.chunk(2))
    torch.testing.assert_close(out["koleo_loss"], koleo_ref, rtol=1e-5, atol=1e-6)
    kde_one = [method.kde_loss(c) for c in cls.chunk(2)]
    torch.testing.assert_close(out["kde_loss"], sum(kde_one), rtol=1e-5, atol=1e-6)
    # the KDE term differs from OpenMidnight's logsumexp form only by a constant per crop (kernel normalisation)
    diffs = [float(k - _reference_kde(c)) for k, c in zip(kde_one, cls.chunk(2))]
    assert diffs[0] == pytest.approx(diffs[1], abs=1e-4)
    assert cfg.dino.koleo_weight == 0.1 and cfg.dino.kde_weight == 0.05  # the weights themselves unchanged


def test_teacher_target_stats_logged_and_exact() -> None:
    """Batch-mean entropy, effective/distinct prototypes and loss / ln K on the targets actually used."""
    import math

    from medfoundry.methods.dino.method import teacher_target_stats

    k = 8
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1]), k).float()  # 4 rows, 2 prototypes
    s = teacher_target_stats(one_hot, torch.tensor(0.5 * math.log(k)))
    mean_h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert all(v.ndim == 0 for v in s.values())
    assert float(s["teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)  # per-sample: confident
    assert float(s["teacher_mean_entropy"]) == pytest.approx(mean_h)
    assert float(s["teacher_mean_entropy_frac"]) == pytest.approx(mean_h / math.log(k))
    assert float(s["teacher_effective_prototypes"]) == pytest.approx(math.exp(mean_h))
    assert float(s["teacher_effective_prototypes_frac"]) == pytest.approx(math.exp(mean_h) / 4)  # min(K=8, N=4)
    assert float(s["teacher_distinct_prototypes"]) == 2
    assert float(s["dino_loss_frac"]) == pytest.approx(0.5)
    uniform = teacher_target_stats(torch.full((4, k), 1 / k))
    assert float(uniform["teacher_entropy_frac"]) == pytest.approx(1.0)
    assert float(uniform["teacher_effective_prototypes"]) == pytest.approx(k)  # soft rows can exceed min(K, N)
    assert "dino_loss_frac" not in uniform

    cfg = load_config(None, BASE)
    out = DINOMethod(cfg.model, cfg.dino, total_steps=10)(_batch(), step=0)
    for key in ("teacher_mean_entropy", "teacher_mean_entropy_frac", "teacher_effective_prototypes",
                "teacher_effective_prototypes_frac", "teacher_distinct_prototypes", "dino_loss_frac"):
        assert out[key].ndim == 0, key
    assert 1 <= float(out["teacher_distinct_prototypes"]) <= 6  # 2 global crops x batch 3 rows
    torch.testing.assert_close(out["dino_loss_frac"], out["dino_loss"].detach() / math.log(32))
