"""Entropy-wall and collapse detectors on constructed metric streams."""

import math

import pytest
import torch

from medfoundry.eval import CollapseDetector, EntropyWallDetector, RepresentationHealthError

K = 256


def _teacher_entropy(logits: torch.Tensor, center: torch.Tensor, temp: float = 0.04) -> float:
    p = torch.softmax((logits - center) / temp, dim=-1)
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())


def _wall_stream(steps: int, momentum: float = 0.9):
    """Teacher logits that are the same for every image (low-variance CT): the center catches up and
    the centred teacher output becomes uniform, entropy -> log K."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(K, generator=gen)
    center = torch.zeros(K)
    for step in range(steps):
        logits = shared + 1e-4 * torch.randn(32, K, generator=gen)
        yield step, _teacher_entropy(logits, center)
        center = momentum * center + (1 - momentum) * logits.mean(0)


def test_uniform_logits_have_max_entropy():
    assert _teacher_entropy(torch.zeros(4, K), torch.zeros(K)) == pytest.approx(math.log(K))


def test_entropy_wall_fires_once_on_uniform_teacher():
    det = EntropyWallDetector(num_prototypes=K, after_steps=200, patience=50)
    fired = [(s, msg) for s, h in _wall_stream(400) if (msg := det.update(s, h)) is not None]
    assert len(fired) == 1 and det.fired
    step, msg = fired[0]
    assert step == 249  # first eligible step is 200, fires on the 50th consecutive one
    assert "near-uniform" in msg and "entropy wall" in msg
    assert "0.999" in msg and "dino.center_momentum=0.999" in msg and "CT" in msg


def test_entropy_wall_quiet_on_healthy_stream():
    det = EntropyWallDetector(num_prototypes=K)
    for step in range(1000):
        h = math.log(K) * max(0.3, 1.0 - step / 300)  # decreasing entropy
        assert det.update(step, h) is None
    assert not det.fired


def test_entropy_wall_streak_resets_and_fatal():
    det = EntropyWallDetector(num_prototypes=K, after_steps=0, patience=5)
    high, low = math.log(K), 0.5 * math.log(K)
    for step, h in enumerate([high] * 4 + [low] + [high] * 4):
        assert det.update(step, h) is None
    assert det.update(9, high) is not None
    fatal = EntropyWallDetector(num_prototypes=K, after_steps=0, patience=2, fatal=True)
    fatal.update(0, high)
    with pytest.raises(RepresentationHealthError, match="center_momentum"):
        fatal.observe(1, {"teacher_entropy": high})
    assert fatal.fired


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
