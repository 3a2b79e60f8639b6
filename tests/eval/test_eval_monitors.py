"""Entropy-wall, prototype-collapse and collapse detectors on constructed metric streams."""

import math

import pytest
import torch

from medfoundry.eval import (
    CollapseDetector,
    EntropyWallDetector,
    PrototypeCollapseDetector,
    RepresentationHealthError,
)

K = 256


def _teacher_entropy(logits: torch.Tensor, center: torch.Tensor, temp: float = 0.04) -> float:
    p = torch.softmax((logits - center) / temp, dim=-1)
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())


def _wall_stream(steps: int, momentum: float = 0.9, student_temp: float = 0.1):
    """Teacher logits that are the same for every image (low-variance CT): the center catches up, the centred
    teacher output becomes uniform and the DINO loss H(teacher, student) climbs to ln K; yields loss / ln K."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(K, generator=gen)
    center = torch.zeros(K)
    for step in range(steps):
        logits = shared + 1e-4 * torch.randn(32, K, generator=gen)
        t = torch.softmax((logits - center) / 0.04, dim=-1)
        s = torch.log_softmax(0.01 * torch.randn(32, K, generator=gen) / student_temp, dim=-1)
        yield step, float(-(t * s).sum(-1).mean()) / math.log(K)
        center = momentum * center + (1 - momentum) * logits.mean(0)


def test_uniform_logits_have_max_entropy():
    assert _teacher_entropy(torch.zeros(4, K), torch.zeros(K)) == pytest.approx(math.log(K))


def test_entropy_wall_fires_once_on_loss_at_log_k():
    det = EntropyWallDetector(num_prototypes=K, after_steps=200, patience=50)
    assert det.threshold_frac == 0.9 and det.metric_key == "dino_loss_frac"
    fired = [(s, msg) for s, f in _wall_stream(400) if (msg := det.update(s, f)) is not None]
    assert len(fired) == 1 and det.fired
    step, msg = fired[0]
    assert step == 249  # first eligible step is 200, fires on the 50th consecutive one
    assert "entropy wall" in msg and f"ln K = {math.log(K):.4f}" in msg and f"K = {K}" in msg
    assert "`optim.lr=" in msg and "`dino.teacher_temp=0.04`" in msg
    assert "center_momentum" not in msg  # no HU data / center momentum given: no center advice


def test_entropy_wall_advice_depends_on_run():
    wall = [1.0] * 3
    ct = EntropyWallDetector(K, after_steps=0, patience=3, center_momentum=0.9, hu_data=True, lr=5e-4)
    msg = [ct.observe(s, {"dino_loss_frac": f, "teacher_mean_entropy": 5.0}) for s, f in enumerate(wall)][-1]
    assert "`dino.center_momentum=0.999`" in msg and "large batch" in msg and "HU/CT" in msg
    assert "`optim.lr=0.001`" in msg and "5.0000 nats" in msg  # teacher mean entropy quoted
    for kwargs in ({"center_momentum": 0.999, "hu_data": True}, {"center_momentum": 0.9, "hu_data": False},
                   {"center_momentum": 0.9, "hu_data": True, "centering": "sinkhorn"}):
        det = EntropyWallDetector(K, after_steps=0, patience=1, **kwargs)
        assert "center_momentum=0.999" not in det.update(0, 0.95)


def test_entropy_wall_quiet_on_healthy_stream():
    det = EntropyWallDetector(num_prototypes=K)
    for step in range(1000):
        frac = max(0.3, 1.0 - step / 300)  # the loss falls from ln K
        assert det.update(step, frac) is None
    assert not det.fired


def test_entropy_wall_streak_resets_and_fatal():
    det = EntropyWallDetector(num_prototypes=K, after_steps=0, patience=5)
    high, low = 0.97, 0.5
    for step, f in enumerate([high] * 4 + [low] + [high] * 4):
        assert det.update(step, f) is None
    assert det.observe(9, {"teacher_entropy": 0.0}) is None  # wrong key: ignored, streak kept
    assert det.update(9, float("nan")) is None
    assert det.update(10, high) is not None
    fatal = EntropyWallDetector(num_prototypes=K, after_steps=0, patience=2, fatal=True)
    fatal.update(0, high)
    with pytest.raises(RepresentationHealthError, match="optim.lr"):
        fatal.observe(1, {"dino_loss_frac": high})
    assert fatal.fired


def _prototype_stream(steps: int, rows: int = 64, collapse_at: int = 100):
    """Teacher targets over K prototypes: diverse one-hot rows, then (from ``collapse_at``) all on one prototype."""
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, K, (rows,), generator=gen) if step < collapse_at else torch.zeros(rows, dtype=torch.long)
        probs = torch.nn.functional.one_hot(idx, K).float() * 0.99 + 0.01 / K
        mean = probs.mean(0)
        eff = float(torch.exp(-(mean * mean.log()).sum()))
        yield step, {"teacher_effective_prototypes_frac": eff / min(K, rows), "teacher_effective_prototypes": eff,
                     "teacher_distinct_prototypes": float(idx.unique().numel())}


def test_prototype_collapse_fires_after_patience_with_center_advice():
    det = PrototypeCollapseDetector(K, after_steps=50, patience=20, center_momentum=0.999)
    fired = [(s, m) for s, metrics in _prototype_stream(300) if (m := det.observe(s, metrics)) is not None]
    assert len(fired) == 1 and det.fired
    step, msg = fired[0]
    assert step == 119  # collapsed from step 100, the 20th consecutive collapsed step
    assert "1.0 distinct argmax prototypes" in msg
    assert f"K = {K}" in msg and "effective prototypes" in msg and "KoLeo" in msg and "~0" in msg
    assert "`dino.center_momentum=0.9`" in msg and "`dino.centering=sinkhorn`" in msg
    assert "batch 64+" in msg and "K = 8192" in msg and "50k+" in msg


def test_prototype_collapse_resets_quiet_and_other_advice():
    det = PrototypeCollapseDetector(K, after_steps=0, patience=3, center_momentum=0.9, teacher_temp=0.04)
    for step, frac in enumerate([0.05, 0.05, 0.5, 0.05, 0.05]):  # a healthy value resets the streak
        assert det.update(step, frac) is None
    msg = det.update(5, 0.05, effective=3.2, distinct=2)
    assert msg is not None and "3.20 effective" in msg and "2.0 distinct" in msg
    assert "`dino.centering=sinkhorn`" in msg and "`dino.teacher_temp=0.06`" in msg and "`dino.head.out_dim=" in msg
    assert "`dino.center_momentum=0.9`" not in msg
    assert det.update(6, 0.0) is None  # fires once
    healthy = PrototypeCollapseDetector(K, after_steps=10, patience=5)
    for step, metrics in _prototype_stream(300, collapse_at=10**9):
        assert healthy.observe(step, metrics) is None
    early = PrototypeCollapseDetector(K, after_steps=100, patience=5)
    assert all(early.update(s, 0.0) is None for s in range(100))  # before after_steps: ignored
    fatal = PrototypeCollapseDetector(K, after_steps=0, patience=1, fatal=True, center_momentum=0.999)
    with pytest.raises(RepresentationHealthError, match="center_momentum=0.9"):
        fatal.update(0, 0.01)
    with pytest.raises(ValueError):
        PrototypeCollapseDetector(K, min_effective_frac=0.0)


def test_collapse_detector():
    det = CollapseDetector(after_steps=100, patience=20)
    for step in range(500):
        assert det.update(step, feature_std=0.03, active_dims_frac=0.9) is None
    assert not det.fired

    det = CollapseDetector(after_steps=100, patience=20)
    msgs = [m for s in range(500) if (m := det.update(s, feature_std=0.03 * math.exp(-s / 40))) is not None]
    assert len(msgs) == 1 and "dino.koleo_weight=0.1" in msgs[0] and "KoLeo" in msgs[0]

    dims = CollapseDetector(after_steps=0, patience=3)
    out = [dims.observe(s, {"feature_std": 0.05, "active_dims_frac": 0.02}) for s in range(3)]
    assert out[:2] == [None, None] and "active-dimension fraction" in out[2]

    fatal = CollapseDetector(after_steps=0, patience=1, fatal=True)
    with pytest.raises(RepresentationHealthError, match="koleo"):
        fatal.update(0, 0.0)


def test_patience_counts_steps_when_only_logged_steps_are_observed():
    """The loop feeds the monitors its logged steps only (``train.log_every``): with ``stride = 10`` the
    detector fires on the same step as one fed every step would, to within the logging interval."""
    every = EntropyWallDetector(num_prototypes=K, after_steps=200, patience=50)
    logged = EntropyWallDetector(num_prototypes=K, after_steps=200, patience=50)
    logged.stride = 10
    fired_every = [s for s, f in _wall_stream(400) if every.update(s, f) is not None]
    fired_logged = [s for s, f in _wall_stream(400) if s % 10 == 9 and logged.update(s, f) is not None]
    assert fired_every == [249]
    assert fired_logged == [249] and logged.consecutive == 5  # 5 observations x 10 steps = patience 50


def test_monitor_hook_sets_the_stride_from_log_every():
    from medfoundry.config import load_config
    from medfoundry.eval.in_training import MonitorHook, PrototypeTargets
    from medfoundry.eval.sections import FrozenEvalSections

    cfg = load_config(None, ["train.log_every=10"])
    sections = FrozenEvalSections(cfg.data, cfg.crops, cfg.eval)
    hook = MonitorHook(sections, 1e-3, PrototypeTargets(256, 0.9, "center", 0.04), cfg.train.log_every)
    assert hook.entropy.stride == hook.prototypes.stride == hook.collapse.stride == 10
    assert hook.eval_collapse.stride == 1  # fed every evaluation, its eval_patience counts evaluations
