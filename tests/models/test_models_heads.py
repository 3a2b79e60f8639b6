"""Projection heads: DINO's bottleneck + weight-normed prototypes, and DINO-X's plain MLP head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfoundry.config import load_config
from medfoundry.config.schema import HeadConfig
from medfoundry.models.heads import DINOHead
from medfoundry.models.registry import create_backbone
from medfoundry.recipes import resolve_recipe


def test_dino_head_keeps_its_layout() -> None:
    head = DINOHead(24, HeadConfig(out_dim=50, hidden_dim=16, bottleneck_dim=8, nlayers=3))
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert head.mlp[-1].out_features == 8
    assert hasattr(head.last_layer, "parametrizations")  # weight norm with the norm fixed at 1
    assert "last_layer.parametrizations.weight.original0" in head.state_dict()


def test_mlp_head_is_dinox_linear_gelu_linear() -> None:
    """DINO-X (zoo/arch.py): Linear(d, d) - GELU - Linear(d, K), biases, no bottleneck, no normalisation."""
    torch.manual_seed(0)
    head = DINOHead(24, HeadConfig(kind="mlp", out_dim=50, hidden_dim=0, nlayers=2))
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU]
    assert (head.mlp[0].in_features, head.mlp[0].out_features) == (24, 24)  # hidden_dim 0 = backbone width
    assert isinstance(head.last_layer, nn.Linear) and not hasattr(head.last_layer, "parametrizations")
    assert head.last_layer.bias is not None and head.last_layer.out_features == 50
    x = torch.randn(5, 24)
    expected = head.last_layer.weight @ nn.functional.gelu(head.mlp[0].weight @ x.T + head.mlp[0].bias[:, None])
    torch.testing.assert_close(head(x), (expected + head.last_layer.bias[:, None]).T)
    assert not torch.allclose(head(x).norm(dim=-1), head(2 * x).norm(dim=-1))  # no L2 normalisation inside


@pytest.mark.parametrize("recipe,expected_m", [("dino_x_ct_vits16", 24.9), ("dino_x_ct_vitl16", 312.6)])
def test_dinox_recipe_totals_match_the_seed(recipe: str, expected_m: float) -> None:
    """Backbone + DINO-X head of one tower, counted on the meta device: the seed's totals within 1 %."""
    cfg = load_config(resolve_recipe(recipe))
    assert cfg.dino.head.kind == "mlp" and cfg.dino.head.out_dim == 8192
    with torch.device("meta"):
        backbone = create_backbone(cfg.model)
        head = DINOHead(backbone.embed_dim, cfg.dino.head)
    total = sum(p.numel() for p in [*backbone.parameters(), *head.parameters()])
    print(f"{recipe}: backbone {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M + head "
          f"{sum(p.numel() for p in head.parameters()) / 1e6:.2f}M = {total / 1e6:.2f}M (seed: {expected_m}M)")
    assert total / 1e6 == pytest.approx(expected_m, rel=0.01)


@pytest.mark.parametrize("grad", [True, False])
def test_dino_head_without_autograd_equals_the_parametrised_layer(grad: bool) -> None:
    """Under no_grad (the EMA teacher) the weight-normed prototypes run as ``linear(x, v) * (g / ||v||)``, never
    materialising the normalised weight: the scores equal the parametrised layer's to float rounding, also with
    gains other than 1 and rows of ``v`` of very different norms."""
    torch.manual_seed(0)
    head = DINOHead(24, HeadConfig(out_dim=300, hidden_dim=16, bottleneck_dim=8, nlayers=3))
    wn = head.last_layer.parametrizations.weight
    with torch.no_grad():
        wn.original1.mul_(torch.rand(300, 1) * 10 + 0.01)
        wn.original0.copy_(torch.rand(300, 1) + 0.5)
    x = torch.randn(7, 24)
    with torch.no_grad():
        want = head.last_layer(nn.functional.normalize(head.mlp(x), dim=-1))
    with torch.set_grad_enabled(grad):
        got = head(x)
    assert got.requires_grad == grad
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
