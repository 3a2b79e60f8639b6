"""The image-report training dataset and loader, and image preprocessing for CLIP-style training.

Images are returned in [0, 1]; normalisation happens in the model (its ``pixel_mean`` /
``pixel_std`` buffers travel with checkpoints). Training samples follow the run's sample counter
exactly like :mod:`medfoundry.data.views` (exact resume for any number of ranks).
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from medfoundry.config.clip import ClipPreprocessConfig
from medfoundry.data.multicrop import random_resized_crop_box
from medfoundry.data.pairs import PairSource
from medfoundry.data.sources import to_channels
from medfoundry.data.transforms.color_jitter import apply_color_jitter, check_jitter_channels, sample_color_jitter
from medfoundry.data.views import RunOrder, StepBatchSampler, load_with_substitutes, sample_seed

# ----------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preset_pixel_stats(cfg: ClipPreprocessConfig, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of a preset (grey models get the channel average of RGB presets).

    ``dataset`` returns a neutral (0.5, 0.25) placeholder, replaced by :func:`estimate_pixel_stats`.
    """
    if cfg.normalize == "openai_clip":
        mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    elif cfg.normalize == "imagenet":
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    elif cfg.normalize == "custom":
        if not cfg.mean or not cfg.std:
            raise ValueError("clip.preprocess.normalize=custom needs clip.preprocess.mean and .std")
        mean, std = list(cfg.mean), list(cfg.std)
    else:
        mean, std = [0.5], [0.25]
    if len(mean) == channels:
        return mean, std
    if len(mean) == 1:
        return mean * channels, std * channels
    if channels == 1:
        return [float(np.mean(mean))], [float(np.mean(std))]
    raise ValueError(f"clip.preprocess mean/std have {len(mean)} values for {channels} channels")


class PairImageTransform:
    """(C, H, W) [0, 1] image -> (channels, size, size) [0, 1].

    Shorter side resized to ``stored_size`` first (CheXzero stores 320 px). Training: a random resized
    crop (area ``crop_scale``, aspect 3/4-4/3) to ``size`` or, with ``train_crop=center``, the evaluation
    crop; then an optional horizontal flip and optional colour jitter. Evaluation: shorter side to ``size``
    and a centre crop. Bicubic or bilinear, antialiased, clamped to [0, 1]. Training randomness comes from
    the global torch RNG, which :class:`PairDataset` seeds per sample.
    """

    def __init__(self, cfg: ClipPreprocessConfig, channels: int, train: bool) -> None:
        if train and cfg.color_jitter_prob > 0:
            check_jitter_channels(channels, "clip.preprocess.color_jitter_prob")
        self.cfg, self.channels, self.train = cfg, channels, train
        self.interp = InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else InterpolationMode.BILINEAR

    def _resize_short(self, img: Tensor, side: int) -> Tensor:
        h, w = img.shape[-2:]
        if min(h, w) == side:
            return img
        if h <= w:
            size = [side, max(1, round(w * side / h))]
        else:
            size = [max(1, round(h * side / w)), side]
        return TF.resize(img, size, interpolation=self.interp, antialias=True)

    def _center(self, img: Tensor) -> Tensor:
        """Shorter side to ``size``, then the central ``size`` x ``size`` square (no randomness)."""
        return TF.center_crop(self._resize_short(img, self.cfg.size), [self.cfg.size, self.cfg.size])

    def _augment(self, img: Tensor) -> Tensor:
        """Training crop, flip and colour jitter, in that order (each draws only when it is switched on)."""
        c = self.cfg
        if c.train_crop == "center":
            out = self._center(img)
        else:
            h, w = img.shape[-2:]
            top, left, ch, cw = random_resized_crop_box(h, w, (c.crop_scale[0], c.crop_scale[1]))
            out = TF.resized_crop(img, top, left, ch, cw, [c.size, c.size], interpolation=self.interp, antialias=True)
        if c.hflip_prob > 0 and float(torch.rand(1)) < c.hflip_prob:
            out = TF.horizontal_flip(out)
        if c.color_jitter_prob > 0 and float(torch.rand(1)) < c.color_jitter_prob:
            order, factors = sample_color_jitter(c.color_jitter)
            out = apply_color_jitter(out.clamp(0.0, 1.0), order, factors, c.color_jitter)
        return out

    def __call__(self, img: Tensor) -> Tensor:
        img = to_channels(img, self.channels)
        img = self._resize_short(img, self.cfg.stored_size)
        out = self._augment(img) if self.train else self._center(img)
        return out.clamp_(0.0, 1.0).contiguous()


def estimate_pixel_stats(pairs: PairSource, transform: PairImageTransform, n: int = 256) -> tuple[list[float],
                                                                                                   list[float]]:
    """Per-channel mean/std of up to ``n`` evenly spaced training images (evaluation transform)."""
    total = len(pairs)
    idx = np.linspace(0, total - 1, num=min(n, total)).round().astype(int)
    s = s2 = None
    count = 0
    for i in np.unique(idx):
        x = transform(pairs.load_image(int(i))).double()
        flat = x.flatten(1)
        s = flat.sum(1) if s is None else s + flat.sum(1)
        s2 = (flat**2).sum(1) if s2 is None else s2 + (flat**2).sum(1)
        count += flat.shape[1]
    mean = s / count
    std = (s2 / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


# ----------------------------------------------------------------------------------------------
# the training dataset and loader
# ----------------------------------------------------------------------------------------------


class PairDataset(Dataset):
    """Map-style dataset over the run's sample counter ``k`` (the rule of :mod:`medfoundry.data.views`).

    Sample ``k`` is pair ``perm(epoch)[k % N]`` with ``epoch = k // N``, augmented under a torch RNG
    seeded from ``(seed, k)``; unreadable images are replaced by the next pair and reported.
    """

    def __init__(self, pairs: PairSource, transform: PairImageTransform, seed: int = 0,
                 max_substitutes: int = 16) -> None:
        if len(pairs) == 0:
            raise ValueError("no image-report pairs")
        self.pairs, self.transform, self.seed = pairs, transform, seed
        self.max_substitutes = max_substitutes
        self.index_of = RunOrder(len(pairs), seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict:
        j, image, bad = load_with_substitutes(self.pairs.load_image, self.pairs.describe, self.index_of(k),
                                              len(self.pairs), self.max_substitutes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, k))
            image = self.transform(image)
        return {"image": image, "text": self.pairs.texts[j], "index": j, "bad": bad}


class ClipCollate:
    """Stack images and tokenise the batch's texts, padded to its longest (not the context length)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        tokens = self.tokenizer([it["text"] for it in items])
        return {
            "images": torch.stack([it["image"] for it in items]),
            "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask,
            "n_truncated": torch.tensor(float(tokens.n_truncated)),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "bad": [b for it in items for b in it["bad"]],
        }


def build_pair_loader(pairs: PairSource, preprocess: ClipPreprocessConfig, channels: int, tokenizer,
                      global_batch: int, seed: int, start_step: int, rank: int, world_size: int,
                      num_workers: int = 0) -> DataLoader:
    """Infinite loader of ``{"images", "input_ids", "attention_mask", ...}`` batches for one rank at ``start_step``."""
    dataset = PairDataset(pairs, PairImageTransform(preprocess, channels, train=True), seed=seed)
    return DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(start_step, global_batch, rank, world_size),
        num_workers=num_workers,
        collate_fn=ClipCollate(tokenizer),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
