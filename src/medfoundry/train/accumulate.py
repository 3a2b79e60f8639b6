"""Gradient accumulation: one optimizer step over ``train.grad_accum_steps`` micro-batches of ``train.batch_size``.

Each micro-batch's loss is scaled by ``1 / N`` before its backward, so the summed gradient is the gradient of
the mean loss over the ``N x batch_size`` samples of the step. The loader counts micro-batches: step ``s``
reads micro-batches ``s N ... s N + N - 1``, i.e. run samples ``s N B ... (s + 1) N B - 1``
(:class:`medfoundry.data.views.StepBatchSampler`), exactly the samples one batch of ``N B`` holds at step ``s``,
each augmented under its own seed. Schedules, the EMA teacher and centre updates, logging, hooks and
checkpoints count optimizer steps; the data position is ``step x N`` micro-batches, so resume stays exact.

The step equals the big batch wherever the loss is a mean of per-sample terms: the DINO and iBOT
cross-entropies with centering (the centres are updated once per step from the teacher outputs of all
micro-batches, ``Method.start_step`` / ``after_optimizer_step``), the Gram and distillation feature losses.
Terms that couple the samples of a batch are computed per micro-batch, as DINOv2 computes them per GPU: KoLeo
(nearest neighbours within the micro-batch), the KDE term, and Sinkhorn-Knopp targets (normalised over the
micro-batch; over all ranks of it under DDP). Logged metrics are means over the micro-batches. CLIP's
contrastive loss couples every pair of the batch, so ``method: clip`` refuses ``grad_accum_steps > 1``.

Under DDP the first ``N - 1`` backward passes run in ``no_sync()`` and the last one all-reduces the summed
gradients; FSDP reduce-scatters after every micro-batch (gradients stay sharded; more communication, no
extra memory), as torchtitan does by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from medfoundry.precision import autocast
from medfoundry.train.preemption import agree_flags, agree_step


def scaled_loss(loss: Tensor, n_micro: int) -> Tensor:
    """The loss to backpropagate for one of ``n_micro`` micro-batches: ``loss / n_micro`` (unchanged when 1)."""
    return loss / n_micro if n_micro > 1 else loss


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: DDP's ``no_sync()`` unless ``sync`` (the step's last one)."""
    if not sync and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    yield


class StepOutputs:
    """The outputs of one optimizer step's micro-batches: whether all were finite, a stop request, the image
    count, and the mean of each scalar output (``loss`` and the metrics) over the micro-batches.

    With ``defer`` (``train.nonfinite_check=device``) nothing is read on the host: every micro-batch runs its
    backward, and :attr:`flags` holds the step's ``[non-finite count, stop count]`` on the device for
    :func:`medfoundry.train.step.update` (``skip``) and :class:`~medfoundry.train.nonfinite.DeferredFlags`;
    :attr:`finite` and :attr:`stop` then stay True and False."""

    def __init__(self, n_micro: int = 1, defer: bool = False) -> None:
        self.n_micro = n_micro
        self.defer = defer
        self.finite = True
        self.stop = False
        self.flags: Tensor | None = None
        self.images = 0
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def forward_backward(self, model: nn.Module, batch: dict, step: int, last: bool, stop_requested: bool,
                         precision: str, device: torch.device) -> None:
        """One micro-batch: forward under autocast, agree with the other ranks whether its loss is finite and
        whether a stop was requested (:func:`~medfoundry.train.preemption.agree_step`, the micro-batch's one host
        sync; deferred: :func:`~medfoundry.train.preemption.agree_flags`, no host read), then backward of the
        loss scaled by ``1 / n_micro`` (gradients synchronised on the ``last`` one)."""
        with gradient_sync(model, last):
            with autocast(precision, device):
                out = model(batch, step)
            if self.defer:  # a non-finite loss gives non-finite gradients; the update is skipped on the device
                flags = agree_flags(out["loss"], stop_requested, device)
                self.flags = flags if self.flags is None else self.flags + flags
                scaled_loss(out["loss"], self.n_micro).backward()
                self.add(out)
                return
            finite, stop = agree_step(out["loss"], stop_requested, device)
            self.stop = self.stop or stop
            self.finite = self.finite and finite
            if finite:
                scaled_loss(out["loss"], self.n_micro).backward()
                self.add(out)

    @property
    def skip(self) -> Tensor | None:
        """Deferred mode: a 0-dim float tensor on the device, 1 when any micro-batch was non-finite (else None)."""
        return None if self.flags is None else (self.flags[0] > 0).float()

    def add(self, out: dict[str, Tensor]) -> None:
        """Record one finite micro-batch's ``{"loss", metrics}`` (detached; one-element tensors only)."""
        for key, value in out.items():
            if not isinstance(value, Tensor) or value.numel() != 1:
                continue
            value = value.detach()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._counts[key] = self._counts.get(key, 0) + 1

    def mean(self) -> dict[str, Tensor]:
        """Each output's mean over the micro-batches that gave it (the tensor itself for one micro-batch)."""
        return {k: v / self._counts[k] if self._counts[k] > 1 else v for k, v in self._sums.items()}


__all__ = ["StepOutputs", "gradient_sync", "scaled_loss"]
