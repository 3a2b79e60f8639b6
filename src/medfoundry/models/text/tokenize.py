"""Tokenizers for the text towers, padding each batch only to its longest text.

* :class:`ClipBPETokenizer`: the byte-pair-encoding tokenizer of OpenAI CLIP (Radford et al. 2021)
  as ``open_clip_torch`` ships it (vocabulary inside the wheel, no download). A text becomes
  ``[SOT] tokens [EOT]``; a text longer than the context is cut and its last kept token replaced by
  EOT, exactly as OpenAI CLIP, open_clip and CheXzero do (so the tower's EOT pooling still works).
* :class:`HFTokenizer`: the tokenizer of a local Hugging Face model folder (BERT WordPiece etc.).

Both return a :class:`TokenBatch` holding how many texts were truncated, so callers can report it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class ReportTruncationWarning(UserWarning):
    """Reports are longer than the text tower's context and lose their ends."""


@dataclass
class TokenBatch:
    """Token ids of a batch of texts, padded to the batch's longest (not to the context length)."""

    input_ids: Tensor  # (B, L) int64
    attention_mask: Tensor  # (B, L) int64, 1 for real tokens
    n_truncated: int  # texts that did not fit the context length
    lengths: list[int]  # untruncated token counts incl. special tokens


class ClipBPETokenizer:
    """OpenAI CLIP's BPE tokenizer (from ``open_clip``) with per-batch padding.

    Args:
        context_length: maximum tokens per text including SOT and EOT.
    """

    pad_id = 0

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = int(context_length)
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tok = SimpleTokenizer()
        return self._tok

    def __getstate__(self) -> dict:  # DataLoader workers rebuild the (large) BPE tables lazily
        return {"context_length": self.context_length, "_tok": None}

    @property
    def sot_id(self) -> int:
        """Start-of-text token id."""
        return int(self._tokenizer().sot_token_id)

    @property
    def eot_id(self) -> int:
        """End-of-text token id (the highest id: CLIP pools at the argmax of the ids)."""
        return int(self._tokenizer().eot_token_id)

    def truncation_advice(self) -> str:
        """What to change when reports exceed the context: the CLIP tower stretches its positions."""
        return ("Raise clip.text.context_length: the CLIP text tower stretches its learned positions to it "
                "(Long-CLIP).")

    def encode(self, text: str) -> list[int]:
        """``[SOT] + BPE(text) + [EOT]`` without truncation."""
        tok = self._tokenizer()
        return [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts (incl. SOT/EOT) of ``texts``."""
        return [len(self.encode(t)) for t in texts]

    def __call__(self, texts: Sequence[str]) -> TokenBatch:
        """Tokenise, truncate to the context length (last kept token -> EOT) and pad to the longest."""
        seqs = [self.encode(t) for t in texts]
        lengths = [len(s) for s in seqs]
        eot = self.eot_id
        n_trunc = 0
        for i, s in enumerate(seqs):
            if len(s) > self.context_length:
                seqs[i] = s[: self.context_length]
                seqs[i][-1] = eot
                n_trunc += 1
        longest = max((len(s) for s in seqs), default=1)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return TokenBatch(ids, mask, n_trunc, lengths)


class HFTokenizer:
    """The tokenizer of a local Hugging Face model folder, truncating at ``context_length``.

    Args:
        path: local folder (no hub access: ``local_files_only=True``).
        context_length: maximum tokens per text including special tokens.
    """

    def __init__(self, path: str, context_length: int = 77) -> None:
        self.path = str(path)
        self.context_length = int(context_length)
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        return self._tok

    def __getstate__(self) -> dict:
        return {"path": self.path, "context_length": self.context_length, "_tok": None}

    def max_positions(self) -> int:
        """The model's ``max_position_embeddings`` from its local ``config.json`` (0 when it has none)."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError):
            return 0
        return int(getattr(config, "max_position_embeddings", 0) or 0)

    def truncation_advice(self) -> str:
        """What to change when reports exceed the context: HF towers truncate, their positions are not stretched."""
        limit = self.max_positions()
        cut = "The HF text tower does not stretch its learned positions, so these reports lose their ends"
        if not limit:
            return f"{cut}; raise clip.text.context_length up to the model's max_position_embeddings."
        if self.context_length < limit:
            return f"{cut}; raise clip.text.context_length up to the model's max_position_embeddings ({limit})."
        return f"{cut}; clip.text.context_length is already the model's max_position_embeddings ({limit})."

    @property
    def pad_id(self) -> int:
        """Padding token id."""
        pad = self._tokenizer().pad_token_id
        return 0 if pad is None else int(pad)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts (incl. special tokens)."""
        tok = self._tokenizer()
        return [len(ids) for ids in tok(list(texts), add_special_tokens=True, truncation=False)["input_ids"]]

    def __call__(self, texts: Sequence[str]) -> TokenBatch:
        """Tokenise with truncation at the context length, padded to the longest text of the batch."""
        tok = self._tokenizer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sequence longer than the model max" for the length count
            lengths = self.token_lengths(texts)
        enc = tok(list(texts), padding="longest", truncation=True, max_length=self.context_length,
                  return_tensors="pt")
        n_trunc = sum(n > self.context_length for n in lengths)
        return TokenBatch(enc["input_ids"].long(), enc["attention_mask"].long(), n_trunc, lengths)


def check_truncation(tokenizer, texts: Sequence[str], limit: int = 2000, what: str = "reports",
                     hint: str = "") -> dict[str, int]:
    """Tokenise up to ``limit`` texts (evenly spread) and warn with counts when some exceed the context.

    Returns ``{"checked", "truncated", "longest"}``; emits a :class:`ReportTruncationWarning`
    naming the counts, the context length, the tokenizer's own ``truncation_advice()`` (what its text
    tower does with long texts and what to change) and ``hint`` (further options) when any text is cut.
    """
    n = len(texts)
    if n == 0 or limit == 0:
        return {"checked": 0, "truncated": 0, "longest": 0}
    step = max(1, n // limit) if limit > 0 else 1
    sample = [texts[i] for i in range(0, n, step)][: limit if limit > 0 else n]
    lengths = tokenizer.token_lengths(sample)
    ctx = tokenizer.context_length
    n_trunc = sum(length > ctx for length in lengths)
    longest = max(lengths)
    if n_trunc:
        share = "all" if len(sample) == n else f"a sample of {len(sample)} of the {n}"
        advice = getattr(tokenizer, "truncation_advice", lambda: "")()
        warnings.warn(
            f"{n_trunc} of {len(sample)} {what} ({100.0 * n_trunc / len(sample):.1f}%, {share}) are longer than "
            f"the context length of {ctx} tokens and will be truncated (longest: {longest} tokens). "
            f"{advice} {hint}".strip(),
            ReportTruncationWarning,
            stacklevel=2,
        )
    return {"checked": len(sample), "truncated": n_trunc, "longest": longest}
