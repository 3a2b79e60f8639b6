"""A Hugging Face BERT-family text tower loaded from a local folder, pooled and projected.

Medical CLIP variants commonly pair the image tower with a BERT encoder (ConVIRT, Zhang et al. 2022;
MedCLIP, Wang et al. 2022; BiomedCLIP, Zhang et al. 2023 with PubMedBERT): the report is encoded with
WordPiece tokens, the last hidden states are pooled (the [CLS] token or the attention-masked mean,
as Sentence-BERT does, Reimers & Gurevych 2019) and mapped to the shared space by a projection.
Nothing is downloaded: the folder must hold ``config.json``, the tokenizer files and, unless the
tower is built with random weights, the weights (``local_files_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from medfoundry.models.projection import ProjectionHead


def _require_folder(path: str) -> Path:
    folder = Path(path)
    if not path or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"clip.text.hf_path='{path}' is not a local Hugging Face model folder (config.json missing); "
            "models are never downloaded at run time"
        )
    return folder


class HFTextTower(nn.Module):
    """``AutoModel`` from a local folder + CLS/mean pooling + projection to ``output_dim``.

    Args:
        path: local model folder.
        output_dim: shared embedding width.
        pooling: ``"cls"`` (first token) or ``"mean"`` (attention-masked mean).
        proj: projection kind (``"linear"``, ``"mlp"`` or ``"none"``).
        proj_hidden_dim: MLP hidden width.
        random_init: build from ``config.json`` with random weights instead of loading them.
        config: an explicit ``transformers`` config (random weights; ``path`` then only names the tower).
    """

    def __init__(self, path: str, output_dim: int, pooling: Literal["cls", "mean"] = "cls",
                 proj: str = "linear", proj_hidden_dim: int = 2048, random_init: bool = False,
                 config=None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if config is None:
            folder = _require_folder(path)
            if random_init:
                config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config is not None:
            self.model = AutoModel.from_config(config)
        else:
            self.model = AutoModel.from_pretrained(folder, local_files_only=True)
        # the pooler (BERT's tanh head) is not used: freeze it so DDP sees no unused trainable parameters
        for name, p in self.model.named_parameters():
            if name.startswith("pooler."):
                p.requires_grad_(False)
        self.pooling = pooling
        hidden = int(self.model.config.hidden_size)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.proj = ProjectionHead(hidden, output_dim, proj, proj_hidden_dim)
        self.output_dim = output_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Hugging Face gradient checkpointing of the encoder layers (non-reentrant)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5
            if enable:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.activation_checkpointing_disable()
        elif enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_disable()

    def trunk_parameters(self):
        """Parameters of the encoder (everything but the projection)."""
        return self.model.parameters()

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, H) last hidden states -> (B, H) by the configured pooling."""
        if self.pooling == "cls":
            return hidden[:, 0]
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids and mask -> (B, output_dim) projected features."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return self.proj(self.pool(out.last_hidden_state, attention_mask))
