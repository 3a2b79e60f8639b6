"""Configuration of cheap adaptation: LoRA, freezing, channel adaptation, knowledge distillation.

``adapt`` is applied to the student backbone after pretrained weights are loaded (see
``medfoundry.models.lora.adapt_backbone``); ``distill`` configures ``method: distill``
(``medfoundry.methods.distill``). ``docs/weights.md`` explains every option with examples.
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


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher backbone into the student (``method: distill``)."""

    teacher_name: str = ""  # registered backbone name of the teacher (see `medfoundry models`)
    teacher_checkpoint: str = ""  # teacher weights: run folder, training checkpoint, Meta .pth, HF folder, timm file
    teacher_format: str = "auto"  # auto|dinov2|dinov3|hf|timm|medfoundry|medfoundry:teacher|medfoundry:student
    teacher_img_size: int = 0  # teacher position-embedding grid size in pixels (0 = model.img_size)
    dino_weight: float = 1.0  # DINO loss on the teacher's DINO-head outputs (needs a head in the checkpoint)
    cls_cosine_weight: float = 1.0  # 1 - cosine(projected student class token, teacher class token)
    patch_cosine_weight: float = 1.0  # 1 - cosine on patch tokens (teacher grid resampled to the student's)
