"""The optimizer-update half of a training step, shared by :func:`medfoundry.train.loop.train` and the step
benchmark (:mod:`medfoundry_cli.bench.step`), so the benchmark times the loop's own code and not a copy.

Host syncs: with ``train.nonfinite_check=host`` the loop's forward/backward reads one pair of flags per
micro-batch (:func:`~medfoundry.train.preemption.agree_step`: every rank's loss finite, a stop requested on any
rank) and skips a non-finite step on the host; with ``device`` (the default on a GPU) the flags stay on the
device and :func:`update` skips the step there (``skip``), so the step reads nothing
(:mod:`medfoundry.train.nonfinite`). Everything else of the update stays on the device: the gradient norm
(:func:`clip_gradients`), the all-reduced metrics and the
loss (:func:`update`) are tensors, read with **one** host transfer (:func:`read_metrics`) only where a float is
needed: at logging steps (``train.log_every``, the last step) and at the steps a hook asks for
(:func:`medfoundry.eval.hooks.wants_step`: an in-training evaluation's steps; the health monitors observe the
logged steps). Before, the norm, the metrics and the loss were read separately, three syncs every step, and
every step whenever a hook was configured.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def clip_gradients(params: list[Tensor], max_norm: float) -> Tensor:
    """The total gradient norm of ``params`` (those with a gradient) as a 0-dim tensor on their device, after
    clipping to ``max_norm`` (no clipping when ``max_norm <= 0``); no host sync (the loop reads it with the
    other metrics). 0 when no parameter has a gradient."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor -> a tensor


def reduce_metrics(out: dict, device: torch.device) -> dict[str, Tensor]:
    """Every one-element tensor of ``out`` as a 0-dim float tensor on ``device``, averaged over ranks with one
    all-reduce under DDP; stays on the device (no host sync)."""
    keys = sorted(k for k, v in out.items() if isinstance(v, Tensor) and v.numel() == 1)
    if not keys:
        return {}
    values = torch.stack([out[k].detach().float().reshape(()).to(device) for k in keys])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return dict(zip(keys, values.unbind()))


def read_metrics(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    """``metrics`` as Python floats, with one host transfer for all tensors (non-finite values become NaN)."""
    keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    host: dict[str, float] = {}
    if keys:
        device = metrics[keys[0]].device
        stacked = torch.stack([metrics[k].detach().float().reshape(()).to(device) for k in keys])
        host = dict(zip(keys, stacked.tolist()))
    return {k: (x if math.isfinite(x) else float("nan")) if (x := host.get(k)) is not None else float(v)
            for k, v in metrics.items()}


def update(method: nn.Module, optimizer: torch.optim.Optimizer, params: list[Tensor], out: dict[str, Tensor],
           step: int, clip_grad: float, device: torch.device, skip: Tensor | None = None) -> dict[str, Tensor]:
    """The optimizer update of a step whose gradients are accumulated: ``before_optimizer_step``, clipping,
    ``optimizer.step()``, ``zero_grad``, ``after_optimizer_step``; returns the step's device metrics: ``out``'s
    scalars all-reduced (:func:`reduce_metrics`), ``grad_norm`` and ``_local_loss`` (this rank's loss, for the
    progress bar; not logged). No host sync.

    ``skip`` (``train.nonfinite_check=device``): a 0-dim float tensor on the device, 1 when the step's loss was
    not finite. The update then changes nothing, decided on the device: the fused AdamW skips its step on
    ``found_inf`` (its step count and moments untouched, as under ``torch.amp.GradScaler``) and the method's
    ``after_optimizer_step(step, applied=1 - skip)`` gates its EMA teacher and centres by ``applied``."""
    method.before_optimizer_step(step)  # frozen-for-now grads are dropped before the norm is taken
    grad_norm = clip_gradients(params, clip_grad)
    if skip is None:
        optimizer.step()
    else:
        optimizer.found_inf, optimizer.grad_scale = skip, None  # read by the fused kernels (torch.optim.adam)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    optimizer.zero_grad(set_to_none=True)
    if skip is None:
        method.after_optimizer_step(step)
    else:
        method.after_optimizer_step(step, applied=1.0 - skip)
    metrics = reduce_metrics(out, device)
    metrics["grad_norm"] = grad_norm.detach().float().reshape(()).to(device)
    metrics["_local_loss"] = out["loss"].detach().float().reshape(()).to(device)
    return metrics


__all__ = ["clip_gradients", "read_metrics", "reduce_metrics", "update"]
