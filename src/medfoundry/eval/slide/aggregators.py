"""Gated attention MIL (Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018).

A slide is a bag of tile features ``x_1 ... x_N``. Each is embedded, ``h_k = ReLU(W x_k)``; the gated attention
gives it the weight

    a_k = exp(w^T (tanh(V h_k) ⊙ sigm(U h_k))) / sum_j exp(w^T (tanh(V h_j) ⊙ sigm(U h_j)))

(their eq. 9: the tanh branch alone is nearly linear for small inputs, the sigmoid gate adds the non-linearity),
and the slide is classified from the weighted mean ``z = sum_k a_k h_k``. The weights sum to 1 over the slide's
tiles and are what :mod:`medfoundry.eval.slide.heatmap` draws. Layer names and the single attention branch
(K = 1) follow the reference implementation, AMLab-Amsterdam/AttentionDeepMIL ``model.py::GatedAttention``.
Mean pooling, the other aggregator, is the special case ``a_k = 1 / N`` (it needs no module: the slide feature is
the mean tile feature, classified by the ``linear`` task's probe).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL over one bag of tile features (see the module docstring).

    Args:
        in_dim: tile feature dimension.
        n_classes: number of slide classes (logits; trained with cross-entropy).
        embed_dim: dimension of the tile embedding ``h`` (Ilse et al.: L = 500).
        attention_dim: dimension ``D`` of the attention's hidden layer (Ilse et al.: 128).
    """

    def __init__(self, in_dim: int, n_classes: int, embed_dim: int = 128, attention_dim: int = 128) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.attention_V = nn.Linear(embed_dim, attention_dim)  # noqa: N815 (the paper's V)
        self.attention_U = nn.Linear(embed_dim, attention_dim)  # noqa: N815 (the paper's U)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def attention(self, h: Tensor) -> Tensor:
        """(N,) softmax attention weights of the embedded tiles ``h`` (N, embed_dim); they sum to 1."""
        scores = self.attention_w(torch.tanh(self.attention_V(h)) * torch.sigmoid(self.attention_U(h)))
        return torch.softmax(scores.squeeze(-1), dim=0)

    def forward(self, bag: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits (n_classes,), attention (N,))`` of one bag of tile features (N, in_dim), N >= 1."""
        if bag.ndim != 2 or bag.shape[0] < 1:
            raise ValueError(f"a bag is (tiles, features) with at least one tile, got shape {tuple(bag.shape)}")
        h = self.embed(bag)
        a = self.attention(h)
        return self.classifier(a @ h), a
