"""The ``clip`` method's section and its run config (the common sections + ``clip``).

One section, ``clip``: the image tower (any registered backbone from ``model`` plus a projection), the
text tower (OpenAI/CheXzero CLIP text transformer via ``open_clip_torch`` or an HF BERT-family model from
a local folder), the loss (symmetric InfoNCE of Radford et al. 2021 or SigLIP of Zhai et al. 2023), image
preprocessing, the image-report data and in-training evaluation (CheXzero-style zero-shot classification,
Tiu et al. 2022, and image<->text Recall@K). The parts are component configs in
:mod:`medfoundry.config.clip`. See docs/clip.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from medfoundry.config.clip import (
    ClipDataConfig,
    ClipEvalConfig,
    ClipImageConfig,
    ClipLossConfig,
    ClipPreprocessConfig,
    ClipTextConfig,
    check_clip_best_metric,
    check_color_jitter,
    check_val_loss,
)
from medfoundry.config.loader import ConfigError
from medfoundry.config.schema import RunConfig


@dataclass
class ClipConfig:
    """Towers, loss, preprocessing, data and evaluation of CLIP-style image-report training."""

    embed_dim: int = 512  # shared embedding width
    image: ClipImageConfig = field(default_factory=ClipImageConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    loss: ClipLossConfig = field(default_factory=ClipLossConfig)
    preprocess: ClipPreprocessConfig = field(default_factory=ClipPreprocessConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    eval: ClipEvalConfig = field(default_factory=ClipEvalConfig)


def check_clip_config(c: ClipConfig) -> None:
    """Cross-field checks of the ``clip`` section; raises ``ConfigError`` naming the key (called by the method)."""
    p, t, lo = c.preprocess, c.text, c.loss
    if len(p.crop_scale) != 2 or not (0 < p.crop_scale[0] <= p.crop_scale[1] <= 1):
        raise ConfigError(f"'clip.preprocess.crop_scale' = {p.crop_scale} must be [low, high], 0 < low <= high <= 1")
    if p.size < 1 or p.stored_size < p.size:
        raise ConfigError(f"'clip.preprocess.stored_size' = {p.stored_size} must be >= 'clip.preprocess.size' = "
                          f"{p.size}")
    if p.normalize == "custom" and (not p.mean or len(p.mean) != len(p.std)):
        raise ConfigError("'clip.preprocess.normalize' = 'custom' needs 'clip.preprocess.mean' and '.std' "
                          "of equal length")
    if not 0.0 <= p.hflip_prob <= 1.0:
        raise ConfigError(f"'clip.preprocess.hflip_prob' = {p.hflip_prob} must be in [0, 1]")
    check_color_jitter(p)
    if t.context_length < 3 or not 0 <= t.keep_positions < t.context_length:
        raise ConfigError(f"'clip.text.context_length' = {t.context_length} must be >= 3 and exceed "
                          f"'clip.text.keep_positions' = {t.keep_positions}")
    if t.kind == "hf" and not t.hf_path:
        raise ConfigError("'clip.text.kind' = 'hf' needs 'clip.text.hf_path' (a local model folder)")
    if t.kind == "clip" and t.width % t.heads:
        raise ConfigError(f"'clip.text.width' = {t.width} must be divisible by 'clip.text.heads' = {t.heads}")
    if lo.temperature <= 0 or lo.max_logit_scale <= 0 or lo.siglip_init_scale <= 0:
        raise ConfigError("'clip.loss.temperature', 'max_logit_scale' and 'siglip_init_scale' must be > 0")
    if c.eval.every_steps < 0:
        raise ConfigError(f"'clip.eval.every_steps' = {c.eval.every_steps} must be >= 0")
    check_val_loss(c.eval.val_loss)
    if c.embed_dim < 1:
        raise ConfigError(f"'clip.embed_dim' = {c.embed_dim} must be >= 1")


@dataclass
class ClipRunConfig(RunConfig):
    """A ``method: clip`` run: the common sections (``model`` is the image backbone) and ``clip``."""

    clip: ClipConfig = field(default_factory=ClipConfig)

    print_order: ClassVar[tuple[str, ...]] = ("output_dir", "method", "model", "optim", "train", "dist", "adapt",
                                              "clip")

    def check(self) -> None:
        """The ``clip`` section's cross-field rules (:func:`check_clip_config`); no gradient accumulation.

        The contrastive loss couples every image with every report of the batch, so micro-batches of
        ``train.batch_size`` would train with that many negatives, not the product's: refused rather than
        silently different. Cached-feature accumulation (GradCache, Gao et al. 2021) is the exact alternative.
        """
        if self.train.grad_accum_steps > 1:
            raise ConfigError(f"'train.grad_accum_steps' = {self.train.grad_accum_steps} is refused for method clip: "
                              "its contrastive loss couples all pairs of a batch, so micro-batches would not equal "
                              "the big batch; raise train.batch_size over more GPUs (cached-feature/GradCache "
                              "accumulation is not implemented)")
        check_clip_config(self.clip)
        check_clip_best_metric(self.clip.eval)
