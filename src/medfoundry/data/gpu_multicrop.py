"""GPU-side multi-crop: crop, resize, flip and normalise all views of a batch in one batched operation.

The CPU path (:class:`medfoundry.data.multicrop.MultiCropTransform`) resamples every view of every
image on a DataLoader worker, which caps the images/s a few CPU cores can feed a ViT-S/B on a modern
GPU. Here the workers only decode (and intensity-map) the image; the random resized crops of all
images and all views are then produced on the device at once:

1. **Fixed storage size.** A batch must be one tensor, so each worker places its image on a square
   canvas of ``storage_size`` pixels (:func:`fit_to_canvas`): images larger than the canvas are
   downscaled (longer side = ``storage_size``, antialiased bilinear, aspect kept), smaller ones are
   left at their size; the rest of the canvas is filled by edge replication, so bilinear/bicubic taps
   at the border of the real content read the same values as on the CPU path. The valid size
   ``(h, w)`` of every canvas travels with the batch and crop boxes are drawn inside it. Choose
   ``storage_size`` at least as large as the source pixels a global crop covers (e.g. 512 for CT
   slices; ``global_size / sqrt(global_scale[0])`` avoids upsampling the smallest global crops).
2. **Crop boxes.** Inception-style random resized crops (Szegedy et al. 2015, as torchvision and
   :func:`medfoundry.data.multicrop.random_resized_crop_box` draw them): area fraction uniform in the
   scale range, aspect ratio log-uniform in [3/4, 4/3], the first of ten tries that fits, else a
   centred square. :func:`sample_crop_boxes` draws them for all views and images at once from a
   ``torch.Generator`` on the device (seeded per step, :meth:`GPUMultiCrop.generator_for`); the
   training loader (:func:`medfoundry.methods.dino.loader.build_gpu_dino_loader`) instead draws them on the
   workers with exactly the
   CPU path's per-sample seeded calls, so sample ``k`` keeps the same crops for any number of
   workers or ranks (the :mod:`medfoundry.data.views` contract).
3. **Resampling.** ``backend="grid_sample"``: one affine grid per view
   (:func:`torch.nn.functional.affine_grid`) mapping the output square onto its box, horizontal flips
   by negating the grid's x scale, all views of an image stacked along the grid's height so one
   :func:`torch.nn.functional.grid_sample` call (bilinear or bicubic, ``crops.interpolation``) serves
   the whole batch without copying the input. With ``align_corners=False`` and half-pixel centres
   this equals ``torchvision.transforms.v2.functional.resized_crop(..., antialias=False)`` of the same
   box. ``backend="roi_align"``: :func:`torchvision.ops.roi_align` with adaptive sampling (each output
   pixel averages ``ceil(box / size)`` squared bilinear samples), i.e. box-filter antialiasing when a
   crop is downscaled (bilinear only); flips are applied to its output.
4. **Normalisation** with ``crops.mean`` / ``crops.std``.

Photometric augmentations (colour jitter, greyscale, blur, solarisation) are not implemented here;
they are off in the medical recipes and a configuration asking for them is rejected.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from medfoundry.config.schema import CropsConfig
from medfoundry.data.multicrop import _RATIO, _per_channel, random_resized_crop_box
from medfoundry.data.views import mask_index, sample_seed

Backend = Literal["grid_sample", "roi_align"]

_UNSUPPORTED = ("color_jitter_prob", "grayscale_prob", "global1_blur_prob", "global2_blur_prob", "local_blur_prob",
                "solarize_prob")


@dataclass
class CropPlan:
    """Crop boxes and flips of one view type: ``boxes`` (n_views, B, 4) float (top, left, h, w) in
    canvas pixels (pixel ``i`` spans ``[i, i + 1)``), ``flips`` (n_views, B) bool."""

    boxes: Tensor
    flips: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropPlan:
        """The plan on ``device``."""
        nb = non_blocking
        return CropPlan(self.boxes.to(device, non_blocking=nb), self.flips.to(device, non_blocking=nb))


def sample_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    n_views: int,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
    ratio: tuple[float, float] = _RATIO,
    attempts: int = 10,
) -> Tensor:
    """Random resized crop boxes for ``n_views`` views of each image, drawn all at once.

    Args:
        heights, widths: (B,) valid image sizes in pixels (on the device the boxes are wanted on).
        n_views: crops per image.
        scale: area-fraction range of a crop.
        generator: random source on the same device (``None``: torch's global RNG of that device).
        ratio: aspect-ratio (w / h) range, sampled log-uniformly.
        attempts: tries per crop before the centred-square fallback (10, as torchvision).

    Returns:
        (n_views, B, 4) float64 boxes (top, left, h, w) with integer values, distributed as
        :func:`medfoundry.data.multicrop.random_resized_crop_box` draws them.
    """
    dev = heights.device
    hgt = heights.to(torch.float64).view(1, -1, 1)
    wid = widths.to(torch.float64).view(1, -1, 1)
    shape = (n_views, heights.numel(), attempts)

    def uniform(lo: float, hi: float, size: tuple[int, ...]) -> Tensor:
        return lo + (hi - lo) * torch.rand(size, generator=generator, device=dev, dtype=torch.float64)

    target = hgt * wid * uniform(scale[0], scale[1], shape)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), shape))
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= wid) & (h > 0) & (h <= hgt)
    first = ok.to(torch.uint8).argmax(dim=-1, keepdim=True)  # index of the first fitting try
    found = ok.any(dim=-1)
    side = torch.minimum(hgt, wid).squeeze(-1).expand(n_views, -1)
    h = torch.where(found, h.gather(-1, first).squeeze(-1), side)
    w = torch.where(found, w.gather(-1, first).squeeze(-1), side)
    hgt, wid = hgt.squeeze(-1), wid.squeeze(-1)
    u_top = torch.rand(h.shape, generator=generator, device=dev, dtype=torch.float64)
    u_left = torch.rand(h.shape, generator=generator, device=dev, dtype=torch.float64)
    top = torch.where(found, torch.floor(u_top * (hgt - h + 1)), torch.div(hgt - side, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u_left * (wid - w + 1)), torch.div(wid - side, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=-1)


def sample_flips(n_views: int, batch: int, prob: float, device: torch.device | str,
                 generator: torch.Generator | None = None) -> Tensor:
    """(n_views, B) bool: which crops are flipped horizontally (each with chance ``prob``)."""
    return torch.rand((n_views, batch), generator=generator, device=device) < prob


def affine_thetas(boxes: Tensor, flips: Tensor, height: int, width: int) -> Tensor:
    """(..., 2, 3) matrices for :func:`~torch.nn.functional.affine_grid` (``align_corners=False``).

    Output coordinates in [-1, 1] map onto the box edges ``[left, left + w]`` x ``[top, top + h]`` of a
    ``height`` x ``width`` input; a flipped box has its x scale negated (its right edge comes first).
    """
    top, left, h, w = boxes.to(torch.float32).unbind(-1)
    sign = 1.0 - 2.0 * flips.to(torch.float32)
    zeros = torch.zeros_like(top)
    row_x = torch.stack([sign * w / width, zeros, (2 * left + w) / width - 1], dim=-1)
    row_y = torch.stack([zeros, h / height, (2 * top + h) / height - 1], dim=-1)
    return torch.stack([row_x, row_y], dim=-2)


def crop_views(
    images: Tensor,
    plan: CropPlan,
    size: int,
    mode: Literal["bilinear", "bicubic"] = "bilinear",
    backend: Backend = "grid_sample",
) -> Tensor:
    """Crop, resize to ``size`` x ``size`` and flip every planned view: (B, C, H, W) -> (n_views, B, C, S, S).

    ``images`` are float (any float dtype the device's ``grid_sample`` supports); no normalisation.
    """
    n_v, b = plan.flips.shape
    c, height, width = images.shape[1:]
    if plan.boxes.shape[:2] != (n_v, b) or images.shape[0] != b:
        raise ValueError(f"plan for {n_v} views of {plan.boxes.shape[1]} images does not match {b} images")
    if backend == "grid_sample":
        theta = affine_thetas(plan.boxes, plan.flips, height, width).to(images.dtype)
        grid = F.affine_grid(theta.flatten(0, 1), [n_v * b, c, size, size], align_corners=False)
        # all views of image i stacked along the grid height: one grid_sample over the un-copied batch
        grid = grid.view(n_v, b, size, size, 2).transpose(0, 1).reshape(b, n_v * size, size, 2)
        out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
        return out.view(b, c, n_v, size, size).permute(2, 0, 1, 3, 4).contiguous()
    if backend == "roi_align":
        from torchvision.ops import roi_align

        top, left, h, w = plan.boxes.to(images.dtype).unbind(-1)
        index = torch.arange(b, device=images.device, dtype=images.dtype).expand(n_v, b)
        rois = torch.stack([index, left, top, left + w, top + h], dim=-1).flatten(0, 1)
        out = roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out = torch.where(plan.flips.flatten()[:, None, None, None], out.flip(-1), out)
        return out.view(n_v, b, c, size, size)
    raise ValueError(f"unknown GPU multi-crop backend '{backend}' (grid_sample | roi_align)")


class GPUMultiCrop:
    """Batched multi-crop on the device: (B, C, H, W) canvases -> view-major global and local crops.

    Args:
        cfg: the ``crops`` section (sizes, scale ranges, flips, interpolation, mean/std).
        channels: image channels (mean/std are broadcast like the CPU path).
        backend: ``grid_sample`` (``crops.interpolation``, no antialiasing) or ``roi_align`` (always
            bilinear, with box-filter antialiasing of downscaled crops).
        seed: run seed; :meth:`generator_for` derives the per-step generator from it.
    """

    def __init__(self, cfg: CropsConfig, channels: int, backend: Backend = "grid_sample", seed: int = 0) -> None:
        on = [k for k in _UNSUPPORTED if getattr(cfg, k) > 0]
        if on:
            raise ValueError(f"GPU multi-crop does not implement {', '.join('crops.' + k for k in on)}; "
                             "set them to 0 or use the CPU multi-crop path")
        self.cfg = cfg
        self.channels = channels
        self.backend: Backend = backend
        self.seed = seed
        self.mode: Literal["bilinear", "bicubic"] = "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
        self._mean = torch.tensor(_per_channel(cfg.mean, channels, "crops.mean"), dtype=torch.float32)
        self._std = torch.tensor(_per_channel(cfg.std, channels, "crops.std"), dtype=torch.float32)

    def generator_for(self, step: int, device: torch.device | str) -> torch.Generator:
        """A generator on ``device`` seeded from (seed, step): the crops of a step are reproducible."""
        return torch.Generator(device=device).manual_seed(sample_seed(self.seed, step))

    def plan(self, sizes: Tensor, generator: torch.Generator | None = None) -> dict[str, CropPlan]:
        """Boxes and flips of every view for images of valid ``sizes`` (B, 2) = (h, w), on their device."""
        c = self.cfg
        heights, widths = sizes[:, 0], sizes[:, 1]
        b, dev = sizes.shape[0], sizes.device
        plans = {"global": CropPlan(sample_crop_boxes(heights, widths, c.n_global, tuple(c.global_scale), generator),
                                    sample_flips(c.n_global, b, c.hflip_prob, dev, generator))}
        if c.n_local:
            plans["local"] = CropPlan(sample_crop_boxes(heights, widths, c.n_local, tuple(c.local_scale), generator),
                                      sample_flips(c.n_local, b, c.hflip_prob, dev, generator))
        return plans

    def normalize(self, views: Tensor) -> Tensor:
        """(x - mean) / std per channel of view-major crops (n, B, C, S, S)."""
        mean = self._mean.to(views.device, views.dtype).view(1, 1, -1, 1, 1)
        std = self._std.to(views.device, views.dtype).view(1, 1, -1, 1, 1)
        return (views - mean) / std

    def __call__(
        self,
        images: Tensor,
        sizes: Tensor | None = None,
        plans: dict[str, CropPlan] | None = None,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> dict[str, Tensor]:
        """Global and local crops of ``images`` (B, C, H, W) as ``{"global_crops", "local_crops"}`` tensors.

        Args:
            images: same-size canvases on the device (any float dtype; resampled in float32).
            sizes: (B, 2) valid (h, w) of each canvas; default: the whole canvas.
            plans: precomputed boxes/flips (e.g. drawn on the workers); default: drawn here.
            generator: device generator for drawing the plans; default from ``step`` when given,
                else torch's global RNG.
            step: training step for :meth:`generator_for`.
        """
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, H, W) images, got {tuple(images.shape)}")
        x = images.float()
        if plans is None:
            if sizes is None:
                sizes = torch.tensor(x.shape[-2:], device=x.device).expand(x.shape[0], 2)
            if generator is None and step is not None:
                generator = self.generator_for(step, x.device)
            plans = self.plan(sizes.to(x.device), generator)
        c = self.cfg
        out = {"global_crops": self.normalize(crop_views(x, plans["global"], c.global_size, self.mode, self.backend))}
        if "local" in plans and c.n_local:
            out["local_crops"] = self.normalize(crop_views(x, plans["local"], c.local_size, self.mode, self.backend))
        return out


# ---- the training loader: decode on CPU workers, crop on the device ---------------------------------------------


def fit_to_canvas(image: Tensor, storage_size: int) -> tuple[Tensor, tuple[int, int]]:
    """(C, H, W) -> (C, S, S) canvas and the valid (h, w) at its top-left (see the module docstring)."""
    import torchvision.transforms.v2.functional as TF

    _, height, width = image.shape
    factor = min(1.0, storage_size / max(height, width))
    h, w = height, width
    if factor < 1.0:
        h, w = max(1, round(height * factor)), max(1, round(width * factor))
        image = TF.resize(image, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if (h, w) != (storage_size, storage_size):
        image = F.pad(image[None], (0, storage_size - w, 0, storage_size - h), mode="replicate")[0]
    return image, (h, w)


class CanvasViews:
    """Worker half of the GPU path: image -> canvas, crop boxes/flips and iBOT masks of one sample.

    Called by :class:`medfoundry.data.views.SeededViews` under the sample's seed; the boxes come from
    the same calls, in the same order, as :class:`~medfoundry.data.multicrop.MultiCropTransform` makes
    (box, then flip, per view; then the masks), drawn on the original image and scaled to the canvas.
    """

    def __init__(self, cfg: CropsConfig, channels: int, storage_size: int, mask_sampler=None,
                 mask_grid: tuple[int, int] = (0, 0), dtype: torch.dtype = torch.float16) -> None:
        GPUMultiCrop(cfg, channels)  # validates the configuration early, in the main process
        self.cfg = cfg
        self.channels = channels
        self.storage_size = storage_size
        self.mask_sampler = mask_sampler
        self.mask_grid = mask_grid
        self.dtype = dtype

    def _plan(self, n: int, scale: list[float], height: int, width: int, region) -> tuple[Tensor, Tensor]:
        c = self.cfg
        boxes, flips = [], []
        for _ in range(n):
            if region is not None:
                from medfoundry.data.transforms.label_guided import label_guided_crop_box

                box = label_guided_crop_box(height, width, tuple(scale), _RATIO, region, c.region_crop_prob)
            else:
                box = random_resized_crop_box(height, width, (scale[0], scale[1]))
            boxes.append(box)
            flips.append(c.hflip_prob > 0 and float(torch.rand(1)) < c.hflip_prob)
        return torch.tensor(boxes, dtype=torch.float64).view(n, 4), torch.tensor(flips, dtype=torch.bool)

    def __call__(self, image: Tensor, region=None) -> dict:
        """``{"canvas", "size", "global_boxes", "global_flips", "local_boxes", "local_flips"[, "masks"]}``."""
        if image.shape[0] != self.channels:
            raise ValueError(f"image has {image.shape[0]} channels, transform expects {self.channels}")
        c = self.cfg
        height, width = image.shape[-2:]
        gb, gf = self._plan(c.n_global, c.global_scale, height, width, region)
        lb, lf = self._plan(c.n_local, c.local_scale, height, width, region)
        canvas, (h, w) = fit_to_canvas(image, self.storage_size)
        to_canvas = torch.tensor([h / height, w / width, h / height, w / width], dtype=torch.float64)
        out = {"canvas": canvas.to(self.dtype), "size": torch.tensor([h, w]), "global_boxes": gb * to_canvas,
               "global_flips": gf, "local_boxes": lb * to_canvas, "local_flips": lf}
        if self.mask_sampler is not None:
            out["masks"] = torch.stack([self.mask_sampler(self.mask_grid) for _ in range(c.n_global)])
        return out


def collate_canvas(items: list[dict]) -> dict:
    """Stack per-sample canvases and plans: canvas (B, C, S, S), sizes (B, 2), boxes (n, B, 4), flips (n, B)."""
    batch = {
        "canvas": torch.stack([it["canvas"] for it in items]),
        "sizes": torch.stack([it["size"] for it in items]),
        "bad": [b for it in items for b in it["bad"]],
    }
    for key in ("global_boxes", "global_flips", "local_boxes", "local_flips", "masks"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items], dim=1)
    return batch


class GPUCropLoader:
    """Iterable over device batches ``{"global_crops", "local_crops"[, "masks"], "bad"}`` (as ``collate_views``).

    Wraps a DataLoader of :func:`collate_canvas` batches: moves each to ``device`` and crops it there.
    ``dataset`` is the wrapped loader's dataset (the training loop reads its length).
    """

    def __init__(self, loader: DataLoader, crops: GPUMultiCrop, device: torch.device) -> None:
        self.loader = loader
        self.crops = crops
        self.device = device

    @property
    def dataset(self):
        """The wrapped DataLoader's dataset."""
        return self.loader.dataset

    def transform(self, batch: dict) -> dict:
        """One :func:`collate_canvas` batch -> cropped, normalised views on the device."""
        nb = self.device.type == "cuda"
        canvas = batch["canvas"].to(self.device, non_blocking=nb)
        plans = {"global": CropPlan(batch["global_boxes"], batch["global_flips"]).to(self.device, nb)}
        if "local_boxes" in batch and batch["local_boxes"].shape[0]:
            plans["local"] = CropPlan(batch["local_boxes"], batch["local_flips"]).to(self.device, nb)
        out = self.crops(canvas, plans=plans)
        if "masks" in batch:
            out["masks"] = batch["masks"].to(self.device, non_blocking=nb)
            out["mask_index"] = mask_index(batch["masks"]).to(self.device, non_blocking=nb)  # on the CPU: no sync
        out["bad"] = batch["bad"]
        return out

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield self.transform(batch)
