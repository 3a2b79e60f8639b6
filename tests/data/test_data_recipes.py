"""The modality recipes' data sections build a working source -> intensity -> multi-crop pipeline."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from medical_testdata import ct_phantom, render_level, write_ct_series

from medfoundry.config import load_config
from medfoundry.data.intensity import build_intensity_transform
from medfoundry.data.multicrop import MultiCropTransform
from medfoundry.data.prepare import PrepareOptions, prepare
from medfoundry.data.sources import build_source
from medfoundry.recipes import resolve_recipe


def _views(recipe: str, overrides: list[str]) -> tuple[dict, object]:
    cfg = load_config(resolve_recipe(recipe), overrides)
    sample = build_source(cfg.data)[0]
    torch.manual_seed(0)
    image = build_intensity_transform(cfg.data)(sample.image)
    assert image.shape[0] == cfg.model.in_chans == cfg.data.channels
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    views = MultiCropTransform(cfg.crops, cfg.data.channels)(image, sample.region)
    assert len(views["global"]) == cfg.crops.n_global and len(views["local"]) == cfg.crops.n_local
    assert views["global"][0].shape == (cfg.model.in_chans, cfg.crops.global_size, cfg.crops.global_size)
    return views, cfg


@pytest.mark.parametrize("recipe", ["dino_x_ct_vits16", "dino_x_ct_vitl16"])
def test_dino_x_ct_recipes(tmp_path: Path, recipe: str) -> None:
    write_ct_series(tmp_path / "raw" / "p0", stored=ct_phantom(depth=4, rows=32, cols=32))
    prepare(tmp_path / "raw", tmp_path / "ct", PrepareOptions(progress=False, fractions={"train": 1.0}))
    _, cfg = _views(recipe, [f"data.root={tmp_path / 'ct'}"])
    assert cfg.data.slices == 3 and cfg.data.random_window_prob > 0


def test_chest_xray_recipe(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "cxr.h5", "w") as f:
        f.create_dataset("cxr", data=np.random.default_rng(0).random((3, 320, 320)).astype(np.float32) * 255)
    pd.DataFrame({"filename": ["a", "b", "c"], "impression": ["x", "y", "z"]}).to_csv(tmp_path / "r.csv", index=False)
    _views("chest_xray_vits16", [f"data.root={tmp_path / 'cxr.h5'}", f"data.hdf5_reports={tmp_path / 'r.csv'}"])


def test_pathology_recipe(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    img = render_level(256.0, 256.0, 0.5)
    tifffile.imwrite(tmp_path / "raw" / "s.tif", img, tile=(128, 128), photometric="rgb", metadata=None,
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    opts = PrepareOptions(progress=False, tile_size=224, tile_mpp=0.5, min_tissue=0.0, fractions={"train": 1.0})
    prepare(tmp_path / "raw", tmp_path / "tiles", opts)
    _, cfg = _views("pathology_vits14_0p5mpp", [f"data.root={tmp_path / 'tiles'}"])
    assert cfg.data.tile_mpp == 0.5
