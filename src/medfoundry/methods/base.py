"""The contract between a training method and the loop.

A method is an ``nn.Module`` whose ``forward(batch, step)`` returns ``{"loss": scalar, **metrics}``.
The loop knows nothing else about it: it calls the two hooks around the optimizer step, optimises
the parameters that require grad, and checkpoints ``state_dict()`` (student, teacher, centers ...).
"""

from __future__ import annotations

from torch import Tensor, nn

from medfoundry.models.backbone import Backbone


class Method(nn.Module):
    """Base class for training methods (DINO, CLIP, distillation)."""

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Compute ``{"loss": ..., metric_name: value, ...}`` for one batch."""
        raise NotImplementedError

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward and clipping, before ``optimizer.step()`` (e.g. freeze a layer's grads)."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after ``optimizer.step()`` (e.g. EMA teacher update, center update)."""

    def eval_backbone(self) -> Backbone:  # pragma: no cover - abstract
        """The backbone whose features are evaluated and exported (the teacher for DINO)."""
        raise NotImplementedError

    def backbones(self) -> dict[str, Backbone]:
        """Named trainable backbones, for layer-wise lr decay and freezing."""
        return {}

    def metrics_after_step(self, step: int) -> dict[str, float]:
        """Scalars to log once the optimizer step is done (e.g. the EMA momentum just used); none by default."""
        return {}
