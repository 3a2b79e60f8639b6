"""The CLIP text transformer (OpenAI / CheXzero layout) built from ``open_clip_torch``'s modules.

Architecture (Radford et al. 2021): token + learned position embeddings, a causally masked pre-norm
transformer (``open_clip.transformer.Transformer``, QuickGELU for the OpenAI weights), a final
LayerNorm, the features at the end-of-text token (the highest token id, "argmax" pooling) and a
bias-free ``text_projection``. Parameter names equal the text keys of an OpenAI CLIP state dict
(``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.N.*``,
``ln_final.*``, ``text_projection``), which is also what CheXzero (Tiu et al., Nature BME 2022)
saves, so :meth:`ClipTextTower.load_openai_state_dict` loads those checkpoints by key.

Long reports: :func:`stretch_positional_embedding` extends the 77 learned positions to any length the
way Long-CLIP does (Zhang et al., ECCV 2024, "knowledge-preserved stretching"): the first 20 positions
are kept, the rest are linearly interpolated (and extrapolated past the last one). Because the mask
is causal and the output is read at EOT, a text of at most ``keep`` tokens gets exactly the same
embedding after stretching. Batches are padded only to their longest text; trailing pads cannot
influence earlier positions under the causal mask, so the result equals padding to the full context.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def stretch_positional_embedding(pe: Tensor, new_length: int, keep: int = 20) -> Tensor:
    """Long-CLIP stretching of a (N, D) position-embedding table to (new_length, D).

    Positions ``0..keep-1`` are copied. New position ``j >= keep`` sits at old coordinate
    ``keep + (j - keep) / r`` with ``r = (new_length - keep) / (N - keep)`` and takes the linear
    interpolation of its two neighbouring old embeddings; coordinates past the last old position are
    extrapolated along the last difference. For ``N = 77, new_length = 248`` (r = 4) this is exactly
    Long-CLIP's table. Shrinking (``new_length < N``) keeps the first ``new_length`` rows.
    """
    n, _d = pe.shape
    if new_length <= n:
        return pe[:new_length].clone()
    keep = min(keep, n - 1)
    if keep < 0 or n - keep < 2:
        raise ValueError(f"cannot stretch {n} positions keeping {keep}")
    ratio = (new_length - keep) / (n - keep)
    src = pe.detach().double()
    out = torch.empty(new_length, pe.shape[1], dtype=torch.float64)
    out[:keep] = src[:keep]
    j = torch.arange(keep, new_length, dtype=torch.float64)
    coord = keep + (j - keep) / ratio
    lo = coord.floor().long().clamp(max=n - 2)
    frac = (coord - lo.double()).unsqueeze(1)  # > 1 past the last position: linear extrapolation
    out[keep:] = src[lo] * (1 - frac) + src[lo + 1] * frac
    return out.to(pe.dtype)


def clip_text_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The text-tower entries of a CLIP state dict, with wrapper prefixes removed.

    Accepts OpenAI / CheXzero layouts (text keys at the top level), ``module.`` (DDP) or ``model.``
    prefixes, and open_clip's custom-text layout (``text.*``). Vision keys, ``logit_scale`` and
    metadata entries (``input_resolution`` ...) are dropped.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        k = key
        for prefix in ("module.", "model.", "clip."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("text."):
            k = k[len("text."):]
        if k.startswith(_TEXT_PREFIXES) and isinstance(value, Tensor):
            out[k] = value
    if "token_embedding.weight" not in out:
        raise KeyError("no CLIP text-tower keys (token_embedding.weight, transformer.resblocks...) in the state dict")
    return out


def openai_text_hparams(text_sd: dict[str, Tensor]) -> dict[str, int]:
    """Architecture of the text tower held by an OpenAI-layout text state dict (as OpenAI's build_model reads it)."""
    width = int(text_sd["ln_final.weight"].shape[0])
    layers = len({k.split(".")[2] for k in text_sd if k.startswith("transformer.resblocks.")})
    proj = text_sd.get("text_projection")
    return {
        "width": width,
        "heads": max(1, width // 64),
        "layers": layers,
        "vocab_size": int(text_sd["token_embedding.weight"].shape[0]),
        "context_length": int(text_sd["positional_embedding"].shape[0]),
        "output_dim": int(proj.shape[-1] if proj.ndim == 2 else proj.shape[0]) if proj is not None else width,
        "mlp_ratio": text_sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
    }


def load_clip_checkpoint(path: str | Path, what: str = "clip.text.pretrained") -> dict[str, Tensor]:
    """A CLIP state dict from a file: a ``torch.save``d dict (CheXzero, open_clip), a ``.safetensors`` file, or
    an OpenAI TorchScript archive.

    Pickles go through the restricted reader (:func:`medfoundry.safe_load.load_torch_file`). A TorchScript
    archive (OpenAI's released ``ViT-B-32.pt``) is not plain data: ``torch.jit.load`` compiles the code stored
    in it and runs its ``__setstate__`` methods, which can create and write files, so it is loaded only with
    the explicit trust opt-in (``--trust-pickle`` / ``MEDFOUNDRY_TRUST_PICKLE=1``); the refusal says how to
    convert it once into a safetensors file instead.
    """
    from medfoundry.safe_load import is_torchscript_archive, load_torch_file, load_torchscript

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found (no weights are downloaded at run time)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    elif is_torchscript_archive(path):
        obj = load_torchscript(path, f"{what} (OpenAI CLIP TorchScript archive)").state_dict()
    else:
        obj = load_torch_file(path, what)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path}: expected a state dict, got {type(obj).__name__}")
    return obj


class ClipTextTower(nn.Module):
    """OpenAI/CheXzero CLIP text transformer with per-batch padding and stretchable positions.

    Args:
        context_length: number of learned positions (max tokens incl. SOT/EOT).
        vocab_size: BPE vocabulary size (49,408 for OpenAI's tokenizer).
        width, heads, layers, mlp_ratio: transformer shape (OpenAI ViT-B/32: 512, 8, 12, 4).
        output_dim: width of ``text_projection`` (the CLIP embedding).
        quick_gelu: QuickGELU activation (OpenAI / CheXzero weights) instead of GELU.
    """

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512, heads: int = 8,
                 layers: int = 12, mlp_ratio: float = 4.0, output_dim: int = 512, quick_gelu: bool = True) -> None:
        super().__init__()
        from open_clip.transformer import LayerNorm, QuickGELU, Transformer

        self.context_length = int(context_length)
        self.width, self.output_dim = int(width), int(output_dim)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio,
                                       act_layer=QuickGELU if quick_gelu else nn.GELU, norm_layer=LayerNorm)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self._init_parameters()

    def _init_parameters(self) -> None:
        # OpenAI CLIP's initialisation (also open_clip's TextTransformer.init_parameters)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        t = self.transformer
        proj_std = (t.width**-0.5) * ((2 * t.layers) ** -0.5)
        for block in t.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=t.width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * t.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=t.width**-0.5)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (freezing, LoRA targets)."""
        return self.transformer.resblocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (open_clip's checkpointing)."""
        self.transformer.grad_checkpointing = enable

    def _causal_mask(self, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu_(1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids (L <= context_length, padded with 0 after EOT) -> (B, output_dim) features.

        ``attention_mask`` is accepted for interface symmetry with the HF tower and not needed: the
        causal mask keeps pads (after EOT) from reaching the EOT position that is read out.
        """
        b, n = input_ids.shape
        if n > self.context_length:
            raise ValueError(f"{n} tokens exceed the text tower's context length {self.context_length}")
        x = self.token_embedding(input_ids)
        x = x + self.positional_embedding[:n].to(x.dtype)
        x = self.transformer(x, attn_mask=self._causal_mask(n, x.device, x.dtype))
        x = self.ln_final(x)
        pooled = x[torch.arange(b, device=x.device), input_ids.argmax(dim=-1)]  # EOT has the highest id
        return pooled @ self.text_projection.to(pooled.dtype)

    @torch.no_grad()
    def resize_context(self, new_length: int, keep: int = 20) -> None:
        """Stretch (Long-CLIP) or cut the position table to ``new_length`` positions in place."""
        if new_length == self.context_length:
            return
        table = stretch_positional_embedding(self.positional_embedding.data, new_length, keep)
        self.positional_embedding = nn.Parameter(table, requires_grad=self.positional_embedding.requires_grad)
        self.context_length = int(new_length)

    @torch.no_grad()
    def load_openai_state_dict(self, state_dict: dict[str, Tensor], keep: int = 20) -> None:
        """Load the text keys of an OpenAI-layout CLIP state dict (OpenAI, CheXzero, open_clip ``CLIP``).

        The saved position table is stretched (Long-CLIP) or cut to this tower's context length;
        every other tensor must match by name and shape (a mismatch raises, naming the key).
        """
        text_sd = dict(clip_text_state_dict(state_dict))
        pe = text_sd["positional_embedding"]
        if pe.shape[0] != self.context_length:
            text_sd["positional_embedding"] = stretch_positional_embedding(pe.float(), self.context_length, keep)
        own = self.state_dict()
        missing = sorted(set(own) - set(text_sd))
        unexpected = sorted(set(text_sd) - set(own))
        if missing or unexpected:
            raise KeyError(f"CLIP text state dict does not match the tower: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        for key, value in text_sd.items():
            if own[key].shape != value.shape:
                raise ValueError(f"CLIP text state dict: '{key}' has shape {tuple(value.shape)}, the tower "
                                 f"expects {tuple(own[key].shape)} (check clip.embed_dim / clip.text.*)")
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in text_sd.items()}, strict=True)

    @classmethod
    def from_openai_state_dict(cls, state_dict: dict[str, Tensor], context_length: int | None = None,
                               keep: int = 20, quick_gelu: bool = True) -> ClipTextTower:
        """Build a tower shaped like the weights in ``state_dict`` and load them (positions stretched if asked)."""
        text_sd = clip_text_state_dict(state_dict)
        hp = openai_text_hparams(text_sd)
        tower = cls(context_length=context_length or hp["context_length"], vocab_size=hp["vocab_size"],
                    width=hp["width"], heads=hp["heads"], layers=hp["layers"],
                    mlp_ratio=hp["mlp_ratio"] if math.isfinite(hp["mlp_ratio"]) else 4.0,
                    output_dim=hp["output_dim"], quick_gelu=quick_gelu)
        tower.load_openai_state_dict(text_sd, keep=keep)
        return tower


class ProjectedTextTower(nn.Module):
    """A CLIP text tower followed by an extra projection head (``clip.text.proj: linear|mlp``)."""

    def __init__(self, tower: ClipTextTower, proj: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.proj = proj
        self.output_dim = int(proj.out_dim)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks of the wrapped tower."""
        return self.tower.blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpointing of the wrapped tower."""
        self.tower.set_grad_checkpointing(enable)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Tower features, projected."""
        return self.proj(self.tower(input_ids, attention_mask))
