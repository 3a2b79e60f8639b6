"""What the registered ``slide`` task reads besides the backbone: :class:`SlideEvalContext`.

It plays the part :class:`~medfoundry.eval.clip_hook.ClipEvalContext` plays for the CLIP tasks: the slides (a
manifest read by :mod:`medfoundry.eval.slide.manifest`), the tile preprocessing (the run's evaluation transform),
the :class:`~medfoundry.eval.slide.settings.SlideSettings`, and where features are cached and pictures written.
:func:`slide_context` builds it from a run's frozen-evaluation sections, so the tiles default to the run's own
``data.tile_mpp`` / ``data.tile_size`` / ``data.min_tissue`` (a backbone is evaluated on tiles of the physical size
it was trained on) and the bootstrap, seed and split fractions to its ``eval`` section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfoundry.eval.eval_images import EvalTransform, eval_transform_from_config
from medfoundry.eval.labelled_set import LabelledSet
from medfoundry.eval.slide.manifest import load_slide_manifest
from medfoundry.eval.slide.settings import SlideSettings

if TYPE_CHECKING:
    from medfoundry.eval.sections import FrozenEvalSections


@dataclass
class SlideEvalContext:
    """The inputs of slide-level evaluation other than the backbone."""

    slides: LabelledSet  # one item per slide: path, label, patient, split
    transform: EvalTransform  # tile preprocessing (intensity, resize, normalisation)
    settings: SlideSettings = field(default_factory=SlideSettings)
    identity: str = ""  # names the backbone's weights for the feature cache ("" = no cache)
    cache_dir: Path | None = None  # feature cache folder (None = medfoundry.eval.features.default_cache_dir())
    out_dir: Path | None = None  # heat maps and per-slide predictions (None = nothing written)


def settings_from_sections(sections: FrozenEvalSections, **overrides: Any) -> SlideSettings:
    """:class:`SlideSettings` with the run's tile, feature, bootstrap, seed and split values, then ``overrides``
    (``None`` values are ignored, so unset command-line options keep the run's values); checked."""
    data, ec = sections.data, sections.eval
    base = SlideSettings(tile_mpp=data.tile_mpp, tile_size=data.tile_size, min_tissue=data.min_tissue,
                         slide_mpp=data.slide_mpp, wsi_backend=data.wsi_backend, feature=ec.feature,
                         batch_size=ec.batch_size, seed=ec.split_seed, n_bootstrap=ec.n_bootstrap,
                         split_fractions=tuple(ec.split_fractions))
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(SlideSettings)})
    if unknown:
        raise ValueError(f"unknown slide setting(s) {unknown}")
    settings = dataclasses.replace(base, **given)
    settings.check()
    return settings


def slide_context(
    sections: FrozenEvalSections,
    manifest: str | Path,
    *,
    slide_column: str = "path",
    label_column: str = "label",
    patient_column: str = "patient",
    split_column: str = "split",
    img_size: int = 0,
    identity: str = "",
    cache_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    **overrides: Any,
) -> SlideEvalContext:
    """The :class:`SlideEvalContext` of ``manifest`` evaluated with a run's ``sections``: settings from
    :func:`settings_from_sections` (``overrides`` are :class:`SlideSettings` fields), the slides split by patient
    when the manifest has no split column, tiles preprocessed like the run's evaluation images (size ``img_size``,
    else ``eval.img_size``, else ``crops.global_size``)."""
    settings = settings_from_sections(sections, **overrides)
    slides = load_slide_manifest(manifest, slide_column, label_column, patient_column, split_column,
                                 settings.split_fractions, settings.seed)
    return SlideEvalContext(slides, eval_transform_from_config(sections, img_size), settings, identity,
                            Path(cache_dir) if cache_dir is not None else None,
                            Path(out_dir) if out_dir is not None else None)
