"""The knobs of slide-level evaluation: which tiles, which features, which aggregators and how they are trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: The slide aggregators: ``mean`` (mean pooling + logistic regression) and ``abmil`` (gated attention MIL).
AGGREGATORS: tuple[str, ...] = ("mean", "abmil")
Aggregator = Literal["mean", "abmil"]


@dataclass(frozen=True)
class SlideSettings:
    """Tile sampling, feature extraction and aggregator training of :mod:`medfoundry.eval.slide`.

    The tile fields mean what the ``data`` keys of the same name mean for ``data.kind=wsi`` (docs/data.md); a run's
    own values are the defaults the CLI fills in, so a backbone is evaluated on tiles of the physical size it was
    trained on. The gated-attention defaults follow the reference implementation of Ilse et al. (2018),
    AMLab-Amsterdam/AttentionDeepMIL: Adam with betas (0.9, 0.999), learning rate 5e-4, weight decay 1e-4, one bag
    per step, attention dimension 128 (their L = 500 embedding is smaller here: 128, for frozen ViT features).
    """

    tile_mpp: float = 0.5  # microns per pixel of the tiles
    tile_size: int = 224  # tile side in pixels at tile_mpp
    min_tissue: float = 0.25  # smallest tissue fraction (Otsu on the thumbnail) of a kept tile
    max_tiles: int = 256  # tiles per slide, evenly spread over the tissue grid (0 = all)
    slide_mpp: float | None = None  # level-0 µm/px of slides whose metadata lack it
    wsi_backend: str = "auto"  # auto, openslide or tifffile
    feature: Literal["cls", "mean_patch", "both"] = "cls"  # tile feature (medfoundry.eval.features.pool_features)
    batch_size: int = 64  # tiles per forward pass
    aggregators: tuple[str, ...] = AGGREGATORS  # which aggregators to train and report
    epochs: int = 40  # passes over the training slides (gated attention MIL)
    patience: int = 10  # stop after this many epochs without a better val score (0 = never stop early)
    lr: float = 5e-4  # Adam learning rate (Ilse et al. 2018)
    weight_decay: float = 1e-4  # Adam weight decay (Ilse et al. 2018)
    embed_dim: int = 128  # tile embedding h = ReLU(W x) before the attention
    attention_dim: int = 128  # D of the gated attention, V and U are D x embed_dim
    seed: int = 0  # seed of the splits drawn by patient, the MIL initialisation and order, the bootstrap
    n_bootstrap: int = 1000  # bootstrap resamples of the test intervals
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train/val/test shares when no split column

    def check(self) -> None:
        """``ValueError`` naming the first setting out of range (aggregator names, sizes, fractions)."""
        unknown = [a for a in self.aggregators if a not in AGGREGATORS]
        if unknown or not self.aggregators:
            raise ValueError(f"unknown slide aggregator(s) {unknown or '(none given)'}; use {', '.join(AGGREGATORS)}")
        if self.tile_mpp <= 0 or self.tile_size < 1:
            raise ValueError(f"tile_mpp and tile_size must be positive (got {self.tile_mpp}, {self.tile_size})")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue must be in [0, 1] (got {self.min_tissue})")
        if self.max_tiles < 0 or self.epochs < 1 or self.patience < 0 or self.n_bootstrap < 0:
            raise ValueError("max_tiles, patience and n_bootstrap must be >= 0 and epochs >= 1 "
                             f"(got {self.max_tiles}, {self.patience}, {self.n_bootstrap}, {self.epochs})")
        if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions) or \
                sum(self.split_fractions) <= 0:
            raise ValueError(f"split fractions must be three non-negative numbers (train, val, test), "
                             f"got {self.split_fractions}")
