"""Tile features of one slide, extracted once per backbone and cached on disk.

The cache follows :func:`medfoundry.eval.features.cached_features`: ``KEY.npz`` files holding the features and a
JSON description, written atomically, under the same folders (``RUN/eval/feature_cache/`` from the CLI, else
:func:`~medfoundry.eval.features.default_cache_dir`). The key is made of the checkpoint identity, the slide file
(resolved path, size, modification time), the tile settings (µm/px, size, tissue threshold, tile cap, slide
backend and µm/px override), the evaluation transform and the feature kind: a changed slide, checkpoint or
setting is a new key. The cache is per slide, so manifests that share slides share their features.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfoundry.eval.eval_images import EvalTransform
from medfoundry.eval.features import default_cache_dir, extract_features
from medfoundry.eval.slide.settings import SlideSettings
from medfoundry.eval.slide.tiles import TileImages, slide_tiles

_VERSION = 1


@dataclass
class SlideFeatures:
    """A slide as a bag: one feature per kept tile, with the tiles' level-0 corners for the heat map."""

    path: str
    feats: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y)
    slide_mpp: float  # level-0 µm/px
    extent0: float  # tile side in level-0 pixels


def slide_cache_key(identity: str, path: str, settings: SlideSettings, transform: EvalTransform) -> str:
    """The cache key of a slide's tile features (see the module docstring)."""
    st = os.stat(path)
    payload = json.dumps({
        "identity": identity, "slide": [str(Path(path).resolve()), st.st_size, st.st_mtime_ns],
        "tiles": [settings.tile_mpp, settings.tile_size, settings.min_tissue, settings.max_tiles, settings.slide_mpp,
                  settings.wsi_backend],
        "transform": transform.settings(), "feature": settings.feature, "version": _VERSION}, sort_keys=True)
    return "slide-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


def compute_slide_features(backbone: nn.Module, path: str, settings: SlideSettings, transform: EvalTransform,
                           device: torch.device | str | None = None) -> SlideFeatures:
    """Extract the tile features of slide ``path`` (no caching): the tiles of :func:`slide_tiles` through
    :func:`~medfoundry.eval.features.extract_features` (eval mode, no gradients)."""
    tiles = slide_tiles(path, settings)
    feats = extract_features(backbone, TileImages(tiles, transform), settings.feature, settings.batch_size, device)
    return SlideFeatures(path, feats.astype(np.float32), tiles.coords, tiles.slide_mpp, tiles.extent0)


def cached_slide_features(
    backbone: nn.Module,
    identity: str,
    path: str,
    settings: SlideSettings,
    transform: EvalTransform,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
) -> tuple[SlideFeatures, bool]:
    """``(tile features of slide path, whether they came from the cache)``; an empty ``identity`` (weights that
    cannot be named) disables the cache. An unreadable cache entry is recomputed and overwritten."""
    if not identity:
        return compute_slide_features(backbone, path, settings, transform, device), False
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = slide_cache_key(identity, path, settings, transform)
    file = folder / f"{key}.npz"
    if file.is_file():
        try:
            with np.load(file, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                return SlideFeatures(path, data["feats"], data["coords"], float(meta["slide_mpp"]),
                                     float(meta["extent0"])), True
        except (OSError, ValueError, KeyError):
            pass
    out = compute_slide_features(backbone, path, settings, transform, device)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.tmp-{os.getpid()}.npz"
    meta = {"slide": path, "slide_mpp": out.slide_mpp, "extent0": out.extent0, "identity": identity,
            "feature": settings.feature, "tile_mpp": settings.tile_mpp, "tile_size": settings.tile_size}
    np.savez(tmp, feats=out.feats, coords=out.coords, meta=np.array(json.dumps(meta)))
    os.replace(tmp, file)
    return out, False
