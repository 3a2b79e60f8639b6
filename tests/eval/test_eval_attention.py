"""Attention pictures show the model's actual [0, 1] input, colour bars on a named common scale, and mask outlines.

Images are real PNGs (PIL, value mapping recorded), backbones real tiny timm ViTs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from medfoundry.config import ModelConfig
from medfoundry.config.data import DataConfig
from medfoundry.config.schema import CropsConfig
from medfoundry.data.readers.base import ReaderError
from medfoundry.data.readers.slices import FULL_RANGE_UINT16, HU_UINT16, write_slice, write_stored
from medfoundry.eval.attention import (
    OUTLINE_RGB,
    AttentionResult,
    load_inputs,
    mask_outline,
    overlay_heatmap,
    panel_figure,
    save_attention_comparison,
    save_attention_maps,
)
from medfoundry.eval.sections import FrozenEvalSections
from medfoundry.models.registry import create_backbone

SIZE = 32
YY, XX = np.mgrid[0:SIZE, 0:SIZE]
DISC = ((YY - 16) ** 2 + (XX - 14) ** 2) < 49


def _backbone(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone(ModelConfig(name="vit_tiny_patch8", img_size=SIZE, in_chans=1)).eval()


def _sections(**data) -> FrozenEvalSections:
    return FrozenEvalSections(data=DataConfig(channels=1, **data),
                              crops=CropsConfig(global_size=SIZE, mean=[0.5], std=[0.25]))


@pytest.fixture()
def dark_png(tmp_path: Path) -> Path:
    """A dim picture (values 0.05..0.25): stretching it for display would hide what the model sees."""
    img = 0.05 + 0.05 * XX / SIZE + 0.15 * DISC
    path = tmp_path / "dark.png"
    write_stored(path, (img * 65535).round().astype(np.uint16), FULL_RANGE_UINT16)
    return path


def test_the_image_panel_is_the_models_input_not_restretched(dark_png: Path) -> None:
    prepared = load_inputs([dark_png], _sections())
    shown = prepared.images[0]
    want = (np.round((0.05 + 0.05 * XX / SIZE + 0.15 * DISC) * 65535) / 65535).astype(np.float32)
    np.testing.assert_allclose(shown, want, atol=1e-6)  # same size: resize/crop is the identity here
    assert float(shown.max()) < 0.26 and float(shown.min()) > 0.04  # not min-max stretched to 0..1
    # and it is what the network gets, up to the normalisation
    np.testing.assert_allclose(prepared.inputs[0, 0].numpy() * 0.25 + 0.5, shown, atol=1e-6)
    assert prepared.notes[0] == "model input, 0-1 (grey)"


def test_hu_pictures_are_shown_after_the_window(tmp_path: Path) -> None:
    hu = np.where(DISC, 40.0, -1000.0).astype(np.float32)
    write_slice(tmp_path / "ct.png", hu, HU_UINT16)
    prepared = load_inputs([tmp_path / "ct.png"], _sections(intensity="window", windows=["lung"]))
    want = np.clip((hu + 1350) / 1500, 0, 1)
    np.testing.assert_allclose(prepared.images[0], want, atol=1e-6)


def test_heads_share_one_scale_and_every_map_has_a_colour_bar(dark_png: Path) -> None:
    heads = np.stack([np.full((4, 4), 0.01), np.full((4, 4), 0.04)]).astype(np.float32)
    heads[1, 0, 0] = 0.2
    result = AttentionResult("x", np.full((SIZE, SIZE), 0.3, np.float32), heads)
    fig = panel_figure(result, "title")
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 + 1 + len(heads)  # input (0..1) + mean + every head
    limits = {tuple(np.round(ax.get_ylim(), 6)) for ax in bars[1:]}
    assert limits == {(0.0, 0.2)}  # one scale: 0 to the largest weight of any head
    assert "0-0.2" in fig._suptitle.get_text() and "shared by all heads" in fig._suptitle.get_text()


def test_overlays_use_the_given_scale_instead_of_stretching_each_map() -> None:
    image = np.zeros((8, 8), np.float32)
    flat = np.full((2, 2), 0.05, np.float32)
    out = overlay_heatmap(image, flat, alpha=1.0, vmax=0.1)
    want = (np.asarray(matplotlib.colormaps["inferno"](0.5)[:3]) * 255).round()
    assert np.all(np.abs(out.reshape(-1, 3) - want) <= 1)  # a flat map at half the scale is the half colour


def test_comparison_shares_the_scale_across_backbones(dark_png: Path, tmp_path: Path) -> None:
    files = save_attention_comparison({"pretrained": (_backbone(0), "trained"), "random_init": (_backbone(1), "rnd")},
                                      [dark_png], tmp_path / "attention", _sections())
    assert set(files) == {"pretrained", "random_init"}
    maps = {k: np.load(v[0]["maps"]) for k, v in files.items()}
    top = max(float(m["heads"].max()) for m in maps.values())
    assert all(float(m["vmax"]) == pytest.approx(top) for m in maps.values())
    assert all(v[0]["panel"].is_file() for v in files.values())
    alone = save_attention_maps(_backbone(1), [dark_png], tmp_path / "alone", _sections())
    own = np.load(alone[0]["maps"])
    assert float(own["vmax"]) == pytest.approx(float(own["heads"].max()))


def test_mask_outlines_are_drawn_on_the_overlays(dark_png: Path, tmp_path: Path) -> None:
    Image.fromarray((DISC * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    files = save_attention_maps(_backbone(0), [dark_png], tmp_path / "out", _sections(), masks=[tmp_path / "mask.png"])
    saved = np.load(files[0]["maps"])
    assert np.array_equal(saved["mask"], DISC)
    edge = mask_outline(DISC)
    assert edge.sum() > 0 and not (edge & ~DISC).any()
    for key in ("mean", "head0", "pca"):
        with Image.open(files[0][key]) as im:
            rgb = np.asarray(im.convert("RGB"))
        assert np.all(rgb[edge] == OUTLINE_RGB), key
        assert not np.any(np.all(rgb[~DISC] == OUTLINE_RGB, axis=-1)), key
    with pytest.raises(ReaderError, match="mask is 10x10 px but its image is 32x32"):
        Image.fromarray(np.ones((10, 10), np.uint8)).save(tmp_path / "small.png")
        load_inputs([dark_png], _sections(), masks=[tmp_path / "small.png"])
