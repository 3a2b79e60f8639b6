"""Attention and feature pictures: what the backbone looks at and how its patch features group.

Two pictures per image, both overlaid on the image **the model receives**: the [0, 1] tensor after the run's
intensity mapping (HU window, range, ...), resize and centre crop, before normalisation, shown as it is
(grey on a fixed 0..1 scale, or RGB; a multi-channel input that is not RGB shows its first channel and says
so), never re-stretched per image, so a near-black input looks near-black here too:

* **class-token attention of the last block**, per head and averaged over heads, as in DINO
  (Caron et al. 2021, Fig. 1 and its attention visualisation): the softmax row of the class token
  over the patch tokens (register tokens dropped), one map on the patch grid per head, upsampled
  to the image. Every map panel has a colour bar, and maps that are compared side by side share one
  scale, from 0 to the largest attention weight among them: all heads and the mean of one image, and,
  with :func:`save_attention_comparison`, the same image under several backbones (pretrained vs random
  init). The figure's title names the scale and what shares it;
* **a 3-component PCA of the patch features** shown as RGB, as in DINOv2 (Oquab et al. 2023,
  Fig. 1): the final-norm patch tokens of all images of one call are pooled, centred, projected on
  their first three principal components, and each component is min-max scaled to [0, 1] over the
  pooled tokens (so colours are comparable across the images of the call).

With a mask per image (a label picture or volume of the image's size: non-zero is inside), its outline is
drawn on every panel. PNGs are written with PIL and matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUTLINE_RGB = (0, 255, 255)  # mask outlines (cyan: visible on grey images and on the inferno colour map)


@dataclass
class AttentionResult:
    """Maps of one image on the patch grid (and the image they belong to)."""

    name: str  # file stem used for outputs
    image: np.ndarray  # (H, W) or (H, W, 3): the model's [0, 1] input as it is (no per-image stretch)
    heads: np.ndarray  # (heads, gh, gw) class-token attention over patches (rows sum to <= 1 over all tokens)
    pca: np.ndarray | None = None  # (gh, gw, 3) PCA colours in [0, 1]
    mask: np.ndarray | None = None  # (H, W) bool region whose outline is drawn, same geometry as ``image``
    image_note: str = "model input"  # what ``image`` shows, for the panel's title

    @property
    def mean(self) -> np.ndarray:
        """Head-averaged class-token attention (gh, gw)."""
        return self.heads.mean(axis=0)

    @property
    def attention_max(self) -> float:
        """The largest attention weight of any head (the top of this image's shared colour scale)."""
        return float(self.heads.max()) if self.heads.size else 0.0


@dataclass
class PreparedInputs:
    """Images preprocessed for the backbone, with what the panels show of them."""

    inputs: Tensor  # (B, C, H, W) normalised model input
    images: list[np.ndarray]  # the [0, 1] input before normalisation, as displayed (H, W) or (H, W, 3)
    notes: list[str]  # what each displayed image is
    names: list[str]  # unique output stems
    masks: list[np.ndarray | None]  # (H, W) bool per image, or None


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


def compute_maps(backbone: nn.Module, inputs: Tensor, displays: Sequence[np.ndarray], names: Sequence[str],
                 masks: Sequence[np.ndarray | None] | None = None,
                 notes: Sequence[str] | None = None) -> list[AttentionResult]:
    """Attention and PCA maps of a batch of preprocessed images (B, C, H, W)."""
    was_training = backbone.training
    backbone.eval()
    try:
        heads = class_token_attention(backbone, inputs)
        pca = patch_pca(backbone, inputs)
    finally:
        backbone.train(was_training)
    masks = list(masks) if masks is not None else [None] * len(names)
    notes = list(notes) if notes is not None else ["model input"] * len(names)
    return [AttentionResult(n, d, h, p, m, note)
            for n, d, h, p, m, note in zip(names, displays, heads, pca, masks, notes)]


# ----------------------------------------------------------------------------------------------- drawing
def _upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    up = F.interpolate(t, size=size, mode="nearest")[0]
    return up[0].numpy() if grid_map.ndim == 2 else up.permute(1, 2, 0).numpy()


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.clip(image, 0, 1)
    return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of ``mask`` that have a 4-neighbour outside it (its one-pixel outline)."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1, mode="constant", constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return m & ~interior


def _with_outline(rgb: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return rgb
    out = rgb.copy()
    out[mask_outline(mask)] = OUTLINE_RGB
    return out


def overlay_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55, cmap: str = "inferno",
                    vmax: float | None = None) -> np.ndarray:
    """(H, W, 3) uint8: ``heat`` (grid map) coloured with ``cmap`` on the scale 0..``vmax``, blended over ``image``.

    Without ``vmax`` the map is min-max scaled on its own (not comparable with any other map).
    """
    import matplotlib

    h, w = image.shape[:2]
    m = _upsample(heat, (h, w))
    if vmax is None:
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
    else:
        m = np.clip(m / max(float(vmax), 1e-12), 0.0, 1.0)
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


def _show_image(ax: Any, image: np.ndarray) -> Any:
    """The [0, 1] input on a fixed 0..1 scale (grey) or as RGB; returns the grey image's artist (None for RGB)."""
    if image.ndim == 2:
        return ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.imshow(np.clip(image[..., :3], 0, 1), interpolation="nearest")
    return None


def _outline(ax: Any, mask: np.ndarray | None) -> None:
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=["cyan"], linewidths=0.8)


def save_panel(result: AttentionResult, path: Path, title: str = "", scale: int = 2, vmax: float | None = None,
               shared_by: str = "all heads and the mean of this image") -> Path:
    """One PNG: the model's input, the mean attention, each head and the PCA picture side by side
    (:func:`panel_figure`)."""
    fig = panel_figure(result, title, scale, vmax, shared_by)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def panel_figure(result: AttentionResult, title: str = "", scale: int = 2, vmax: float | None = None,
                 shared_by: str = "all heads and the mean of this image") -> Any:
    """The panel as a matplotlib ``Figure`` (Agg canvas): input, mean attention, each head, PCA.

    Every attention panel has a colour bar on the common scale 0..``vmax`` (default: the largest weight of this
    image's heads); the title names the scale and ``shared_by`` (which maps share it). A grey input has a
    0..1 colour bar too (its values are the model's, not stretched). The mask outline, if any, is drawn on
    every panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = float(result.attention_max if vmax is None else vmax) or 1e-12
    h, w = result.image.shape[:2]
    maps = [("mean attention", result.mean)] + [(f"head {i}", m) for i, m in enumerate(result.heads)]
    n = 1 + len(maps) + (result.pca is not None)
    fig = Figure(figsize=(1.9 * scale * n / 2, 1.9 * scale / 2 + 0.7), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    grey = _show_image(axes[0], result.image)
    axes[0].set_title(result.image_note, fontsize=6)
    if grey is not None:
        bar = fig.colorbar(grey, ax=axes[0], fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=5)
    for ax, (label, grid_map) in zip(axes[1 : 1 + len(maps)], maps):
        _show_image(ax, result.image)
        heat = ax.imshow(_upsample(grid_map, (h, w)), cmap="inferno", vmin=0.0, vmax=top, alpha=0.55,
                         interpolation="nearest")
        bar = fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=5)
        ax.set_title(label, fontsize=7)
    if result.pca is not None:
        axes[-1].imshow(overlay_rgb(result.image, result.pca), interpolation="nearest")
        axes[-1].set_title("patch PCA (RGB = PC 1-3)", fontsize=7)
    for ax in axes:
        _outline(ax, result.mask)
        ax.axis("off")
    scale_text = f"attention colour scale 0-{top:.3g} (softmax weight), shared by {shared_by}"
    fig.suptitle(f"{title}\n{scale_text}" if title else scale_text, fontsize=7)
    fig.tight_layout()
    return fig


def save_result(result: AttentionResult, out_dir: Path, title: str = "", vmax: float | None = None,
                shared_by: str = "all heads and the mean of this image") -> dict[str, Path]:
    """Write the per-head, mean and PCA overlays, the panel and the raw maps (``.npz``) of one image.

    The overlays use the panel's colour scale 0..``vmax`` (default: the largest weight of this image's heads).
    """
    out_dir = Path(out_dir)
    top = result.attention_max if vmax is None else vmax
    files: dict[str, Path] = {}
    for i, h in enumerate(result.heads):
        files[f"head{i}"] = _save_png(_with_outline(overlay_heatmap(result.image, h, vmax=top), result.mask),
                                      out_dir / f"{result.name}_head{i}.png")
    files["mean"] = _save_png(_with_outline(overlay_heatmap(result.image, result.mean, vmax=top), result.mask),
                              out_dir / f"{result.name}_mean.png")
    if result.pca is not None:
        files["pca"] = _save_png(_with_outline(overlay_rgb(result.image, result.pca), result.mask),
                                 out_dir / f"{result.name}_pca.png")
    files["panel"] = save_panel(result, out_dir / f"{result.name}_panel.png", title or result.name, vmax=top,
                                shared_by=shared_by)
    np.savez_compressed(out_dir / f"{result.name}_maps.npz", heads=result.heads,
                        pca=result.pca if result.pca is not None else np.zeros(0), vmax=np.float32(top),
                        image=np.asarray(result.image, dtype=np.float32),
                        mask=result.mask if result.mask is not None else np.zeros(0, dtype=bool))
    files["maps"] = out_dir / f"{result.name}_maps.npz"
    return files


# ----------------------------------------------------------------------------------------------- from files
def display_input(shown: Tensor, source_channels: int) -> tuple[np.ndarray, str]:
    """What to show of a [0, 1] model input (C, H, W): grey, RGB, or its first channel; and a title saying which.

    Nothing is rescaled: the values are the model's.
    """
    arr = shown.detach().float().cpu().numpy()
    c = arr.shape[0]
    if c == 1 or bool(np.all(arr == arr[:1])):
        return arr[0], "model input, 0-1 (grey)"
    if c == 3 and source_channels == 3:
        return np.moveaxis(arr, 0, -1), "model input, 0-1 (RGB)"
    return arr[0], f"model input, 0-1 (channel 0 of {c})"


def load_mask(path: str | Path, image_hw: tuple[int, int], img_size: int) -> np.ndarray:
    """A mask file -> (img_size, img_size) bool, cropped and resized exactly like its image.

    Pictures (PNG/TIFF/...) are read as stored (non-zero = inside, any channel); volumes (NIfTI, NRRD, DICOM)
    give their middle slice, as the image's middle slice is shown. Its size must be the image's.
    """
    from medfoundry.data.readers.base import ReaderError
    from medfoundry.data.readers.slices import read_stored
    from medfoundry.eval.eval_images import resize_center_crop
    from medfoundry.eval.labelled_set import IMAGE_SUFFIXES

    p = Path(path)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        stored = read_stored(p)[0]
        inside = (stored.reshape(stored.shape[0], stored.shape[1], -1) != 0).any(axis=-1)
    else:
        from medfoundry.data.readers import read_volume

        vol = read_volume(p)
        inside = np.asarray(vol.array[vol.depth // 2] != 0)
        if inside.ndim == 3:
            inside = inside.any(axis=-1)
    if tuple(inside.shape) != tuple(image_hw):
        raise ReaderError(f"{p}: mask is {inside.shape[0]}x{inside.shape[1]} px but its image is "
                          f"{image_hw[0]}x{image_hw[1]} px; give a mask of the image's size")
    t = torch.from_numpy(inside.astype(np.float32))[None]
    return resize_center_crop(t, img_size)[0].numpy() >= 0.5


def load_inputs(paths: Sequence[str | Path], cfg: Any, img_size: int = 0,
                masks: Sequence[str | Path | None] | None = None) -> PreparedInputs:
    """Preprocess image files like the evaluation does; also what the panels show of them and their masks.

    ``masks`` (optional): one mask file or None per image (see :func:`load_mask`).
    """
    from medfoundry.eval.eval_images import eval_transform_from_config, resize_center_crop
    from medfoundry.eval.labelled_set import LabelledItem

    if masks is not None and len(masks) != len(paths):
        raise ValueError(f"{len(masks)} masks for {len(paths)} images; give one mask (or None) per image")
    transform = eval_transform_from_config(cfg, img_size)
    inputs, images, notes, names, loaded_masks, seen = [], [], [], [], [], {}
    for i, p in enumerate(paths):
        image = transform.read(LabelledItem(str(p), ""))
        shown = resize_center_crop(transform.map_intensity(image), transform.img_size)  # [0, 1], unnormalised
        inputs.append(transform(image))
        display, note = display_input(shown, image.shape[0])
        images.append(display)
        notes.append(note)
        mask = masks[i] if masks is not None else None
        loaded_masks.append(load_mask(mask, tuple(image.shape[1:]), transform.img_size) if mask else None)
        stem = Path(p).name.split(".")[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return PreparedInputs(torch.stack(inputs), images, notes, names, loaded_masks)


def maps_of(backbone: nn.Module, prepared: PreparedInputs) -> list[AttentionResult]:
    """The maps of prepared images on the backbone's device (also what the localisation scores read)."""
    device = next(backbone.parameters()).device
    return compute_maps(backbone, prepared.inputs.to(device), prepared.images, prepared.names, prepared.masks,
                        prepared.notes)


def save_attention_maps(backbone: nn.Module, paths: Sequence[str | Path], out_dir: str | Path, cfg: Any,
                        img_size: int = 0, title: str = "",
                        masks: Sequence[str | Path | None] | None = None) -> list[dict[str, Path]]:
    """Attention (per head + mean) and PCA pictures of image files, written to ``out_dir``; returns the files.

    The heads and the mean of one image share one colour scale; ``masks`` (one file or None per image) adds
    outlines.
    """
    if not paths:
        return []
    prepared = load_inputs(paths, cfg, img_size, masks)
    results = maps_of(backbone, prepared)
    return [save_result(r, Path(out_dir), f"{title}: {r.name}" if title else r.name) for r in results]


def save_attention_comparison(backbones: Mapping[str, tuple[nn.Module, str]], paths: Sequence[str | Path],
                              out_root: str | Path, cfg: Any, img_size: int = 0,
                              masks: Sequence[str | Path | None] | None = None) -> dict[str, list[dict[str, Path]]]:
    """The pictures of the same images under several backbones (``{folder: (backbone, title)}``, e.g.
    ``{"pretrained": ..., "random_init": ...}``), written to ``out_root/<folder>/``.

    The maps of one image share one colour scale across all the backbones and heads (0 to the largest weight
    among them), so a flat random-init map looks flat next to a peaked pretrained one; the titles say so.
    """
    if not paths:
        return {name: [] for name in backbones}
    prepared = load_inputs(paths, cfg, img_size, masks)
    results = {name: maps_of(bb, prepared) for name, (bb, _) in backbones.items()}
    tops = [max(rs[i].attention_max for rs in results.values()) for i in range(len(prepared.names))]
    shared_by = f"{' and '.join(backbones)} (all heads and the mean) for this image"
    out: dict[str, list[dict[str, Path]]] = {}
    for name, (_, title) in backbones.items():
        out[name] = [save_result(r, Path(out_root) / name, f"{title}: {r.name}" if title else r.name, vmax=top,
                                 shared_by=shared_by)
                     for r, top in zip(results[name], tops)]
    return out
