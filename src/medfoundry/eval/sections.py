"""The config sections that frozen-feature evaluation reads, bundled: a method's pipeline hands them over, so the
evaluators never see a whole run config."""

from __future__ import annotations

from dataclasses import dataclass, field

from medfoundry.config.data import DataConfig
from medfoundry.config.evaluation import EvalConfig
from medfoundry.config.schema import CropsConfig


@dataclass
class FrozenEvalSections:
    """The sections frozen-feature evaluation reads: the image pipeline (``data``, ``crops``) and ``eval``.

    A DINO-family run hands over its own three sections (images are preprocessed as in training); a method
    without them (``clip``, whose images go through ``clip.preprocess``) evaluates its backbone with these
    defaults.
    """

    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
