"""Two augmented views per image from any training data source, for DINO-X's view-retrieval ratio.

The protocol of DINO-X (``scripts/phase5_view_retrieval_eval.py``): sample ``N`` images at random
(seeded) from a label-free image set, draw two views of each with the training augmentation (crops,
flips, random HU windows), embed both with the frozen backbone and score
:func:`medfoundry.eval.retrieval.dinox_view_retrieval`. The images come through the same data
sources and intensity mapping as training (``data.kind``: image folders, DICOM, NIfTI, prepared sets,
slides ...), so no label column is needed; ``eval.retrieval_root`` / ``retrieval_kind`` /
``retrieval_split`` point it at a held-out set (DINO-X uses its validation series).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from medfoundry.config.data import DataConfig
from medfoundry.data.intensity import build_intensity_transform
from medfoundry.data.loader import per_view_intensity
from medfoundry.data.multicrop import MultiCropTransform
from medfoundry.data.sources import build_source
from medfoundry.data.views import sample_seed
from medfoundry.eval.features import FeatureKind, extract_features
from medfoundry.eval.sections import FrozenEvalSections


def retrieval_data_config(sections: FrozenEvalSections) -> DataConfig:
    """The run's ``data`` section with ``eval.retrieval_root``, ``retrieval_kind`` and ``retrieval_split`` applied."""
    ec = sections.eval
    changes = {}
    if ec.retrieval_root:
        changes["root"] = ec.retrieval_root
    if ec.retrieval_kind:
        changes["kind"] = ec.retrieval_kind
    if ec.retrieval_split:
        changes["split"] = ec.retrieval_split
    return dataclasses.replace(sections.data, **changes)


def sample_images(n_available: int, n: int, seed: int) -> list[int]:
    """``min(n, n_available)`` distinct indices drawn without replacement under ``seed`` (sorted)."""
    if n < 2:
        raise ValueError(f"eval.retrieval_images={n} must be >= 2")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_available, generator=g)[: min(n, n_available)].tolist())


@torch.no_grad()
def view_pair_features(backbone: nn.Module, sections: FrozenEvalSections, feature: FeatureKind = "cls",
                       n: int | None = None, seed: int | None = None,
                       batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features ``(N, D)`` of view 1 and view 2 of ``N`` sampled images, and the images' names.

    The views are the run's two global crops (``sections.crops`` with ``n_local=0``) after the run's
    training intensity mapping (random HU windows included, per view when
    ``data.random_window_per_view``), drawn for image ``i`` under the seed ``sample_seed(seed, i)``,
    so the protocol is reproducible and the same for every checkpoint it compares.
    """
    ec = sections.eval
    n = ec.retrieval_images if n is None else n
    seed = ec.retrieval_seed if seed is None else seed
    data = retrieval_data_config(sections)
    source = build_source(data)
    if len(source) < 2:
        raise ValueError(f"view retrieval needs at least two images; {data.kind} '{data.root}' has {len(source)}")
    indices = sample_images(len(source), n, seed)
    crops = copy.copy(sections.crops)
    crops.n_global, crops.n_local = 2, 0
    intensity = build_intensity_transform(data)
    per_view = per_view_intensity(data)
    views = MultiCropTransform(crops, int(data.channels), view_intensity=intensity if per_view else None)
    feats: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for start in range(0, len(indices), batch_size):
        pair: tuple[list, list] = ([], [])
        for i in indices[start:start + batch_size]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(seed, i))
                sample = source[i]
                image = sample.image if per_view else intensity(sample.image)
                v = views(image, sample.region)["global"]
            pair[0].append(v[0])
            pair[1].append(v[1])
        for side in (0, 1):
            feats[side].append(extract_features(backbone, pair[side], feature, batch_size))
    names = [source.describe(i) for i in indices]
    return np.concatenate(feats[0]), np.concatenate(feats[1]), names
