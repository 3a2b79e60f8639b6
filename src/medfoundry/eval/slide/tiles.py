"""A slide's tissue tiles at a fixed µm/px: the sampler of ``data.kind=wsi``, as a dataset for feature extraction.

The tiles are exactly those a ``data.kind=wsi`` training source takes from the slide
(:class:`medfoundry.data.entries.SlideEntry`: :meth:`~medfoundry.data.readers.wsi.Slide.tile_grid` on the Otsu
tissue mask, :meth:`~medfoundry.data.readers.wsi.Slide.read_tile` from the next finer pyramid level), thinned to
``max_tiles`` evenly spread over the grid as ``medfoundry prepare --max-tiles`` does, so a slide of any size costs
at most that many forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medfoundry.config.data import DataConfig
from medfoundry.data.entries import SlideEntry
from medfoundry.data.readers import ReaderError
from medfoundry.eval.eval_images import EvalTransform
from medfoundry.eval.slide.settings import SlideSettings


@dataclass
class SlideTiles:
    """The chosen tiles of one slide: level-0 corners and what is needed to read and draw them."""

    entry: SlideEntry  # the training sampler's entry of the slide (reads tile t)
    indices: np.ndarray  # (N,) which of the entry's tiles were kept
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y) of the kept tiles' top-left corners
    slide_mpp: float  # level-0 µm/px of the slide
    extent0: float  # a tile's side in level-0 pixels (tile_size * tile_mpp / slide_mpp)


def evenly_spread(n: int, keep: int) -> np.ndarray:
    """Indices of ``keep`` of ``n`` items spread evenly over them (all of them when ``keep`` is 0 or >= ``n``), the
    thinning of ``medfoundry prepare --max-tiles``."""
    if keep <= 0 or n <= keep:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, keep).round().astype(np.int64))


def slide_tiles(path: str, settings: SlideSettings) -> SlideTiles:
    """The tissue tiles of slide ``path`` at ``settings.tile_mpp`` (``ReaderError`` naming the slide when it
    cannot be opened or holds no tile with enough tissue)."""
    cfg = DataConfig(kind="wsi", root=path, channels=3, tile_mpp=settings.tile_mpp, tile_size=settings.tile_size,
                     min_tissue=settings.min_tissue, slide_mpp=settings.slide_mpp, wsi_backend=settings.wsi_backend)
    entry = SlideEntry(path, cfg)
    if entry.depth == 0:
        raise ReaderError(f"{path}: no {settings.tile_size}-px tile at {settings.tile_mpp} µm/px holds "
                          f">= {settings.min_tissue:.0%} tissue; lower --min-tissue or --tile-size")
    indices = evenly_spread(entry.depth, settings.max_tiles)
    slide_mpp = float(entry.meta["slide_mpp"])
    return SlideTiles(entry, indices, np.asarray(entry.coords, dtype=np.int64)[indices], slide_mpp,
                      settings.tile_size * settings.tile_mpp / slide_mpp)


class TileImages(torch.utils.data.Dataset):
    """The kept tiles of a slide, read and preprocessed on access (for
    :func:`medfoundry.eval.features.extract_features`): RGB in [0, 1] through the run's evaluation transform."""

    def __init__(self, tiles: SlideTiles, transform: EvalTransform) -> None:
        self.tiles = tiles
        self.transform = transform

    def __len__(self) -> int:
        return len(self.tiles.indices)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(self.tiles.entry.read(int(self.tiles.indices[i])))
