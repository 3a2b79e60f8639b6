"""Small labelled image sets in real formats for evaluation tests (importable from any test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfoundry.data.readers.slices import FULL_RANGE_UINT16, write_stored


def make_labelled_pngs(root: Path, n: int = 16, size: int = 48) -> Path:
    """Two classes of grey 16-bit PNGs (a bright disc or not) in label folders."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        label = "disc" if i % 2 else "plain"
        img = 0.15 + 0.3 * (xx / size) + 0.05 * rng.standard_normal((size, size))
        if label == "disc":
            cy, cx, r = rng.integers(14, 34), rng.integers(14, 34), rng.integers(6, 12)
            img += 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2)
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        write_stored(d / f"img{i:02d}.png", (np.clip(img, 0, 1) * 65535).astype(np.uint16), FULL_RANGE_UINT16)
    return root


def write_grey_pngs(root: Path) -> Path:
    """Twelve seeded 16-bit grey PNGs (gradients and discs), the same on every machine."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:80, 0:96]
    for i in range(12):
        sub = root / f"series_{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        cy, cx, r = rng.integers(20, 60), rng.integers(20, 76), rng.integers(8, 20)
        img = 0.3 * (xx / 96) + 0.6 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2) + 0.05 * rng.standard_normal((80, 96))
        write_stored(sub / f"slice_{i:02d}.png", (np.clip(img, 0, 1) * 65535).astype(np.uint16), FULL_RANGE_UINT16)
    return root


def write_disc_masks(image_folder: Path, out: Path, threshold: float = 0.6) -> Path:
    """Masks drawn from the images themselves (stored value above ``threshold`` of full range: the bright disc of
    :func:`write_grey_pngs`), as 8-bit PNGs under ``out/masks``, and ``out/masks.csv`` (``path``, ``mask`` relative
    to it, ``patient`` = the image's folder) for the localisation task."""
    import pandas as pd
    from PIL import Image

    from medfoundry.data.readers.slices import read_stored

    rows = []
    for i, png in enumerate(sorted(image_folder.rglob("*.png"))):
        stored = read_stored(png)[0].astype(np.float64) / 65535.0
        mask_path = out / "masks" / f"mask_{i:02d}.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((stored > threshold) * 255).astype(np.uint8)).save(mask_path)
        rows.append({"path": str(png), "mask": f"masks/{mask_path.name}", "patient": png.parent.name})
    manifest = out / "masks.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
