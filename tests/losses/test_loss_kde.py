"""Tests for medfoundry.losses.kde.KDEUniformityLoss."""

import math

import pytest
import torch
import torch.nn.functional as F

from medfoundry.losses import KDEUniformityLoss


def _brute_force(x: torch.Tensor, t: float, estimator: str, include_self: bool) -> float:
    z = F.normalize(x.double(), dim=-1)
    n = len(z)
    kernel = [[math.exp(-t * float(((z[i] - z[j]) ** 2).sum())) for j in range(n)] for i in range(n)]
    others = [[kernel[i][j] for j in range(n) if include_self or j != i] for i in range(n)]
    if estimator == "entropy":
        return sum(math.log(sum(row) / len(row)) for row in others) / n
    flat = [v for row in others for v in row]
    return math.log(sum(flat) / len(flat))


@pytest.mark.parametrize("estimator", ["entropy", "pairwise"])
@pytest.mark.parametrize("include_self", [True, False])
def test_matches_brute_force(estimator, include_self):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g)
    loss = KDEUniformityLoss(t=1.5, estimator=estimator, include_self=include_self)(x)
    assert abs(loss.item() - _brute_force(x, 1.5, estimator, include_self)) < 1e-5


@pytest.mark.parametrize("estimator", ["entropy", "pairwise"])
def test_spread_lower_than_clustered(estimator):
    g = torch.Generator().manual_seed(1)
    center = torch.randn(1, 16, generator=g)
    noise = torch.randn(32, 16, generator=g)
    loss_fn = KDEUniformityLoss(estimator=estimator)
    clustered = loss_fn(center + 0.05 * noise)
    spread = loss_fn(noise)
    assert spread < clustered


def test_wang_isola_uniformity():
    x = torch.randn(10, 6)
    z = F.normalize(x, dim=-1)
    expected = torch.pdist(z, p=2).pow(2).mul(-2.0).exp().mean().log()
    loss = KDEUniformityLoss(t=2.0, estimator="pairwise", include_self=False)(x)
    torch.testing.assert_close(loss, expected)


def test_relation_to_openmidnight_formula():
    """Same terms as OpenMidnight's KDELoss (kappa=5, self included) up to sign and a constant."""
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(12, 8, generator=g, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    kappa = 5.0
    z = F.normalize(x1, dim=-1)
    openmidnight = -torch.log(torch.exp(kappa * (z @ z.t())).sum(dim=1)).mean()
    ours = KDEUniformityLoss(t=kappa / 2)(x2)
    torch.testing.assert_close(ours, -openmidnight - kappa - math.log(12))
    openmidnight.backward()
    ours.backward()
    torch.testing.assert_close(x2.grad, -x1.grad)


def test_gradient_descent_spreads_points():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 4, generator=g) + 0.2 * torch.randn(16, 4, generator=g)).requires_grad_(True)
    loss_fn = KDEUniformityLoss()
    first = loss_fn(x).item()
    opt = torch.optim.SGD([x], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
    assert loss_fn(x).item() < first


def test_degenerate_and_invalid():
    single = torch.randn(1, 3, requires_grad=True)
    assert KDEUniformityLoss(include_self=False)(single).item() == 0.0
    torch.testing.assert_close(KDEUniformityLoss()(single), torch.tensor(0.0))
    with pytest.raises(ValueError):
        KDEUniformityLoss(t=0.0)
    with pytest.raises(ValueError):
        KDEUniformityLoss(estimator="other")  # type: ignore[arg-type]
