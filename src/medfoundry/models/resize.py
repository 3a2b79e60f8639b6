"""Resizing pretrained tensors to a new model: position embeddings, patch embeddings, input channels.

Three things commonly break when released weights meet a medical-imaging model:

* **Position-embedding grid.** DINOv2 stores absolute position embeddings for 518 px (37x37 patches
  at /14); training at 224 px needs 16x16. :func:`resample_pos_embed` keeps the class/register
  entries aside and resamples only the patch grid with 2D bicubic interpolation, so every position
  keeps a smooth, pretrained embedding (never a random one). RoPE models (DINOv3) need nothing.
* **Prefix layout.** Meta's DINOv2 adds a position embedding to the class token and none to the
  registers; timm's register models keep no class position at all (``no_embed_class``) and fold it
  into ``cls_token``. :func:`reconcile_pos_prefix` converts between the layouts exactly.
* **Patch size and channels.** :func:`resample_patch_embed` changes the kernel size with FlexiViT's
  pseudo-inverse resize (timm's implementation); :func:`adapt_in_chans` turns 3-channel weights into
  1- or N-channel ones (DINO-MX style), scaled so activations keep their magnitude.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ChannelMode = Literal["average", "repeat"]


def infer_grid(num_positions: int) -> tuple[int, int]:
    """The square patch grid of ``num_positions`` patch embeddings; raises if it is not a square."""
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"{num_positions} patch position embeddings do not form a square grid")
    return side, side


def infer_pos_prefix(num_tokens: int, candidates: list[int]) -> int:
    """How many leading entries of a ``(1, T, D)`` position embedding belong to prefix tokens.

    Picks the first candidate (e.g. ``[0, 1, 1 + registers]``) that leaves a square patch grid.
    """
    for prefix in candidates:
        rest = num_tokens - prefix
        if rest > 0 and math.isqrt(rest) ** 2 == rest:
            return prefix
    raise ValueError(f"cannot split {num_tokens} position embeddings into prefix {candidates} + a square grid")


def resample_pos_embed(
    pos: Tensor,
    new_grid: tuple[int, int],
    num_prefix: int,
    old_grid: tuple[int, int] | None = None,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample the patch part of ``pos`` (1, P + H*W, D) to ``new_grid``; the P prefix rows are kept as is.

    Interpolation runs in float32 (bicubic in half precision shifts the embeddings) with
    ``align_corners=False``; ``antialias`` low-pass filters when shrinking (37x37 -> 16x16) so the
    result is the smooth average of its neighbourhood rather than an aliased sample.
    """
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    old_grid = old_grid or infer_grid(grid.shape[1])
    if tuple(old_grid) == tuple(new_grid):
        return pos
    dim = grid.shape[-1]
    img = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=tuple(new_grid), mode=interpolation, align_corners=False, antialias=antialias)
    grid = img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


def reconcile_pos_prefix(
    pos: Tensor,
    src_prefix: int,
    tgt_prefix: int,
    cls_token: Tensor | None,
    reg_tokens: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, str]:
    """Move the class/register position entries between layouts without changing the model's function.

    Adding a position embedding to a prefix token is the same as adding it to the token itself
    (prefix positions are never resampled), so:

    * source has a class position (1), target has none (0, timm ``no_embed_class``): fold
      ``pos[:, 0]`` into ``cls_token``;
    * source 0, target 1 (or 1 + R): prepend zero rows;
    * source 1, target 1 + R (registers with their own positions in the target): insert zero rows.
    * source 1 + R, target 0 or 1: fold the register rows into the register tokens.

    Returns ``(pos, cls_token, reg_tokens, note)``; the note is empty when nothing changed.
    """
    if src_prefix == tgt_prefix:
        return pos, cls_token, reg_tokens, ""
    d = pos.shape[-1]
    src_cls = pos[:, :1] if src_prefix >= 1 else None
    src_reg = pos[:, 1:src_prefix] if src_prefix > 1 else None
    grid = pos[:, src_prefix:]
    notes = []
    rows: list[Tensor] = []
    if tgt_prefix >= 1:
        rows.append(src_cls if src_cls is not None else pos.new_zeros(1, 1, d))
    elif src_cls is not None:
        if cls_token is None:
            raise ValueError("cannot fold the class position embedding: the source has no cls_token")
        cls_token = cls_token + src_cls.to(cls_token.dtype)
        notes.append("class position folded into cls_token")
    n_reg_tgt = max(0, tgt_prefix - 1)
    if n_reg_tgt:
        if src_reg is not None and src_reg.shape[1] == n_reg_tgt:
            rows.append(src_reg)
        else:
            rows.append(pos.new_zeros(1, n_reg_tgt, d))
            notes.append(f"{n_reg_tgt} zero register positions inserted")
    elif src_reg is not None and src_reg.shape[1]:
        if reg_tokens is None or reg_tokens.shape[1] != src_reg.shape[1]:
            raise ValueError("cannot fold register position embeddings: register token counts differ")
        reg_tokens = reg_tokens + src_reg.to(reg_tokens.dtype)
        notes.append("register positions folded into reg_token")
    out = torch.cat(rows + [grid], dim=1)
    return out, cls_token, reg_tokens, f"prefix {src_prefix} -> {tgt_prefix} ({', '.join(notes) or 'rows moved'})"


def resample_patch_embed(weight: Tensor, new_size: tuple[int, int]) -> Tensor:
    """Resize a patch-embedding kernel (O, C, h, w) to ``new_size`` (FlexiViT pseudo-inverse resize).

    Uses :func:`timm.layers.resample_patch_embed`: the new kernel applied to a resized patch gives
    (approximately) the token the old kernel gives on the original patch, which plain
    interpolation of the kernel does not.
    """
    from timm.layers import resample_patch_embed as _timm_resample

    if tuple(weight.shape[-2:]) == tuple(new_size):
        return weight
    return _timm_resample(weight.float(), list(new_size), interpolation="bicubic", antialias=True).to(weight.dtype)


def adapt_in_chans(weight: Tensor, in_chans: int, mode: ChannelMode = "average") -> Tensor:
    """Adapt a patch-embedding kernel (O, C_src, h, w) to ``in_chans`` input channels (DINO-MX style).

    * ``average``: every new channel gets the mean kernel ``mean_c W_c``;
    * ``repeat``: new channel ``j`` gets ``W_{j mod C_src}``.

    Both are multiplied by ``C_src / in_chans``, so an image whose channels are all equal yields
    exactly the activations the original model gives on that grey image replicated to ``C_src``
    channels (for 1 channel with ``average`` this is the sum of the RGB kernels).
    """
    src = weight.shape[1]
    if src == in_chans:
        return weight
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    scale = src / in_chans
    if mode == "average":
        mean = weight.float().mean(dim=1, keepdim=True)
        out = mean.expand(-1, in_chans, -1, -1) * scale
    elif mode == "repeat":
        idx = torch.arange(in_chans, device=weight.device) % src
        out = weight.float()[:, idx] * scale
    else:
        raise ValueError(f"unknown channel mode {mode!r}; use 'average' or 'repeat'")
    return out.contiguous().to(weight.dtype)
