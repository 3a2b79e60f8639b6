"""Named per-channel normalisation presets for ``crops.normalize``: ImageNet's and a TCGA (H&E pathology) one.

``crops.normalize: imagenet | tcga`` stands for the preset's ``crops.mean`` / ``crops.std``; when a config is
loaded (:func:`medfoundry.config.loader.validate`) :func:`resolve_normalization` writes the preset's numbers
into ``crops.mean`` / ``crops.std``, so every reader (the multi-crop views, frozen evaluation, the export's
``medfoundry_preprocessing.json`` and HF ``preprocessor_config.json``) sees the resolved values, and a run's
``config.yaml`` records both the preset's name and its numbers. ``custom`` (the default) keeps ``crops.mean`` /
``crops.std`` as given (their schema defaults are ImageNet's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

#: torchvision's ImageNet statistics (the schema default of crops.mean / crops.std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Statistics of H&E tiles from TCGA, as used to train Lunit's pathology ViT-S models (Kang et al. 2023,
#: "Benchmarking Self-Supervised Learning on Diverse Pathology Datasets", CVPR; weights "pre-trained on 19M
#: patches using TCGA data source", github.com/lunit-io/benchmark-ssl-pathology README). The numbers are those
#: kaiko-ai/eva records for those models ("For training the vit-s models the following standardization
#: parameters were used", src/eva/vision/models/networks/backbones/pathology/lunit.py). Not to be confused with
#: H-optimus-0's (0.707223, 0.578729, 0.703617) / (0.211883, 0.230117, 0.177517), which Bioptimus computed on
#: its proprietary slide collection (bioptimus/releases, models/h-optimus/v0/README.md).
TCGA_MEAN = (0.70322989, 0.53606487, 0.66096631)
TCGA_STD = (0.21716536, 0.26081574, 0.20723464)

#: ``crops.normalize`` value -> (mean, std); ``custom`` is absent (crops.mean / crops.std are used as given).
NORMALIZATION_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "tcga": (TCGA_MEAN, TCGA_STD),
}


def _crops_sections(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted prefix, section)`` of every ``CropsConfig`` in a config tree (a method's ``crops``)."""
    from medfoundry.config.schema import CropsConfig

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, CropsConfig):
            yield f"{prefix}{f.name}", value
        elif dataclasses.is_dataclass(value):
            yield from _crops_sections(value, f"{prefix}{f.name}.")


def _is_override(source: str | None) -> bool:
    """Whether a value came from a command-line override (the loader names those sources ``override '...'``)."""
    return bool(source) and source.startswith(("override ", "--override "))


def resolve_normalization(cfg: Any, origins: dict[str, str] | None = None) -> None:
    """Write each ``crops.normalize`` preset's statistics into that section's ``mean`` / ``std`` (in place).

    An override ``crops.normalize=tcga`` replaces the ``mean`` / ``std`` a recipe gives (later sources win, as
    for every key). A ``mean`` or ``std`` that differs from the preset's and was set in the same source as the
    preset or after it (per ``origins``; without ``origins``: any value other than the schema default) is a
    :class:`ConfigError` naming both keys, rather than one of them silently winning. Re-loading a resolved
    ``config.yaml`` (the preset's name and its numbers) is fine.
    """
    from medfoundry.config.loader import ConfigError
    from medfoundry.config.schema import CropsConfig

    default = CropsConfig()
    for key, crops in _crops_sections(cfg):
        if crops.normalize not in NORMALIZATION_PRESETS:
            continue
        preset = NORMALIZATION_PRESETS[crops.normalize]
        for name, want in zip(("mean", "std"), preset):
            value = [float(v) for v in getattr(crops, name)]
            if value != list(want):
                if origins is None:
                    explicit = value != list(getattr(default, name))
                else:
                    set_in = origins.get(f"{key}.{name}")
                    explicit = set_in is not None and not (
                        _is_override(origins.get(f"{key}.normalize")) and not _is_override(set_in))
                if explicit:
                    where = f"{origins[f'{key}.{name}']}: " if origins and f"{key}.{name}" in origins else ""
                    raise ConfigError(f"{where}'{key}.{name}' = {value} contradicts '{key}.normalize' = "
                                      f"{crops.normalize!r} ({list(want)}); drop '{key}.{name}', or set "
                                      f"'{key}.normalize' = 'custom' to use your own statistics")
            setattr(crops, name, list(want))


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATION_PRESETS", "TCGA_MEAN", "TCGA_STD",
           "resolve_normalization"]
