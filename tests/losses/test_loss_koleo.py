"""Tests for medfoundry.losses.koleo.KoLeoLoss."""

import math

import torch

from medfoundry.losses import KoLeoLoss


def _brute_force(x: torch.Tensor, eps: float = 1e-8) -> float:
    rows = [[float(v) for v in r] for r in x]
    unit = []
    for r in rows:
        norm = math.sqrt(sum(v * v for v in r))
        unit.append([v / norm for v in r])
    total = 0.0
    for i, a in enumerate(unit):
        best = min(math.dist(a, b) for j, b in enumerate(unit) if j != i)
        total += -math.log(best + eps)
    return total / len(unit)


def test_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=g)
    loss = KoLeoLoss()(x)
    assert abs(loss.item() - _brute_force(x)) < 1e-4


def test_decreases_as_points_spread():
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(1, 8, generator=g)
    noise = torch.randn(16, 8, generator=g)
    losses = [KoLeoLoss()(direction + spread * noise).item() for spread in (0.01, 0.1, 1.0, 10.0)]
    assert losses == sorted(losses, reverse=True), losses


def test_gradient_step_increases_min_distance():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(1, 3, generator=g) + 0.1 * torch.randn(10, 3, generator=g)).requires_grad_(True)

    def min_dist(v: torch.Tensor) -> float:
        z = torch.nn.functional.normalize(v.detach(), dim=-1)
        d = torch.cdist(z, z) + torch.eye(len(z)) * 10
        return d.min().item()

    before = min_dist(x)
    opt = torch.optim.SGD([x], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        KoLeoLoss()(x).backward()
        opt.step()
    assert min_dist(x) > before


def test_scale_invariant_and_degenerate_cases():
    x = torch.randn(5, 3)
    torch.testing.assert_close(KoLeoLoss()(x), KoLeoLoss()(x * torch.rand(5, 1).add(0.5)))
    single = torch.randn(1, 3, requires_grad=True)
    loss = KoLeoLoss()(single)
    assert loss.item() == 0.0
    loss.backward()
    dup = torch.ones(4, 3, requires_grad=True)
    loss = KoLeoLoss()(dup)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(dup.grad).all()
