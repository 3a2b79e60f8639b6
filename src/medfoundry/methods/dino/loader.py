"""The multi-crop training loaders of the DINO-family methods (``dino``, ``distill``): crops by the DataLoader
workers (:func:`build_dino_loader`) or batched on the training device (:func:`build_gpu_dino_loader`)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from medfoundry.data.gpu_multicrop import Backend, CanvasViews, GPUCropLoader, GPUMultiCrop, collate_canvas
from medfoundry.data.loader import (
    build_intensity,
    build_mask_sampler,
    check_crop_sizes,
    per_view_intensity,
    step_loader,
)
from medfoundry.data.masking import MaskSampler
from medfoundry.data.multicrop import MultiCropTransform
from medfoundry.data.sources import build_source
from medfoundry.data.views import SeededViews, ViewsSpec, collate_views
from medfoundry.methods.dino.config import DinoConfig, DinoRunConfig
from medfoundry.precision import resolve_device


def mask_sampler(dino: DinoConfig) -> MaskSampler | None:
    """iBOT block masks for global crops when ``dino.ibot_weight > 0``."""
    return build_mask_sampler(dino.ibot_weight, dino.mask_probability, dino.mask_ratio_min, dino.mask_ratio_max)


def build_dino_loader(cfg: DinoRunConfig, patch_size: int, start_step: int, rank: int, world_size: int) -> DataLoader:
    """Infinite loader of view-major multi-crop batches for this rank, positioned at ``start_step``; in pinned
    memory when training on a GPU, so the loop's ``non_blocking`` copy overlaps the running step."""
    check_crop_sizes(cfg.crops, patch_size)
    intensity = build_intensity(cfg.data)
    per_view = per_view_intensity(cfg.data)
    dataset = SeededViews(
        build_source(cfg.data),
        MultiCropTransform(cfg.crops, cfg.data.channels, view_intensity=intensity if per_view else None),
        intensity=None if per_view else intensity,
        seed=cfg.train.seed,
        spec=ViewsSpec(mask_sampler(cfg.dino), patch_size, cfg.crops.global_size),
    )
    return step_loader(dataset, cfg.train.batch_size, cfg.data.num_workers, start_step, rank, world_size,
                       collate_views, resolve_device(cfg.train.device).type == "cuda")


def build_gpu_dino_loader(
    cfg: DinoRunConfig,
    patch_size: int,
    start_step: int,
    rank: int,
    world_size: int,
    storage_size: int = 512,
    backend: Backend = "grid_sample",
    device: torch.device | None = None,
) -> GPUCropLoader:
    """Like :func:`build_dino_loader`, with the crops made on ``device``.

    Workers decode, intensity-map and place each image on a ``storage_size`` canvas and draw its crop
    boxes, flips and masks under the sample's seed; the device crops the whole batch at once.
    ``device`` defaults to ``train.device`` resolved as the training loop does.
    """
    c = cfg.crops
    check_crop_sizes(c, patch_size)
    if per_view_intensity(cfg.data):
        raise ValueError("data.random_window_per_view is not implemented by crops.device=gpu (workers map intensity "
                         "once per image); set crops.device=cpu or data.random_window_per_view=false")
    device = device or resolve_device(cfg.train.device)
    grid = (c.global_size // patch_size, c.global_size // patch_size)
    views = CanvasViews(c, cfg.data.channels, storage_size, mask_sampler(cfg.dino), grid)
    dataset = SeededViews(build_source(cfg.data), views, intensity=build_intensity(cfg.data), seed=cfg.train.seed,
                          spec=ViewsSpec(None, patch_size, c.global_size))
    loader = step_loader(dataset, cfg.train.batch_size, cfg.data.num_workers, start_step, rank, world_size,
                         collate_canvas, device.type == "cuda")
    return GPUCropLoader(loader, GPUMultiCrop(c, cfg.data.channels, backend, cfg.train.seed), device)


def build_loader(cfg: DinoRunConfig, method, start_step: int, rank: int, world_size: int):
    """The method's loader: :func:`build_gpu_dino_loader` when ``crops.device=gpu``, else :func:`build_dino_loader`."""
    patch = method.eval_backbone().patch_size
    if cfg.crops.device == "gpu":
        return build_gpu_dino_loader(cfg, patch, start_step, rank, world_size, cfg.crops.storage_size,
                                     cfg.crops.gpu_backend)
    return build_dino_loader(cfg, patch, start_step, rank, world_size)
