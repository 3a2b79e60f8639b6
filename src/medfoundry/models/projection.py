"""Projection heads that map a tower's features into the shared image-text embedding space.

CLIP (Radford et al. 2021) uses a single linear map without bias per tower; ConVIRT (Zhang et al.
2022) and many medical CLIP variants use a two-layer MLP. Both are offered here.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """``in_dim -> out_dim`` projection: identity, linear, or Linear-GELU-Linear.

    Args:
        in_dim: width of the tower's pooled features.
        out_dim: shared embedding width.
        kind: ``"none"`` (identity; ``in_dim`` must equal ``out_dim``), ``"linear"`` or ``"mlp"``.
        hidden_dim: hidden width of the MLP.
        bias: bias in the (last) linear layer.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: Literal["none", "linear", "mlp"] = "linear",
                 hidden_dim: int = 2048, bias: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.in_dim, self.out_dim = in_dim, out_dim
        if kind == "none":
            if in_dim != out_dim:
                raise ValueError(f"projection 'none' needs in_dim == out_dim, got {in_dim} -> {out_dim}")
            self.net: nn.Module = nn.Identity()
        elif kind == "linear":
            self.net = nn.Linear(in_dim, out_dim, bias=bias)
            nn.init.normal_(self.net.weight, std=in_dim**-0.5)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                     nn.Linear(hidden_dim, out_dim, bias=bias))
        else:
            raise ValueError(f"unknown projection kind '{kind}' (none, linear, mlp)")
        if bias and kind == "linear":
            nn.init.zeros_(self.net.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Project (B, in_dim) features to (B, out_dim)."""
        return self.net(x)
