"""The record of a backbone loaded for evaluation (what :func:`medfoundry.methods.checkpoint_backbone.load_backbone`
returns and :func:`medfoundry.eval.tasks.evaluate_backbone` reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medfoundry.eval.sections import FrozenEvalSections
from medfoundry.models.backbone import Backbone


@dataclass
class LoadedBackbone:
    """A backbone ready for evaluation and where it came from."""

    backbone: Backbone
    method: str  # the training method that produced it (``dino``, ``distill``, ``clip`` ...)
    checkpoint: Path
    step: int | None
    identity: str  # names the weights, for feature caches
    random_init: bool = False
    #: ``data``, ``crops``, ``eval`` for frozen evaluation (the run's own, or the defaults)
    sections: FrozenEvalSections = field(default_factory=FrozenEvalSections)

    @property
    def label(self) -> str:
        """Short human-readable name: ``step 1200`` or ``random init``."""
        if self.random_init:
            return "random init"
        return f"step {self.step}" if self.step is not None else self.checkpoint.name
