"""Projection heads for self-supervised objectives."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from medfoundry.config.schema import HeadConfig


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021, "Emerging Properties in Self-Supervised ViTs").

    An MLP (GELU, ``nlayers`` linear layers) maps a token to a ``bottleneck_dim`` vector, which is
    L2-normalised and scored against ``out_dim`` prototypes by a weight-normalised linear layer
    without bias whose norm is fixed at 1 (``last_layer``; frozen early in training by the method).
    DINOv2 uses the same head for the class token (DINO) and the masked patch tokens (iBOT).
    """

    def __init__(self, in_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        if cfg.nlayers < 1:
            raise ValueError(f"head nlayers must be >= 1, got {cfg.nlayers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(cfg.nlayers - 1):
            layers += [nn.Linear(dim, cfg.hidden_dim), nn.GELU()]
            dim = cfg.hidden_dim
        layers.append(nn.Linear(dim, cfg.bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad_(False)
        self.out_dim = cfg.out_dim

    def forward(self, x: Tensor) -> Tensor:
        """Prototype scores (…, out_dim) for tokens (…, in_dim)."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
