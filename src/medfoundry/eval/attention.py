"""Attention and feature pictures: what the backbone looks at and how its patch features group.

Two pictures per image, both overlaid on the (intensity-mapped, resized) input:

* **class-token attention of the last block**, per head and averaged over heads, as in DINO
  (Caron et al. 2021, Fig. 1 and its attention visualisation): the softmax row of the class token
  over the patch tokens (register tokens dropped), one map on the patch grid per head, upsampled
  to the image and min-max scaled for display;
* **a 3-component PCA of the patch features** shown as RGB, as in DINOv2 (Oquab et al. 2023,
  Fig. 1): the final-norm patch tokens of all images of one call are pooled, centred, projected on
  their first three principal components, and each component is min-max scaled to [0, 1] over the
  pooled tokens (so colours are comparable across the images of the call).

PNGs are written with PIL and matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttentionResult:
    """Maps of one image on the patch grid (and the image they belong to)."""

    name: str  # file stem used for outputs
    image: np.ndarray  # (H, W) or (H, W, 3) display image in [0, 1]
    heads: np.ndarray  # (heads, gh, gw) class-token attention over patches (rows sum to <= 1 over all tokens)
    pca: np.ndarray | None = None  # (gh, gw, 3) PCA colours in [0, 1]

    @property
    def mean(self) -> np.ndarray:
        """Head-averaged class-token attention (gh, gw)."""
        return self.heads.mean(axis=0)


@torch.no_grad()
def class_token_attention(backbone: nn.Module, x: Tensor) -> np.ndarray:
    """(B, heads, gh, gw) last-block attention of the class token over the patch tokens."""
    attn, grid = backbone.last_attention(x)
    n_patch = grid[0] * grid[1]
    cls_row = attn[:, :, 0, -n_patch:]  # token order: class, registers, patches
    return cls_row.reshape(attn.shape[0], attn.shape[1], grid[0], grid[1]).float().cpu().numpy()


@torch.no_grad()
def patch_pca(backbone: nn.Module, x: Tensor, n_components: int = 3) -> np.ndarray:
    """(B, gh, gw, n_components) joint PCA of the images' patch features, each component scaled to [0, 1]."""
    out = backbone.forward_features(x)
    b, n, d = out.patch.shape
    tokens = out.patch.float().reshape(b * n, d)
    tokens = tokens - tokens.mean(dim=0, keepdim=True)
    k = min(n_components, d, tokens.shape[0])
    _, _, v = torch.linalg.svd(tokens, full_matrices=False)
    proj = tokens @ v[:k].T  # (b*n, k)
    if k < n_components:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], n_components - k)], dim=1)
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-8)
    return proj.reshape(b, out.grid[0], out.grid[1], n_components).cpu().numpy()


def compute_maps(backbone: nn.Module, inputs: Tensor, displays: Sequence[np.ndarray],
                 names: Sequence[str]) -> list[AttentionResult]:
    """Attention and PCA maps of a batch of preprocessed images (B, C, H, W)."""
    was_training = backbone.training
    backbone.eval()
    try:
        heads = class_token_attention(backbone, inputs)
        pca = patch_pca(backbone, inputs)
    finally:
        backbone.train(was_training)
    return [AttentionResult(n, d, h, p) for n, d, h, p in zip(names, displays, heads, pca)]


# ----------------------------------------------------------------------------------------------- drawing
def _upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    up = F.interpolate(t, size=size, mode="nearest")[0]
    return up[0].numpy() if grid_map.ndim == 2 else up.permute(1, 2, 0).numpy()


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.clip(image, 0, 1)
    return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]


def overlay_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55, cmap: str = "inferno") -> np.ndarray:
    """(H, W, 3) uint8: ``heat`` (grid map) min-max scaled, coloured with ``cmap``, blended over ``image``."""
    import matplotlib

    h, w = image.shape[:2]
    m = _upsample(heat, (h, w))
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
    colours = matplotlib.colormaps[cmap](m)[..., :3]
    out = (1 - alpha) * _as_rgb(image) + alpha * colours
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def overlay_rgb(image: np.ndarray, rgb_grid: np.ndarray, alpha: float = 0.65) -> np.ndarray:
    """(H, W, 3) uint8: an RGB grid map (e.g. PCA colours) blended over ``image``."""
    h, w = image.shape[:2]
    out = (1 - alpha) * _as_rgb(image) + alpha * _upsample(rgb_grid, (h, w))
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_panel(result: AttentionResult, path: Path, title: str = "", scale: int = 2) -> Path:
    """One PNG: the image, the mean attention, each head and the PCA picture side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tiles = [("image", (_as_rgb(result.image) * 255).astype(np.uint8)),
             ("mean attention", overlay_heatmap(result.image, result.mean))]
    tiles += [(f"head {i}", overlay_heatmap(result.image, h)) for i, h in enumerate(result.heads)]
    if result.pca is not None:
        tiles.append(("patch PCA", overlay_rgb(result.image, result.pca)))
    fig = Figure(figsize=(1.6 * scale * len(tiles) / 2, 1.9 * scale / 2 + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    for i, (label, arr) in enumerate(tiles):
        ax = fig.add_subplot(1, len(tiles), i + 1)
        ax.imshow(arr, interpolation="nearest")
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def save_result(result: AttentionResult, out_dir: Path, title: str = "") -> dict[str, Path]:
    """Write the per-head, mean and PCA overlays, the panel and the raw maps (``.npz``) of one image."""
    out_dir = Path(out_dir)
    files: dict[str, Path] = {}
    for i, h in enumerate(result.heads):
        files[f"head{i}"] = _save_png(overlay_heatmap(result.image, h), out_dir / f"{result.name}_head{i}.png")
    files["mean"] = _save_png(overlay_heatmap(result.image, result.mean), out_dir / f"{result.name}_mean.png")
    if result.pca is not None:
        files["pca"] = _save_png(overlay_rgb(result.image, result.pca), out_dir / f"{result.name}_pca.png")
    files["panel"] = save_panel(result, out_dir / f"{result.name}_panel.png", title or result.name)
    np.savez_compressed(out_dir / f"{result.name}_maps.npz", heads=result.heads,
                        pca=result.pca if result.pca is not None else np.zeros(0))
    files["maps"] = out_dir / f"{result.name}_maps.npz"
    return files


# ----------------------------------------------------------------------------------------------- from files
def load_inputs(paths: Sequence[str | Path], cfg: Any, img_size: int = 0) -> tuple[Tensor, list[np.ndarray], list[str]]:
    """Preprocess image files like the evaluation does; also return display images and unique output names."""
    from medfoundry.eval.eval_images import eval_transform_from_config, read_eval_image, resize_center_crop
    from medfoundry.eval.labelled_set import LabelledItem

    transform = eval_transform_from_config(cfg, img_size)
    inputs, displays, names, seen = [], [], [], {}
    for p in paths:
        image = read_eval_image(LabelledItem(str(p), ""), transform.slices, transform.slice_stride)
        shown = resize_center_crop(transform.map_intensity(image), transform.img_size)
        inputs.append(transform(image))
        disp = shown.permute(1, 2, 0).numpy()
        disp = disp[..., 0] if disp.shape[-1] == 1 else disp.mean(-1) if disp.shape[-1] != 3 else disp
        lo, hi = float(disp.min()), float(disp.max())
        displays.append((disp - lo) / max(hi - lo, 1e-12))
        stem = Path(p).name.split(".")[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return torch.stack(inputs), displays, names


def save_attention_maps(backbone: nn.Module, paths: Sequence[str | Path], out_dir: str | Path, cfg: Any,
                        img_size: int = 0, title: str = "") -> list[dict[str, Path]]:
    """Attention (per head + mean) and PCA pictures of image files, written to ``out_dir``; returns the files."""
    if not paths:
        return []
    inputs, displays, names = load_inputs(paths, cfg, img_size)
    device = next(backbone.parameters()).device
    results = compute_maps(backbone, inputs.to(device), displays, names)
    return [save_result(r, Path(out_dir), f"{title}: {r.name}" if title else r.name) for r in results]
