"""The multi-crop training loader for DINO-family methods."""

from __future__ import annotations

from torch.utils.data import DataLoader

from medfoundry.config.schema import RunConfig
from medfoundry.data.masking import MaskSampler
from medfoundry.data.multicrop import MultiCropTransform
from medfoundry.data.sources import build_source
from medfoundry.data.views import SeededViews, StepBatchSampler, ViewsSpec, collate_views


def build_intensity(cfg: RunConfig):
    """The configured intensity mapping (HU windows ...) or None when the source already gives [0, 1]."""
    try:
        from medfoundry.data.intensity import build_intensity_transform
    except ModuleNotFoundError:
        return None
    return build_intensity_transform(cfg.data)


def build_dino_loader(cfg: RunConfig, patch_size: int, start_step: int, rank: int, world_size: int) -> DataLoader:
    """Infinite loader of view-major multi-crop batches for this rank, positioned at ``start_step``."""
    if cfg.crops.global_size % patch_size:
        raise ValueError(
            f"crops.global_size={cfg.crops.global_size} must be a multiple of the patch size {patch_size}"
        )
    if cfg.crops.n_local and cfg.crops.local_size % patch_size:
        raise ValueError(f"crops.local_size={cfg.crops.local_size} must be a multiple of the patch size {patch_size}")
    source = build_source(cfg.data)
    mask_sampler = None
    if cfg.dino.ibot_weight > 0:
        mask_sampler = MaskSampler(cfg.dino.mask_probability, cfg.dino.mask_ratio_min, cfg.dino.mask_ratio_max)
    dataset = SeededViews(
        source,
        MultiCropTransform(cfg.crops, cfg.data.channels),
        intensity=build_intensity(cfg),
        seed=cfg.train.seed,
        spec=ViewsSpec(mask_sampler, patch_size, cfg.crops.global_size),
    )
    sampler = StepBatchSampler(start_step, cfg.train.batch_size, rank, world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_views,
        pin_memory=False,
        persistent_workers=cfg.data.num_workers > 0,
        prefetch_factor=4 if cfg.data.num_workers > 0 else None,
    )
