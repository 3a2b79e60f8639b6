"""Projection heads for self-supervised objectives."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from medfoundry.config.schema import HeadConfig


class DINOHead(nn.Module):
    """Projection head of the DINO family, in one of two forms chosen by ``HeadConfig.kind``.

    ``dino`` (Caron et al. 2021, "Emerging Properties in Self-Supervised ViTs"): an MLP (GELU,
    ``nlayers`` linear layers) maps a token to a ``bottleneck_dim`` vector, which is L2-normalised and
    scored against ``out_dim`` prototypes by a weight-normalised linear layer without bias whose norm
    is fixed at 1. DINOv2 uses the same head for the class token (DINO) and masked patch tokens (iBOT).

    ``mlp`` (DINO-X, ``zoo/arch.py`` ``DinoStudentTeacher``): a plain MLP of ``nlayers`` linear layers
    with GELU between them and biases, ending in ``out_dim`` outputs: no bottleneck, no normalisation,
    no weight norm, PyTorch's default initialisation. DINO-X's head is ``nlayers=2``, ``hidden_dim=0`` (the
    backbone width), ``out_dim=8192``.

    In both forms the final layer is ``last_layer`` (frozen early in training by the method).
    """

    def __init__(self, in_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        if cfg.nlayers < 1:
            raise ValueError(f"dino.head.nlayers must be >= 1, got {cfg.nlayers}")
        if cfg.hidden_dim < 0:
            raise ValueError(f"dino.head.hidden_dim must be >= 0 (0 = backbone width), got {cfg.hidden_dim}")
        self.kind = cfg.kind
        hidden = cfg.hidden_dim or in_dim
        n_mlp = cfg.nlayers - 1 if cfg.kind == "mlp" else cfg.nlayers
        layers: list[nn.Module] = []
        dim = in_dim
        for i in range(n_mlp):
            last = i == n_mlp - 1
            out = cfg.bottleneck_dim if (last and cfg.kind == "dino") else hidden
            layers.append(nn.Linear(dim, out))
            if not last or cfg.kind == "mlp":
                layers.append(nn.GELU())
            dim = out
        self.mlp = nn.Sequential(*layers)
        if cfg.kind == "mlp":
            self.last_layer = nn.Linear(dim, cfg.out_dim)  # PyTorch's default init, as DINO-X's nn.Sequential head
        else:
            self.apply(_init_linear)
            self.last_layer = weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
            with torch.no_grad():
                self.last_layer.parametrizations.weight.original0.fill_(1.0)
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)
        self.out_dim = cfg.out_dim

    def forward(self, x: Tensor) -> Tensor:
        """Prototype scores (…, out_dim) for tokens (…, in_dim).

        Without autograd (the EMA teacher, evaluation) the weight-normed prototypes are applied as
        ``linear(x, v) * (g / ||v||)`` (:func:`_weight_normed_linear`), which never materialises the normalised
        ``(out_dim, bottleneck_dim)`` matrix; with autograd the parametrised layer runs as it is.
        """
        x = self.mlp(x)
        if self.kind == "dino":
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12
            x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
            if not torch.is_grad_enabled() and hasattr(self.last_layer, "parametrizations"):
                return _weight_normed_linear(self.last_layer, x)
        return self.last_layer(x)


def apply_head(head: nn.Module, parts: Sequence[Tensor]) -> list[Tensor]:
    """``head`` applied to each ``(rows_i, in_dim)`` tensor of ``parts`` with **one** call: the rows are
    concatenated, scored together and the output is split back, ``[head(p) for p in parts]`` up to float
    summation order.

    Why: a DINO head's cost is dominated by its prototype layer (65,536 x 256 for DINOv2, 64 MB in fp32)
    and, for ``kind="dino"``, by its weight norm (the normalised matrix with autograd, the row norms without);
    calling it once per tower and step reads that matrix and evaluates the weight norm once instead of once
    per token group (class tokens of the global crops, of the local crops, iBOT's masked patch tokens).
    DINOv2 does the same: its ``ssl_meta_arch.py`` concatenates the class and masked patch tokens and runs
    the shared head once per tower. The outputs are views of one tensor (no copy).
    """
    if len(parts) == 1:
        return [head(parts[0])]
    out = head(torch.cat(list(parts), dim=0))
    return list(out.split([p.shape[0] for p in parts], dim=0))


def _weight_normed_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` of a bias-free linear layer under ``weight_norm`` (``dim=0``: ``W = g * v / ||v||`` row-wise),
    computed as ``linear(x, v) * (g / ||v||)``: the same matmul (same FLOPs), the per-prototype scale applied to
    the ``(rows, out_dim)`` scores in place instead of to the ``(out_dim, in_dim)`` weight. Equal to ``layer(x)``
    up to float rounding, without the weight-sized temporary (64 MB for DINOv2's 65,536 x 256 prototypes) and
    its page faults. For no-grad calls only (the scale is applied in place)."""
    wn = layer.parametrizations.weight
    v, g = wn.original1, wn.original0
    scale = (g / torch.linalg.vector_norm(v, dim=1, keepdim=True)).t()  # (1, out_dim), as _weight_norm's g / ||v||
    return nn.functional.linear(x, v).mul_(scale)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
