"""The input preprocessing of an exported backbone, recorded as ``medfoundry_preprocessing.json`` in every export.

A backbone's features mean something only for inputs prepared the way it was evaluated: the intensity
mapping (``data.intensity``: ``identity``, ``range`` with ``data.value_range``, or HU ``data.windows``; 2.5D
``data.slices`` stacked as channels), the resize (shorter side to ``img_size``, bilinear, antialiased), the
centre crop and the per-channel normalisation (``crops.mean`` / ``crops.std``). :class:`Preprocessing` holds a
readable summary of them plus the three config sections frozen evaluation reads (``data``, ``crops``,
``eval``), so ``load_backbone(EXPORT)`` evaluates an export exactly as the run it came from. The HF
``preprocessor_config.json`` (:mod:`medfoundry.models.preprocessor_config`) and the model card are derived
from it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medfoundry.config.data import DataConfig
from medfoundry.config.evaluation import EvalConfig
from medfoundry.config.schema import CropsConfig
from medfoundry.errors import UserError

PREPROCESSING_FILE = "medfoundry_preprocessing.json"
PREPROCESSING_FORMAT = "medfoundry-preprocessing-v1"
INTERPOLATION = "bilinear"  # medfoundry.eval.eval_images.resize_center_crop: bilinear, antialiased


class PreprocessingError(UserError, ValueError):
    """A ``medfoundry_preprocessing.json`` that cannot be read."""


@dataclass
class Preprocessing:
    """What a user must do to an image before the exported backbone sees it (see the module docstring)."""

    img_size: int  # shorter side resized to this, then centre-cropped to img_size x img_size
    channels: int  # channels the model takes
    mean: list[float]  # per-channel normalisation of [0, 1] inputs
    std: list[float]
    intensity: str = "identity"  # data.intensity: identity | range | window
    value_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # intensity=range: [low, high] -> [0, 1]
    windows: list[str] = field(default_factory=list)  # intensity=window: HU windows, one channel group each
    slices: int = 1  # 2.5D: neighbouring slices stacked as channels before the intensity mapping
    slice_stride: int = 1
    interpolation: str = INTERPOLATION
    sections: dict = field(default_factory=dict)  # {"data": {...}, "crops": {...}, "eval": {...}}: exact reload

    def to_dict(self) -> dict:
        """The JSON form (``format`` first, then the summary, then the sections)."""
        return {"format": PREPROCESSING_FORMAT, **dataclasses.asdict(self)}

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/medfoundry_preprocessing.json``; returns its path."""
        path = Path(out_dir) / PREPROCESSING_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def window_specs(self) -> list[tuple[str, float, float]]:
        """``(spec, centre, width)`` of each HU window (empty unless ``intensity == "window"``)."""
        from medfoundry.config.windows import parse_window

        if self.intensity != "window":
            return []
        return [(w, *parse_window(w)) for w in self.windows]

    def section_configs(self) -> tuple[DataConfig, CropsConfig, EvalConfig]:
        """The recorded ``data``, ``crops`` and ``eval`` sections as config objects (defaults where absent).

        Without recorded sections (a backbone exported outside a run) they are built from the summary.
        """
        from medfoundry.config.loader import ConfigError, apply_mapping

        data = DataConfig(channels=self.channels, intensity=self.intensity, value_range=list(self.value_range),
                          windows=list(self.windows) or DataConfig().windows, slices=self.slices,
                          slice_stride=self.slice_stride)
        crops = CropsConfig(global_size=self.img_size, mean=list(self.mean), std=list(self.std))
        evaluation = EvalConfig(img_size=self.img_size)
        if self.sections:
            data, crops, evaluation = DataConfig(), CropsConfig(), EvalConfig()
            for name, obj in (("data", data), ("crops", crops), ("eval", evaluation)):
                try:
                    apply_mapping(obj, _known(obj, self.sections.get(name) or {}), f"{PREPROCESSING_FILE} ({name})",
                                  f"{name}.")
                except ConfigError as err:
                    raise PreprocessingError(f"{err}; re-export with this medfoundry version") from None
        return data, crops, evaluation


def _known(obj: object, values: dict) -> dict:
    """``values`` without the keys ``obj``'s dataclass no longer has (exports outlive schema changes)."""
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return {k: _known(fields[k], v) if dataclasses.is_dataclass(fields[k]) and isinstance(v, dict) else v
            for k, v in values.items() if k in fields}


def per_channel(values: Sequence[float], channels: int) -> list[float]:
    """``values`` as one per channel, as the evaluation transform broadcasts them (one value repeated, or averaged
    for a single channel)."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise PreprocessingError(f"{len(values)} normalisation values for {channels} channels; set crops.mean/std "
                             f"to 1 or {channels} values")


def preprocessing_from_sections(data: DataConfig, crops: CropsConfig, evaluation: EvalConfig,
                                img_size: int = 0, channels: int | None = None) -> Preprocessing:
    """The preprocessing of frozen evaluation for these sections (``medfoundry.eval.eval_images``' transform).

    The size is ``img_size``, else ``eval.img_size``, else ``crops.global_size``, as evaluation picks it.
    ``channels`` is the backbone's input channel count when known: it wins over a ``data.channels`` that
    disagrees with it (a config whose evaluation could not run), also in the recorded ``data`` section.
    """
    size = int(img_size or evaluation.img_size or crops.global_size)
    channels = int(channels or data.channels)
    sections = {"data": {**dataclasses.asdict(data), "channels": channels}, "crops": dataclasses.asdict(crops),
                "eval": dataclasses.asdict(evaluation)}
    return Preprocessing(
        img_size=size, channels=channels, mean=per_channel(crops.mean, channels), std=per_channel(crops.std, channels),
        intensity=data.intensity, value_range=[float(v) for v in data.value_range],
        windows=list(data.windows) if data.intensity == "window" else [], slices=int(data.slices),
        slice_stride=int(data.slice_stride), sections=sections,
    )


def plain_preprocessing(img_size: int, channels: int, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None) -> Preprocessing:
    """Preprocessing of a backbone exported outside a run: [0, 1] pictures, given (default 0.5) mean/std."""
    return Preprocessing(img_size=int(img_size), channels=int(channels),
                         mean=per_channel(mean or [0.5], channels), std=per_channel(std or [0.5], channels))


def read_preprocessing(folder: str | Path) -> Preprocessing | None:
    """The ``medfoundry_preprocessing.json`` of an export folder, or None when it has none (older exports)."""
    path = Path(folder) / PREPROCESSING_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.pop("format", PREPROCESSING_FORMAT) != PREPROCESSING_FORMAT:
            raise ValueError("unknown format")
        names = {f.name for f in dataclasses.fields(Preprocessing)}
        return Preprocessing(**{k: v for k, v in raw.items() if k in names})
    except (ValueError, TypeError) as err:
        raise PreprocessingError(f"{path}: not a {PREPROCESSING_FORMAT} record ({err}); re-export the model") from None


__all__ = ["PREPROCESSING_FILE", "Preprocessing", "PreprocessingError", "per_channel", "plain_preprocessing",
           "preprocessing_from_sections", "read_preprocessing"]
