"""Pieces of the multi-crop training loaders (the loaders themselves: ``medfoundry.methods.dino.loader``)."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader, Dataset

from medfoundry.config.data import DataConfig
from medfoundry.config.schema import CropsConfig
from medfoundry.data.masking import MaskSampler
from medfoundry.data.views import StepBatchSampler


def build_intensity(data: DataConfig):
    """The configured intensity mapping from source units (HU ...) to [0, 1]."""
    from medfoundry.data.intensity import build_intensity_transform

    return build_intensity_transform(data)


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


def build_mask_sampler(ibot_weight: float, probability: float, ratio_min: float,
                       ratio_max: float) -> MaskSampler | None:
    """iBOT block masks for global crops when the iBOT term is on (``ibot_weight > 0``)."""
    if ibot_weight <= 0:
        return None
    return MaskSampler(probability, ratio_min, ratio_max)


def step_loader(dataset: Dataset, batch_size: int, num_workers: int, start_step: int, rank: int, world_size: int,
                collate: Callable, pin_memory: bool = False) -> DataLoader:
    """Infinite DataLoader over run sample counters for one rank, positioned at ``start_step``."""
    return DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(start_step, batch_size, rank, world_size),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
