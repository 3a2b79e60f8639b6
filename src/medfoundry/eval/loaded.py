"""The record of a backbone loaded for evaluation (what :func:`medfoundry.methods.checkpoint_backbone.load_backbone`
returns and :func:`medfoundry.eval.tasks.evaluate_backbone` reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfoundry.config.data import DataConfig
from medfoundry.config.evaluation import EvalConfig
from medfoundry.config.schema import CropsConfig, RunConfig
from medfoundry.models.backbone import Backbone


@dataclass
class FrozenEvalSections:
    """The sections frozen-feature evaluation reads: the image pipeline (``data``, ``crops``) and ``eval``.

    A DINO-family run config has these sections itself (and is passed as is); a method without them
    (``clip``, whose images go through ``clip.preprocess``) evaluates its backbone with these defaults.
    """

    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class LoadedBackbone:
    """A backbone ready for evaluation and where it came from."""

    backbone: Backbone
    cfg: RunConfig
    checkpoint: Path
    step: int | None
    identity: str  # names the weights, for feature caches
    random_init: bool = False
    #: ``data``, ``crops``, ``eval`` for frozen evaluation: the run config itself, or FrozenEvalSections
    sections: Any = field(default_factory=FrozenEvalSections)

    @property
    def label(self) -> str:
        """Short human-readable name: ``step 1200`` or ``random init``."""
        if self.random_init:
            return "random init"
        return f"step {self.step}" if self.step is not None else self.checkpoint.name
