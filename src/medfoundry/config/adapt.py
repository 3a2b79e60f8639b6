"""Configuration of cheap adaptation: LoRA, freezing, channel adaptation.

``adapt`` is applied to the student backbone after pretrained weights are loaded (see
``medfoundry.models.lora.adapt_backbone``); knowledge distillation is ``method: distill``, whose section
is in ``medfoundry.methods.distill.config``. ``docs/weights.md`` explains every option with examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AdaptConfig:
    """LoRA, layer freezing and input-channel adaptation of the student backbone."""

    lora_rank: int = 0  # LoRA rank r (0 = no LoRA); with LoRA only the adapters of the backbone train
    lora_alpha: float = 16.0  # LoRA scaling numerator: the update is (alpha / r) * B @ A
    lora_dropout: float = 0.0  # dropout on the LoRA branch input
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])  # linears inside blocks
    lora_trainable: list[str] = field(default_factory=list)  # glob patterns of backbone params kept trainable too
    freeze_patterns: list[str] = field(default_factory=list)  # glob patterns of backbone param names to freeze
    freeze_embeddings: bool = False  # freeze patch embedding, position embedding, class/register/mask tokens
    freeze_first_n_blocks: int = 0  # freeze blocks 0..N-1 (and the embeddings, which feed them)
    unfreeze_last_n_blocks: int = -1  # -1 = off; N >= 0 freezes all but the last N blocks + final norm (OpenMidnight)
    channel_mode: Literal["average", "repeat"] = "average"  # 3-channel -> C-channel patch-embedding adaptation
