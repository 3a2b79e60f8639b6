"""Layer freezing of a backbone: by name pattern, by block index, or all but the last N blocks.

Freezing only ever switches ``requires_grad`` off (it never re-enables a parameter that something
else, such as LoRA, froze), so the rules compose: ``freeze_embeddings`` + ``freeze_first_n_blocks``
(classic partial fine-tuning), ``unfreeze_last_n_blocks`` (OpenMidnight-style: train only the top
of a released model), and glob ``freeze_patterns`` over parameter names relative to the backbone
(``vit.patch_embed.*``, ``vit.blocks.[0-5].*``, ``*norm*``). The optimizer only sees parameters that
require grad, and DDP only synchronises those.
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from medfoundry.models.backbone import Backbone

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING_PREFIXES = ("vit.patch_embed.", "vit.cls_token", "vit.reg_token", "vit.pos_embed", "mask_token")


def block_index(name: str) -> int | None:
    """The transformer block a parameter belongs to (``vit.blocks.3.attn...`` -> 3), or None."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def is_embedding(name: str) -> bool:
    """Patch embedding, position embedding, class/register tokens and the iBOT mask token."""
    return name.startswith(_EMBEDDING_PREFIXES)


def _freeze(backbone: nn.Module, predicate) -> list[str]:
    frozen = []
    for name, p in backbone.named_parameters():
        if p.requires_grad and predicate(name):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def freeze_patterns(backbone: Backbone, patterns: list[str]) -> list[str]:
    """Freeze parameters whose name (relative to the backbone) matches any glob pattern.

    Raises ``ValueError`` for a pattern that matches no parameter at all (a typo would otherwise
    silently train everything).
    """
    names = [n for n, _ in backbone.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"adapt.freeze_patterns: '{pattern}' matches no backbone parameter (names look like {names[:3]})"
            )
    return _freeze(backbone, lambda n: any(fnmatch.fnmatchcase(n, p) for p in patterns))


def freeze_embeddings(backbone: Backbone) -> list[str]:
    """Freeze the patch embedding, position embedding and class/register/mask tokens."""
    return _freeze(backbone, is_embedding)


def freeze_first_blocks(backbone: Backbone, n: int) -> list[str]:
    """Freeze the embeddings and blocks ``0..n-1`` (what feeds a frozen block gets no useful gradient anyway)."""
    if n <= 0:
        return []
    if n > backbone.depth:
        raise ValueError(f"adapt.freeze_first_n_blocks={n} but backbone '{backbone.name}' has {backbone.depth} blocks")

    def pred(name: str) -> bool:
        idx = block_index(name)
        return is_embedding(name) or (idx is not None and idx < n)

    return _freeze(backbone, pred)


def freeze_all_but_last_blocks(backbone: Backbone, n: int) -> list[str]:
    """Freeze everything except the last ``n`` blocks and the final norm (``n = 0``: only the norm trains)."""
    if n < 0:
        return []
    if n > backbone.depth:
        raise ValueError(f"adapt.unfreeze_last_n_blocks={n} but backbone '{backbone.name}' has {backbone.depth} blocks")
    first_trainable = backbone.depth - n

    def pred(name: str) -> bool:
        idx = block_index(name)
        if idx is not None:
            return idx < first_trainable
        return not name.startswith(("vit.norm.", "vit.fc_norm."))

    return _freeze(backbone, pred)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total


def apply_freezing(backbone: Backbone, patterns: list[str] | None = None, embeddings: bool = False,
                   first_n_blocks: int = 0, unfreeze_last_n_blocks: int = -1) -> list[str]:
    """Apply every freezing rule; returns the names frozen by this call."""
    frozen: list[str] = []
    if embeddings:
        frozen += freeze_embeddings(backbone)
    frozen += freeze_first_blocks(backbone, first_n_blocks)
    frozen += freeze_all_but_last_blocks(backbone, unfreeze_last_n_blocks)
    if patterns:
        frozen += freeze_patterns(backbone, patterns)
    return frozen


__all__ = [
    "apply_freezing",
    "block_index",
    "count_parameters",
    "freeze_all_but_last_blocks",
    "freeze_embeddings",
    "freeze_first_blocks",
    "freeze_patterns",
    "is_embedding",
]
