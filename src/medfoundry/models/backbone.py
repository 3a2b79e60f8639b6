"""One feature interface over timm Vision Transformers (absolute position embeddings or RoPE).

:class:`Backbone` wraps a timm ``VisionTransformer`` (DINOv2-style, learned absolute position
embeddings, optional register tokens) or a timm ``Eva`` (DINOv3-style, rotary position embeddings,
register tokens) and exposes what self-supervised methods and evaluators need:

* the class token, the register tokens and the patch tokens of any input size that is a multiple of
  the patch size (global and local crops go through the same weights; absolute position embeddings
  are resampled on the fly, RoPE needs no resampling);
* student-side masking of patch tokens with a learned ``mask_token`` before position embeddings
  (iBOT, Zhou et al. 2022; DINOv2 keeps the same token name);
* the last block's attention maps (for attention pictures).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class BackboneOutput:
    """Final-norm tokens of a forward pass, split by role."""

    cls: Tensor  # (B, D) class token
    reg: Tensor  # (B, R, D) register tokens (R may be 0)
    patch: Tensor  # (B, N, D) patch tokens in raster order
    grid: tuple[int, int]  # (H/patch, W/patch)


class Backbone(nn.Module):
    """A timm ViT behind medfoundry's feature interface.

    Args:
        vit: a timm ``VisionTransformer`` or ``Eva`` built with ``dynamic_img_size=True``.
        name: the registry name it was built from (recorded in checkpoints).
    """

    def __init__(self, vit: nn.Module, name: str = "") -> None:
        super().__init__()
        if not getattr(vit, "dynamic_img_size", False):
            raise ValueError(f"backbone '{name}': the timm model must be built with dynamic_img_size=True")
        self.vit = vit
        self.name = name
        self.embed_dim: int = int(vit.embed_dim)
        patch = vit.patch_embed.patch_size
        self.patch_size: int = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.has_class_token: bool = getattr(vit, "cls_token", None) is not None
        self.num_reg_tokens: int = int(vit.num_prefix_tokens) - int(self.has_class_token)
        self.uses_rope: bool = getattr(vit, "rope", None) is not None
        self.in_chans: int = int(vit.patch_embed.proj.in_channels)
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        vit.reset_classifier(0)

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        """The transformer blocks (for freezing, layer decay, activation checkpointing)."""
        return self.vit.blocks

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.vit.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations during backward (timm's gradient checkpointing)."""
        self.vit.set_grad_checkpointing(enable)

    def _embed(self, x: Tensor, masks: Tensor | None) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch_size}"
            )
        tokens = self.vit.patch_embed(x)  # (B, H, W, D) with dynamic_img_size
        b, h, w, d = tokens.shape
        if masks is not None:
            if masks.shape != (b, h * w):
                raise ValueError(f"mask shape {tuple(masks.shape)} does not match ({b}, {h * w}) patches")
            m = masks.reshape(b, h, w, 1).to(tokens.dtype)
            tokens = tokens * (1 - m) + self.mask_token.to(tokens.dtype).view(1, 1, 1, d) * m
        out = self.vit._pos_embed(tokens)
        rope = None
        if isinstance(out, tuple):
            out, rope = out
        out = self.vit.norm_pre(out)
        return out, rope, (h, w)

    def _run_blocks(self, x: Tensor, rope: Tensor | None, blocks: list[nn.Module]) -> Tensor:
        use_ckpt = self.vit.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in blocks:
            kwargs = {"rope": rope} if self.uses_rope else {}
            if use_ckpt:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False, **kwargs)
            else:
                x = blk(x, **kwargs)
        return x

    def _split(self, x: Tensor, grid: tuple[int, int]) -> BackboneOutput:
        x = self.vit.norm(x)
        n_prefix = int(self.vit.num_prefix_tokens)
        return BackboneOutput(
            cls=x[:, 0],
            reg=x[:, 1:n_prefix],
            patch=x[:, n_prefix:],
            grid=grid,
        )

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> BackboneOutput:
        """Tokens for images ``x`` (B, C, H, W); ``masks`` (B, N) bool replaces patches by the mask token."""
        tokens, rope, grid = self._embed(x, masks)
        tokens = self._run_blocks(tokens, rope, list(self.vit.blocks))
        return self._split(tokens, grid)

    def forward(self, x: Tensor) -> Tensor:
        """The class token (B, D): the default image embedding."""
        return self.forward_features(x).cls

    @torch.no_grad()
    def last_attention(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Attention probabilities of the last block, (B, heads, T, T), and the patch grid.

        Token order is [class, registers..., patches...]. The last block is run with timm's
        non-fused attention path so the softmax output can be observed at its dropout module.
        """
        tokens, rope, grid = self._embed(x, None)
        blocks = list(self.vit.blocks)
        tokens = self._run_blocks(tokens, rope, blocks[:-1])
        attn_module = blocks[-1].attn
        captured: list[Tensor] = []
        with _non_fused(attn_module):
            handle = attn_module.attn_drop.register_forward_hook(lambda m, i, o: captured.append(i[0]))
            try:
                self._run_blocks(tokens, rope, blocks[-1:])
            finally:
                handle.remove()
        if not captured:
            raise RuntimeError(f"backbone '{self.name}': could not capture attention of the last block")
        return captured[0], grid


@contextmanager
def _non_fused(attn: nn.Module):
    previous = getattr(attn, "fused_attn", None)
    if previous is not None:
        attn.fused_attn = False
    try:
        yield
    finally:
        if previous is not None:
            attn.fused_attn = previous
