"""FLOP accounting: the analytic ViT formula, ``torch.utils.flop_counter`` measurement, and peak FLOP/s.

Conventions (as in Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1, and the
PaLM paper's MFU appendix, Chowdhery et al. 2022, appendix B): one multiply-accumulate is 2 FLOPs;
only matrix products (linear layers, the patch-embedding convolution, the two attention products) are
counted; norms, softmax, activations, position-embedding resampling and the optimizer are not. This
is also what :class:`torch.utils.flop_counter.FlopCounterMode` counts (mm/addmm/bmm/convolution and
the fused attention kernels), so the two can be cross-checked.

Analytic forward FLOPs of a ViT (Dosovitskiy et al. 2021) on one ``H x W`` image, patch ``p``, ``C``
input channels, width ``D``, ``L`` blocks, MLP ratio ``r``, ``P = (H/p)(W/p)`` patches and
``N = P + prefix`` tokens (class + register tokens)::

    patch embed   2 * P * (C * p^2) * D
    per block     2 * (4 * N * D^2 + 2 * N^2 * D)      qkv (3ND^2) + output proj (ND^2) + QK^T and AV (N^2 D each)
                + 2 * 2 * N * D * (r * D)              MLP fc1 and fc2 (x 3 instead of x 2 for a SwiGLU MLP)
    total         patch embed + L * per block          (the final norm and pooling count 0)

A linear layer's backward costs twice its forward (input and weight gradients), so a training step
is counted as 3x the forward of what gets gradients plus 1x the forward of what does not (the DINO
teacher); the first layer needs no input gradient (images do not require grad), so the student's
patch embedding counts 2x. ``FlopCounterMode`` counts the attention backward as 2.5x its forward
(the fused kernels recompute the scores), so measured training FLOPs exceed the analytic ones by half
the attention-product share (about 1% for ViT-B at 224 px). MFU uses the measured count.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medfoundry.config.schema import HeadConfig

# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's data sheets, FLOP/s: (bf16, tf32).
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 494.7e12),
    "H100 NVL": (835e12, 417.5e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494.7e12),  # SXM (the name reported by SXM boards carries no form factor)
    "A100": (312e12, 156e12),
}


@dataclass(frozen=True)
class ViTShape:
    """What the analytic formula needs to know about a ViT."""

    dim: int
    depth: int
    mlp_hidden: int  # r * D
    patch: int
    in_chans: int
    prefix_tokens: int  # class + register tokens
    gated_mlp: bool = False  # SwiGLU MLP (three D x rD matrices instead of two)

    @classmethod
    def from_backbone(cls, backbone: nn.Module) -> ViTShape:
        """Read the shape off a :class:`medfoundry.models.backbone.Backbone` (its timm ViT/Eva)."""
        vit = backbone.vit
        mlp = vit.blocks[0].mlp
        gated = hasattr(mlp, "fc1_g")
        hidden = (mlp.fc1_g if gated else mlp.fc1).out_features
        return cls(dim=backbone.embed_dim, depth=backbone.depth, mlp_hidden=hidden, patch=backbone.patch_size,
                   in_chans=backbone.in_chans, prefix_tokens=int(vit.num_prefix_tokens), gated_mlp=gated)


def patch_embed_flops(shape: ViTShape, height: int, width: int) -> float:
    """FLOPs of the patch-embedding convolution on one image."""
    patches = (height // shape.patch) * (width // shape.patch)
    return 2.0 * patches * shape.in_chans * shape.patch**2 * shape.dim


def transformer_block_flops(tokens: int, dim: int, mlp_hidden: int, gated_mlp: bool = False) -> float:
    """Forward FLOPs of one pre-norm transformer block on ``tokens`` tokens (see the module docstring)."""
    n, d = float(tokens), float(dim)
    return 2.0 * (4.0 * n * d * d + 2.0 * n * n * d) + (3.0 if gated_mlp else 2.0) * 2.0 * n * d * mlp_hidden


def vit_forward_flops(shape: ViTShape, height: int, width: int) -> float:
    """Analytic forward FLOPs of the ViT on one ``height x width`` image."""
    tokens = (height // shape.patch) * (width // shape.patch) + shape.prefix_tokens
    block = transformer_block_flops(tokens, shape.dim, shape.mlp_hidden, shape.gated_mlp)
    return patch_embed_flops(shape, height, width) + shape.depth * block


def dino_head_flops(in_dim: int, cfg: HeadConfig) -> float:
    """Forward FLOPs of a :class:`~medfoundry.models.heads.DINOHead` on one token."""
    dims = [in_dim] + [cfg.hidden_dim] * (cfg.nlayers - 1) + [cfg.bottleneck_dim, cfg.out_dim]
    return 2.0 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def dino_step_flops(shape: ViTShape, head: HeadConfig, batch: int, n_global: int, global_size: int,
                    n_local: int, local_size: int, masked_patches: int = 0,
                    ibot_head: HeadConfig | None = None) -> dict[str, float]:
    """Analytic FLOPs of one DINO-family training step (student fwd+bwd, teacher fwd, heads).

    ``masked_patches``: iBOT-masked patch tokens in the batch (they go through the iBOT head of both
    student and teacher); ``ibot_head``: its config when separate from ``head``.

    Returns ``{"student_forward", "teacher_forward", "train_step"}``.
    """
    g = vit_forward_flops(shape, global_size, global_size)
    loc = vit_forward_flops(shape, local_size, local_size) if n_local else 0.0
    crops = batch * (n_global + n_local)
    h_cls = dino_head_flops(shape.dim, head)
    h_patch = dino_head_flops(shape.dim, ibot_head or head) * masked_patches
    student = batch * (n_global * g + n_local * loc) + crops * h_cls + h_patch
    teacher = batch * n_global * g + batch * n_global * h_cls + h_patch
    embed = batch * (n_global * patch_embed_flops(shape, global_size, global_size)
                     + n_local * patch_embed_flops(shape, local_size, local_size))
    return {"student_forward": student, "teacher_forward": teacher, "train_step": 3 * student - embed + teacher}


def text_transformer_forward_flops(tokens: int, width: int, layers: int, mlp_ratio: float, out_dim: int) -> float:
    """Analytic forward FLOPs of a CLIP text transformer on one text of ``tokens`` tokens (embedding lookups
    count 0; the projection is applied to the pooled EOT token only)."""
    return layers * transformer_block_flops(tokens, width, int(round(mlp_ratio * width))) + 2.0 * width * out_dim


def _cpu_sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cpu_sdpa_mapping() -> dict:
    """Formulas for the CPU fused-attention kernels, which ``FlopCounterMode`` does not list itself
    (torch's own counting functions, given the argument shapes)."""
    aten = torch.ops.aten
    mapping: dict[Any, Callable] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return mapping


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(FLOPs counted by :class:`torch.utils.flop_counter.FlopCounterMode` while running ``fn()``, its result).

    The CPU flash-attention kernels are added to the counter's table so CPU and GPU counts agree.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
        out = fn()
    return int(counter.get_total_flops()), out


def gpu_peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s, label) of a CUDA device from :data:`GPU_PEAKS`, or (None, why) when unknown."""
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in GPU_PEAKS.items():
        if key.lower() in name.lower():
            peak = bf16 if precision == "bf16" else tf32
            return peak, f"{key} {'bf16' if precision == 'bf16' else 'tf32'} dense {peak / 1e12:.0f} TFLOP/s"
    return None, f"no peak known for '{name}' (give --peak-tflops)"


def nominal_cpu_peak_flops(threads: int | None = None) -> tuple[float, str]:
    """A nominal fp32 peak of this CPU: threads x clock x FLOPs/cycle/core, and how it was derived.

    FLOPs per cycle per core: 64 with AVX-512 (two 16-lane FMA pipes), 32 with AVX2+FMA, 8 otherwise;
    the clock is the first ``cpu MHz`` of ``/proc/cpuinfo`` (2.5 GHz when absent). A nominal figure,
    not a measurement: cores with half-width AVX-512 units or turbo clocks make it off by up to 2x.
    """
    threads = threads or torch.get_num_threads()
    mhz, flags = 2500.0, ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz") and mhz == 2500.0:
                    mhz = float(line.split(":")[1])
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    words = set(flags.split())
    per_cycle = 64 if "avx512f" in words else 32 if {"avx2", "fma"} <= words else 8
    peak = threads * mhz * 1e6 * per_cycle
    plural = "s" if threads > 1 else ""
    return peak, (f"nominal CPU fp32 peak: {threads} thread{plural} x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle"
                  f" = {peak / 1e9:.0f} GFLOP/s")


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """The peak FLOP/s MFU is measured against: ``override_tflops`` if given, the GPU table, or the
    nominal CPU peak (:func:`nominal_cpu_peak_flops`)."""
    if override_tflops:
        return override_tflops * 1e12, f"given {override_tflops:g} TFLOP/s"
    if device.type == "cuda":
        return gpu_peak_flops(device, precision)
    return nominal_cpu_peak_flops()


def cpu_threads() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
