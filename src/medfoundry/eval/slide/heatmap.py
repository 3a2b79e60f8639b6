"""The attention of a slide aggregator over the slide's tiles, drawn on the slide's thumbnail.

Each kept tile is filled, at its position on the thumbnail, with the colour of its attention weight (gated
attention MIL, Ilse et al. 2018: the weights sum to 1 over the slide's tiles); tiles that were not kept (glass,
too little tissue, thinned out by ``max_tiles``) stay uncoloured. The colour scale runs from 0 to the largest
weight of that slide, with the colour bar marking the uniform weight 1/N that mean pooling would give every tile,
so a flat map reads as flat (every tile near 1/N) rather than being stretched to full contrast. Written with
matplotlib's Agg canvas (no display, no pyplot state), as :mod:`medfoundry.eval.attention` writes its panels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfoundry.data.readers import open_slide


def tile_weight_image(shape: tuple[int, int], coords: np.ndarray, extent0: float, scale: float,
                      weights: np.ndarray) -> np.ndarray:
    """A (H, W) float map of the thumbnail of ``shape`` holding each tile's weight over its footprint (NaN where no
    tile lies); ``coords`` are level-0 corners, ``extent0`` the tile side and ``scale`` level-0 pixels per thumbnail
    pixel."""
    h, w = shape
    out = np.full((h, w), np.nan, dtype=np.float64)
    for (x, y), value in zip(np.asarray(coords, dtype=np.float64), np.asarray(weights, dtype=np.float64)):
        c0, r0 = int(round(x / scale)), int(round(y / scale))
        c1, r1 = max(c0 + 1, int(round((x + extent0) / scale))), max(r0 + 1, int(round((y + extent0) / scale)))
        out[max(r0, 0) : min(r1, h), max(c0, 0) : min(c1, w)] = value
    return out


def save_attention_heatmap(
    slide_path: str | Path,
    coords: np.ndarray,
    extent0: float,
    weights: np.ndarray,
    out_path: str | Path,
    title: str = "",
    backend: str = "auto",
    slide_mpp: float | None = None,
    max_side: int = 1024,
) -> Path:
    """Write the PNG heat map of ``weights`` (one per tile, level-0 corners ``coords``, side ``extent0`` level-0
    pixels) over the thumbnail of ``slide_path`` to ``out_path`` (see the module docstring); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != len(coords) or len(weights) == 0:
        raise ValueError(f"{slide_path}: {len(weights)} attention weights for {len(coords)} tiles")
    with open_slide(slide_path, backend=backend, mpp=slide_mpp) as slide:
        thumb, scale = slide.thumbnail(max_side)
    grid = tile_weight_image(thumb.shape[:2], coords, extent0, scale, weights)
    top = float(weights.max()) or 1e-12
    h, w = thumb.shape[:2]
    fig = Figure(figsize=(min(8.0, 2.0 + 5.0 * w / max(h, w)), min(8.0, 1.2 + 5.0 * h / max(h, w))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(thumb, interpolation="nearest")
    heat = ax.imshow(np.ma.masked_invalid(grid), cmap="inferno", vmin=0.0, vmax=top, alpha=0.6,
                     interpolation="nearest")
    ax.axis("off")
    bar = fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
    uniform = 1.0 / len(weights)
    bar.ax.axhline(uniform, color="cyan", linewidth=1.2)
    bar.ax.tick_params(labelsize=6)
    bar.set_label(f"attention weight (sums to 1 over {len(weights)} tiles; cyan: uniform 1/N = {uniform:.3g})",
                  fontsize=6)
    ax.set_title(title or Path(slide_path).name, fontsize=7)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
