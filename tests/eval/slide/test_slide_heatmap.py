"""The attention heat map: each tile's weight over its footprint on the thumbnail, a colour bar from 0 to the
slide's largest weight, written as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medfoundry.data.readers import open_slide
from medfoundry.eval.slide.heatmap import save_attention_heatmap, tile_weight_image


def test_weights_fill_their_tiles_footprint() -> None:
    coords = np.array([[0, 0], [40, 0], [0, 40]])
    grid = tile_weight_image((30, 30), coords, extent0=40.0, scale=2.0, weights=np.array([0.5, 0.3, 0.2]))
    assert np.all(grid[:20, :20] == 0.5) and np.all(grid[:20, 20:] == 0.3) and np.all(grid[20:, :20] == 0.2)
    assert np.all(np.isnan(grid[20:, 20:]))  # no tile there


def test_heat_map_png_on_a_real_region_slide(region_manifest: Path, tmp_path: Path) -> None:
    path = str(region_manifest.parent / pd.read_csv(region_manifest, dtype=str)["slide"][4])
    with open_slide(path) as slide:
        coords = slide.tile_grid(32, 0.5, 0.25)
    weights = np.full(len(coords), 0.1 / (len(coords) - 1))
    weights[0] = 0.9  # one tile holds most of the attention
    out = save_attention_heatmap(path, coords, 32 * 0.5 / 0.499, weights, tmp_path / "h" / "map.png", "test")
    img = np.asarray(Image.open(out).convert("RGB")).astype(float)
    assert out.is_file() and img.shape[0] > 200 and img.shape[1] > 200
    assert img.std() > 10  # a picture, not a blank canvas
    with pytest.raises(ValueError, match="2 attention weights for"):
        save_attention_heatmap(path, coords, 32.0, weights[:2], tmp_path / "bad.png")
