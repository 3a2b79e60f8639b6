"""Medical transforms: HU windows, 2.5D slice stacks, label-guided crops, HED stain augmentation, normalisation
statistics."""

from medfoundry.data.transforms.hed import apply_hed, hed_to_rgb, rgb_to_hed, sample_hed
from medfoundry.data.transforms.hu import WINDOW_PRESETS, HUWindows, apply_window, parse_window, random_window
from medfoundry.data.transforms.label_guided import label_guided_crop_box, region_from_mask
from medfoundry.data.transforms.stack25d import neighbour_indices, stack_slices, valid_centres
from medfoundry.data.transforms.stats import channel_stats, dataset_stats

__all__ = [
    "WINDOW_PRESETS",
    "HUWindows",
    "apply_hed",
    "apply_window",
    "channel_stats",
    "dataset_stats",
    "hed_to_rgb",
    "label_guided_crop_box",
    "neighbour_indices",
    "parse_window",
    "random_window",
    "region_from_mask",
    "rgb_to_hed",
    "sample_hed",
    "stack_slices",
    "valid_centres",
]
