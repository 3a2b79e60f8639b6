"""The multi-crop training loader for DINO-family methods, and the pieces the GPU-crop loader shares."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader, Dataset

from medfoundry.config.data import DataConfig
from medfoundry.config.schema import CropsConfig, DinoConfig, RunConfig
from medfoundry.data.masking import MaskSampler
from medfoundry.data.multicrop import MultiCropTransform
from medfoundry.data.sources import build_source
from medfoundry.data.views import SeededViews, StepBatchSampler, ViewsSpec, collate_views


def build_intensity(cfg: RunConfig):
    """The configured intensity mapping from source units (HU ...) to [0, 1]."""
    from medfoundry.data.intensity import build_intensity_transform

    return build_intensity_transform(cfg.data)


def per_view_intensity(data: DataConfig) -> bool:
    """Whether the intensity mapping runs once per crop (DINO-X's per-view random HU window)."""
    if not data.random_window_per_view:
        return False
    if data.intensity != "window" or data.random_window_prob <= 0:
        raise ValueError("data.random_window_per_view=true needs data.intensity=window and data.random_window_prob > 0 "
                         f"(got intensity={data.intensity}, random_window_prob={data.random_window_prob})")
    return True


def check_crop_sizes(crops: CropsConfig, patch_size: int) -> None:
    """Crop sides must be multiples of the backbone's patch size; the error names the key."""
    if crops.global_size % patch_size:
        raise ValueError(f"crops.global_size={crops.global_size} must be a multiple of the patch size {patch_size}")
    if crops.n_local and crops.local_size % patch_size:
        raise ValueError(f"crops.local_size={crops.local_size} must be a multiple of the patch size {patch_size}")


def build_mask_sampler(dino: DinoConfig) -> MaskSampler | None:
    """iBOT block masks for global crops when the iBOT term is on."""
    if dino.ibot_weight <= 0:
        return None
    return MaskSampler(dino.mask_probability, dino.mask_ratio_min, dino.mask_ratio_max)


def step_loader(dataset: Dataset, cfg: RunConfig, start_step: int, rank: int, world_size: int,
                collate: Callable, pin_memory: bool = False) -> DataLoader:
    """Infinite DataLoader over run sample counters for one rank, positioned at ``start_step``."""
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(start_step, cfg.train.batch_size, rank, world_size),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def build_dino_loader(cfg: RunConfig, patch_size: int, start_step: int, rank: int, world_size: int) -> DataLoader:
    """Infinite loader of view-major multi-crop batches for this rank, positioned at ``start_step``."""
    check_crop_sizes(cfg.crops, patch_size)
    intensity = build_intensity(cfg)
    per_view = per_view_intensity(cfg.data)
    dataset = SeededViews(
        build_source(cfg.data),
        MultiCropTransform(cfg.crops, cfg.data.channels, view_intensity=intensity if per_view else None),
        intensity=None if per_view else intensity,
        seed=cfg.train.seed,
        spec=ViewsSpec(build_mask_sampler(cfg.dino), patch_size, cfg.crops.global_size),
    )
    return step_loader(dataset, cfg, start_step, rank, world_size, collate_views)
