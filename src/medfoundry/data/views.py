"""The training dataset: deterministic, resumable sample order and per-sample seeded augmentation.

Sample ``k`` of a run (k = 0, 1, 2, ... over the whole run, across epochs) is image
``perm(epoch)[k % N]`` with ``epoch = k // N``, augmented under a torch RNG seeded from
``(seed, k)``. The data position of a run is therefore just ``step * global_batch``: resuming at a
step reproduces exactly the batches an uninterrupted run would have seen, for any number of workers
and ranks (rank r takes the r-th slice of each global batch).

An unreadable sample is replaced by the next readable one, recorded, and reported with the batch;
the loop stops once the share of distinct bad files passes ``data.max_bad_fraction``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from medfoundry.data.masking import MaskSampler
from medfoundry.data.sources import ImageSource
from medfoundry.errors import UnreadableDataError

_MIX = 0x9E3779B97F4A7C15
T = TypeVar("T")


def sample_seed(seed: int, k: int) -> int:
    """A 63-bit seed for sample ``k`` of a run seeded with ``seed`` (splitmix64-style mixing)."""
    z = (seed * _MIX + k + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


@dataclass
class ViewsSpec:
    """What to produce per sample besides the crops."""

    mask_sampler: MaskSampler | None = None  # iBOT masks for global crops
    patch_size: int = 16  # backbone patch size (mask grid = global_size / patch_size)
    global_size: int = 224


class RunOrder:
    """Sample counter ``k`` -> item index: item ``perm(epoch)[k % n]`` with a seeded permutation per epoch."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("cannot order an empty collection")
        self.n, self.seed = n, seed
        self._epoch = -1
        self._perm: Tensor | None = None

    def __call__(self, k: int) -> int:
        epoch = k // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, -1 - epoch))
            self._perm = torch.randperm(self.n, generator=g)
            self._epoch = epoch
        return int(self._perm[k % self.n])


def load_with_substitutes(load: Callable[[int], T], describe: Callable[[int], str], index: int, n: int,
                          max_substitutes: int = 16) -> tuple[int, T, list[tuple[str, str]]]:
    """``load(index)``, or the next readable item when it fails: ``(index used, value, [(name, reason)...])``.

    Any exception of the reader counts as an unreadable item. At most ``max_substitutes`` further items are
    tried, and never one twice (a source of three items that all fail stops after three tries); when all of
    them fail, :class:`~medfoundry.errors.UnreadableDataError` lists the distinct files with their reasons.
    """
    bad: list[tuple[str, str]] = []
    for attempt in range(min(max_substitutes + 1, n)):
        j = (index + attempt) % n
        try:
            return j, load(j), bad
        except Exception as err:  # noqa: BLE001 - any reader failure is a bad sample
            bad.append((describe(j), f"{type(err).__name__}: {err}"))
    raise UnreadableDataError(unreadable_message(bad, n))


_PART_SUFFIX = re.compile(r" \[[^\]]*\]$")  # " [slice 3]", " [tile x=0 y=0 ...]": a part of one file


def unreadable_message(bad: list[tuple[str, str]], n: int, shown: int = 5) -> str:
    """The error for samples that all failed: how many, then up to ``shown`` distinct files, each with its reason.

    Slices or tiles of one file (``vol.nii.gz [slice 3]``) count as that file, so a corrupt volume is named
    once with the number of its parts that failed, not once per slice.
    """
    files: dict[str, tuple[str, int]] = {}
    for name, reason in bad:
        key = _PART_SUFFIX.sub("", name)
        first, count = files.get(key, (reason, 0))
        files[key] = (first, count + 1)
    head = (f"all {n} samples of the data source are unreadable" if len(bad) >= n
            else f"{len(bad)} consecutive samples (of {n}) are unreadable")
    lines = [f"{name}{f' ({count} samples)' if count > 1 else ''}: {_short(reason)}"
             for name, (reason, count) in list(files.items())[:shown]]
    more = f"\n  ... and {len(files) - shown} more files" if len(files) > shown else ""
    return (f"{head} ({len(files)} distinct file{'s' if len(files) != 1 else ''}):\n  " + "\n  ".join(lines)
            + more + "\nFix or remove them (`medfoundry prepare` lists every unreadable file with its reason).")


def _short(reason: str, limit: int = 300) -> str:
    """The first line of a reader's error, cut to ``limit`` characters."""
    first = reason.strip().splitlines()[0] if reason.strip() else reason
    return first if len(first) <= limit else first[: limit - 3] + "..."


class SeededViews(Dataset):
    """Map-style dataset over the run's sample counter ``k`` (see module docstring)."""

    def __init__(
        self,
        source: ImageSource,
        views: Callable[..., dict[str, list[Tensor]]],
        intensity: Callable[[Tensor], Tensor] | None = None,
        seed: int = 0,
        spec: ViewsSpec | None = None,
        max_substitutes: int = 16,
    ) -> None:
        if len(source) == 0:
            raise ValueError("the data source is empty")
        self.source = source
        self.views = views
        self.intensity = intensity
        self.seed = seed
        self.spec = spec or ViewsSpec()
        self.max_substitutes = max_substitutes
        self.index_of = RunOrder(len(source), seed)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, k: int) -> dict:
        idx = self.index_of(k)
        with torch.random.fork_rng(devices=[]):
            # everything random for sample k (slice choice in the source, windows, crops, masks) happens here
            torch.manual_seed(sample_seed(self.seed, k))
            _, sample, bad = load_with_substitutes(self.source.__getitem__, self.source.describe, idx,
                                                   len(self.source), self.max_substitutes)
            image = sample.image
            if self.intensity is not None:
                image = self.intensity(image)
            out = self.views(image, sample.region)
            if self.spec.mask_sampler is not None:
                g = self.spec.global_size // self.spec.patch_size
                out["masks"] = [self.spec.mask_sampler((g, g)) for _ in out["global"]]
        out["bad"] = bad
        return out


def mask_index(masks: Tensor) -> Tensor:
    """Flat positions (int64) of the masked patches of view-major iBOT masks ``(n_global, B, N)``, in the order
    boolean indexing of ``masks.flatten(0, 1)`` visits them.

    Computed on the CPU by the loader, so the method gathers the masked tokens with ``index_select`` on the
    device: boolean indexing there is a ``nonzero``, which waits for the device (a host sync every step).
    DINOv2's collate ships the same indices (``mask_indices_list``)."""
    return masks.reshape(-1).nonzero().squeeze(1)


def collate_views(items: list[dict]) -> dict:
    """Stack per-sample view lists into view-major tensors: (n_views, B, C, H, W), masks (n_global, B, N) and
    their flat masked positions (``mask_index``, :func:`mask_index`)."""
    batch: dict = {
        "global_crops": torch.stack([torch.stack(it["global"]) for it in items], dim=1),
        "bad": [b for it in items for b in it["bad"]],
    }
    if items[0]["local"]:
        batch["local_crops"] = torch.stack([torch.stack(it["local"]) for it in items], dim=1)
    if "masks" in items[0]:
        batch["masks"] = torch.stack([torch.stack(it["masks"]) for it in items], dim=1)
        batch["mask_index"] = mask_index(batch["masks"])
    return batch


class StepBatchSampler(Sampler[list[int]]):
    """Infinite batches of run sample counters for one rank, starting at ``start_step``."""

    def __init__(self, start_step: int, global_batch: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(
                f"train.batch_size={global_batch} is not divisible by the {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        self.step = start_step
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.rank = rank

    def __iter__(self) -> Iterator[list[int]]:
        step = self.step
        while True:
            base = step * self.global_batch + self.rank * self.per_rank
            yield list(range(base, base + self.per_rank))
            step += 1
