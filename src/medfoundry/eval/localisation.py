"""Localisation scores: how well an attention map points at a segmented structure (e.g. a tumour mask).

A map on the patch grid (``(gh, gw)``: here the last block's class-token attention averaged over heads,
:func:`medfoundry.eval.attention.class_token_attention`, as DINO shows it) is compared with a binary mask of
the model's input (``(H, W)``, cropped and resized exactly like the image). The map is **upsampled to the
mask's size bilinearly** (``align_corners=False``; the mask is never downsampled), then scored three ways:

* **pointing game** (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016 / IJCV 2018):
  a hit when the map's maximum lies inside the mask. ``pointing`` uses no tolerance (the maximum pixel must be a
  mask pixel); ``pointing_tol`` counts a hit within ``tolerance_px`` of the mask (Euclidean distance; default one
  patch side, the map's own resolution; Zhang et al. use 15 px on full-size images). When several pixels share
  the maximum (a constant map) the score is the expected hit of picking one of them at random, i.e. the fraction
  of tied maxima that hit: a uniform map scores the mask's area fraction, the chance level;
* **IoU** of a region of the map with the mask: ``iou_top_area`` takes the map's highest pixels, as many as the
  mask has (every pixel tied with the last one included), so the region has the mask's area and the score needs
  no threshold; ``iou_t50`` takes the pixels at or above 0.5 after min-max normalising the map per image (a
  constant map gives an empty region, IoU 0);
* **pixel AUC**: ``sklearn.metrics.roc_auc_score`` of the map's values against the mask's pixels (1 = every mask
  pixel outscores every background pixel, 0.5 = no better than a constant map).

Images with an empty mask (after the resize) are skipped and counted (``n_skipped_empty``); an AUC is undefined
(and skipped in its mean) when the mask covers the whole input. Means over images carry percentile-bootstrap 95 %
intervals over images (:func:`medfoundry.eval.metrics.bootstrap_ci`); slices of one patient are not independent,
so with few patients the interval understates the spread between patients.

Two reference maps give the scores a floor: :func:`centre_prior` (a centred Gaussian) and :func:`uniform_map`
(pointing = mask area fraction, AUC 0.5).

The ``localisation`` evaluation task (:func:`run_task`, ``needs="masks"``) reads a manifest with ``path`` (image)
and ``mask`` columns (relative to the manifest's folder) named by ``eval.data`` (``medfoundry eval RUN --task
localisation --data masks.csv``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfoundry.eval.metrics import bootstrap_ci

if TYPE_CHECKING:
    from torch import nn

    from medfoundry.eval.registry import EvalInputs

__all__ = ["SCORES", "LocalisationScores", "backbone_scores", "centre_prior", "map_auc", "paired_difference",
           "pointing_game", "read_mask_manifest", "run_task", "score_map", "score_maps", "threshold_iou",
           "top_area_iou", "uniform_map", "upsample_map"]

#: The per-image scores, in table order.
SCORES = ("pointing", "pointing_tol", "iou_top_area", "iou_t50", "auc")
PREFIX = "localisation"


def upsample_map(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float64: a patch-grid map ``(gh, gw)`` resized bilinearly (``align_corners=False``) to ``size``.

    Bilinear rather than nearest, so the maximum sits at the centre of the peak patch and the AUC is not made of
    patch-sized ties; the attention pictures (docs/evaluation.md) draw the same maps without smoothing.
    """
    import torch
    import torch.nn.functional as F

    g = np.asarray(grid_map, dtype=np.float32)
    if g.ndim != 2:
        raise ValueError(f"a localisation map must be 2-D (gh, gw), got shape {g.shape}")
    if tuple(g.shape) == tuple(size):
        return g.astype(np.float64)
    t = torch.from_numpy(np.ascontiguousarray(g))[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].double().numpy()


def _check(heat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(heat, dtype=np.float64)
    m = np.asarray(mask).astype(bool)
    if h.shape != m.shape or h.ndim != 2:
        raise ValueError(f"map {h.shape} and mask {m.shape} must be 2-D and of one size; upsample the map first "
                         "(upsample_map)")
    if not np.isfinite(h).all():
        raise ValueError("the map holds NaN or infinite values")
    return h, m


def pointing_game(heat: np.ndarray, mask: np.ndarray, tolerance_px: float = 0.0) -> float:
    """Pointing-game hit (Zhang et al. 2016/2018) of a map ``(H, W)`` on a mask ``(H, W)``, in [0, 1].

    1 when the maximum pixel is inside the mask or within ``tolerance_px`` of it (Euclidean distance to the
    nearest mask pixel), else 0; with tied maxima, the fraction of them that hit (the expected hit of breaking the
    tie at random). NaN for an empty mask.
    """
    from scipy.ndimage import distance_transform_edt

    h, m = _check(heat, mask)
    if not m.any():
        return float("nan")
    top = h == h.max()
    if tolerance_px > 0:
        near = distance_transform_edt(~m) <= float(tolerance_px)
    else:
        near = m
    return float(near[top].mean())


def _iou(region: np.ndarray, mask: np.ndarray) -> float:
    union = int((region | mask).sum())
    return float((region & mask).sum() / union) if union else float("nan")


def top_area_iou(heat: np.ndarray, mask: np.ndarray) -> float:
    """IoU with the mask of the map's top region of the mask's area: the ``k`` highest pixels, ``k`` = mask pixels,
    plus any pixel tied with the ``k``-th (so a constant map selects everything). NaN for an empty mask."""
    h, m = _check(heat, mask)
    k = int(m.sum())
    if k == 0:
        return float("nan")
    kth = np.partition(h.ravel(), h.size - k)[h.size - k]
    return _iou(h >= kth, m)


def threshold_iou(heat: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU with the mask of ``map >= threshold`` after min-max normalising the map to [0, 1] (a constant map:
    empty region, IoU 0). NaN for an empty mask."""
    h, m = _check(heat, mask)
    if not m.any():
        return float("nan")
    lo, hi = float(h.min()), float(h.max())
    region = (h - lo) / (hi - lo) >= threshold if hi > lo else np.zeros_like(m)
    return _iou(region, m)


def map_auc(heat: np.ndarray, mask: np.ndarray) -> float:
    """Pixel-level ROC AUC of the map's values as a score for "inside the mask" (``sklearn roc_auc_score``);
    NaN when the mask is empty or covers every pixel."""
    from sklearn.metrics import roc_auc_score

    h, m = _check(heat, mask)
    if m.all() or not m.any():
        return float("nan")
    return float(roc_auc_score(m.ravel(), h.ravel()))


def score_map(grid_map: np.ndarray, mask: np.ndarray, tolerance_px: float | None = None,
              threshold: float = 0.5) -> dict[str, float]:
    """Every score (:data:`SCORES`) of one patch-grid map against one mask ``(H, W)``, after
    :func:`upsample_map`; ``tolerance_px`` of ``pointing_tol`` defaults to one patch side (``H / gh``).
    Also ``mask_fraction`` (the pointing game's chance level) and ``tolerance_px``."""
    m = np.asarray(mask).astype(bool)
    heat = upsample_map(grid_map, m.shape)
    tol = float(m.shape[0] / np.asarray(grid_map).shape[0]) if tolerance_px is None else float(tolerance_px)
    return {"pointing": pointing_game(heat, m), "pointing_tol": pointing_game(heat, m, tol),
            "iou_top_area": top_area_iou(heat, m), "iou_t50": threshold_iou(heat, m, threshold),
            "auc": map_auc(heat, m), "mask_fraction": float(m.mean()), "tolerance_px": tol}


@dataclass
class LocalisationScores:
    """Per-image scores, their means with bootstrap intervals, and the images left out."""

    per_image: list[dict[str, Any]] = field(default_factory=list)  # {"name", each score, "mask_fraction", ...}
    summary: dict[str, float] = field(default_factory=dict)  # score, score_ci_low, score_ci_high, n_images, ...
    skipped_empty: list[str] = field(default_factory=list)  # names of images whose mask was empty

    def metrics(self, prefix: str = PREFIX) -> dict[str, float]:
        """The summary as flat ``{prefix}_{name}: float`` (the eval task's and the CLI's metric names)."""
        return {f"{prefix}_{k}": float(v) for k, v in self.summary.items()}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``summary``, ``per_image``, ``skipped_empty``)."""
        return {"summary": self.summary, "per_image": self.per_image, "skipped_empty": self.skipped_empty}


def _mean_ci(values: np.ndarray, n_bootstrap: int, seed: int) -> tuple[float, float, float]:
    """Mean of the finite values and its percentile-bootstrap 95 % interval over images."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    return bootstrap_ci(np.zeros(v.size, dtype=np.int64), v, lambda _y, s: float(np.mean(s)), n_bootstrap,
                        seed=seed, min_classes=1)


def score_maps(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], names: Sequence[str] | None = None,
               n_bootstrap: int = 1000, seed: int = 0, tolerance_px: float | None = None,
               threshold: float = 0.5) -> LocalisationScores:
    """:func:`score_map` of each (map, mask) pair, then the mean of each score over images with a bootstrap 95 %
    interval (``n_bootstrap`` resamples of the images, ``seed``). Images whose mask is missing (None) or empty are
    skipped and counted: ``n_images`` scored, ``n_skipped_empty``; ``n_auc_undefined`` counts full masks."""
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps for {len(masks)} masks; give one mask per map")
    names = list(names) if names is not None else [f"image_{i}" for i in range(len(maps))]
    out = LocalisationScores()
    for name, grid_map, mask in zip(names, maps, masks):
        if mask is None or not np.asarray(mask).any():
            out.skipped_empty.append(name)
            continue
        out.per_image.append({"name": name, **score_map(grid_map, mask, tolerance_px, threshold)})
    summary: dict[str, float] = {}
    for key in SCORES:
        values = np.asarray([r[key] for r in out.per_image], dtype=np.float64)
        summary[key], summary[f"{key}_ci_low"], summary[f"{key}_ci_high"] = _mean_ci(values, n_bootstrap, seed)
    fractions = [r["mask_fraction"] for r in out.per_image]
    summary["mask_fraction"] = float(np.mean(fractions)) if fractions else float("nan")
    summary["tolerance_px"] = float(np.mean([r["tolerance_px"] for r in out.per_image])) if fractions else float("nan")
    summary["n_images"] = float(len(out.per_image))
    summary["n_skipped_empty"] = float(len(out.skipped_empty))
    summary["n_auc_undefined"] = float(sum(not np.isfinite(r["auc"]) for r in out.per_image))
    out.summary = summary
    return out


def paired_difference(a: LocalisationScores, b: LocalisationScores, n_bootstrap: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """Mean per-image difference ``a - b`` of each score over the images both scored (matched by name), with a
    percentile-bootstrap 95 % interval over images: the paired comparison of two backbones on the same masks,
    tighter than comparing two separate intervals."""
    rows_b = {r["name"]: r for r in b.per_image}
    pairs = [(r, rows_b[r["name"]]) for r in a.per_image if r["name"] in rows_b]
    out: dict[str, float] = {"n_images": float(len(pairs))}
    for key in SCORES:
        diff = np.asarray([ra[key] - rb[key] for ra, rb in pairs], dtype=np.float64)
        out[key], out[f"{key}_ci_low"], out[f"{key}_ci_high"] = _mean_ci(diff, n_bootstrap, seed)
    return out


# ----------------------------------------------------------------------------------------------- reference maps
def centre_prior(grid: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """(gh, gw) centred Gaussian, standard deviation ``sigma`` times each side: the "objects are near the middle"
    baseline every image gets alike."""
    gh, gw = grid
    y = (np.arange(gh) + 0.5) / gh - 0.5
    x = (np.arange(gw) + 0.5) / gw - 0.5
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2.0 * sigma**2)).astype(np.float32)


def uniform_map(grid: tuple[int, int]) -> np.ndarray:
    """(gh, gw) constant map: pointing = the mask's area fraction, IoU top-area = area fraction, AUC 0.5."""
    return np.ones(grid, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- the eval task
def read_mask_manifest(path: str | Path) -> tuple[list[str], list[str | None], list[str]]:
    """``(image paths, mask paths or None, patient ids)`` of a manifest with ``path`` and ``mask`` columns and
    optionally ``patient`` / ``patient_id`` (CSV/TSV/Parquet, paths relative to its folder;
    :func:`medfoundry.data.manifest.read_manifest`). ``FileNotFoundError`` naming a listed file that is missing."""
    from medfoundry.data.manifest import read_manifest

    df = read_manifest(path)
    if "mask" not in df.columns:
        raise ValueError(f"{path}: the localisation task needs a 'mask' column (a mask file per image, non-zero = "
                         f"inside); columns: {list(df.columns)}")
    if "slice" in df.columns and df["slice"].notna().any():
        raise ValueError(f"{path}: a 'slice' column is not supported by the localisation task; write the slices and "
                         "their masks as pictures (PNG) and list those")
    masks = [m if isinstance(m, str) and m else None for m in df["mask"]]
    missing = [f for f in [*df["path"], *(m for m in masks if m)] if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}; fix the "
                                "paths (relative paths are read from the manifest's folder)")
    patients = df["patient"] if "patient" in df.columns else df["patient_id"]  # patient_id falls back to the path
    return [str(p) for p in df["path"]], masks, [str(p) for p in patients]


def backbone_scores(backbone: nn.Module, paths: Sequence[str], masks: Sequence[str | None], sections: Any,
                    img_size: int = 0, batch_size: int = 64, n_bootstrap: int = 1000,
                    seed: int = 0) -> tuple[LocalisationScores, tuple[int, int]]:
    """Class-token attention (mean over heads) of ``backbone`` on each image, scored against its mask file;
    images are read and preprocessed like :func:`medfoundry.eval.attention.load_inputs` (the evaluation's
    preprocessing), masks cropped and resized with them. Returns the scores and the patch grid."""
    from medfoundry.eval.attention import load_inputs, maps_of

    grid_maps: list[np.ndarray] = []
    loaded_masks: list[np.ndarray | None] = []
    names: list[str] = []
    grid = (0, 0)
    for start in range(0, len(paths), max(1, batch_size)):
        chunk = slice(start, start + max(1, batch_size))
        prepared = load_inputs(list(paths[chunk]), sections, img_size, list(masks[chunk]))
        for r in maps_of(backbone, prepared):
            grid_maps.append(r.mean)
            loaded_masks.append(r.mask)
            names.append(r.name)
            grid = tuple(r.mean.shape)  # type: ignore[assignment]
    return score_maps(grid_maps, loaded_masks, names, n_bootstrap, seed), grid


def run_task(inputs: EvalInputs) -> dict[str, float]:
    """``localisation``: :func:`score_maps` of the backbone's class-token attention on the images and masks of the
    manifest ``eval.data`` (``path`` + ``mask`` columns), ``localisation_*`` metrics with ``_ci_low``/``_ci_high``."""
    assert inputs.backbone is not None and inputs.sections is not None
    manifest = inputs.sections.eval.data
    if not manifest:
        raise ValueError("the localisation task needs a manifest with 'path' and 'mask' columns: pass --data "
                         "MANIFEST (or set eval.data)")
    paths, masks, _ = read_mask_manifest(manifest)
    if not paths:
        raise ValueError(f"{manifest}: no rows; list images and their masks")
    s = inputs.settings
    scores, _ = backbone_scores(inputs.backbone, paths, masks, inputs.sections, 0, s.batch_size, s.n_bootstrap,
                                s.seed)
    if not scores.per_image:
        raise ValueError(f"{manifest}: every mask is empty or missing after the resize; nothing to score")
    return scores.metrics()
