"""The non-finite-loss guard of the training loop: skip a step whose loss is not finite, stop after too many.

Two ways to know whether a step's loss was finite (``train.nonfinite_check``):

* ``host``: the loop reads the step's flags (non-finite on any rank, stop requested on any rank) right after
  each micro-batch's forward (:func:`~medfoundry.train.preemption.agree_step`) and skips the backward and the
  update on the host. On a CPU this costs nothing; on a GPU the read waits for the queued forward, one
  pipeline drain per micro-batch.
* ``device``: nothing is read in the step. The flags stay on the device, the update is skipped there
  (:func:`medfoundry.train.step.update` with ``skip``: the fused optimizer's ``found_inf``, as
  ``torch.amp.GradScaler`` uses it, and the method's EMA teacher and centres gated by the same flag), and the
  host learns a step's flags one step late (:class:`DeferredFlags`: a copy to pinned memory and a CUDA event,
  waited for after the next step is queued, so the GPU never idles for it), or at once on the steps where the
  host must act (logging, a hook, a checkpoint, the last step, a stop). The weights, optimizer state, teacher
  and centres after a skipped step are bit-identical to before it, as in ``host`` mode; what moves is *when*
  the host hears of it: a warning, the ``train.max_nonfinite_steps`` stop and a pre-emption stop can come one
  step later than in ``host`` mode (never after the step's checkpoint or log line, which wait for them).

``auto`` (the default) is ``device`` on a CUDA device with AdamW (fused there) outside FSDP, else ``host``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from medfoundry.config.loader import ConfigError


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` non-finite losses in a row."""


def resolve_check(mode: str, device: torch.device, optimizer: torch.optim.Optimizer, sharded: bool) -> str:
    """``host`` or ``device`` for ``train.nonfinite_check`` = ``mode`` (``auto``, ``host``, ``device``).

    ``device`` needs an optimizer that can skip its own step on a device flag: a fused AdamW (``found_inf``).
    Fused SGD leaves an uninitialised momentum buffer when its very first step is skipped, and FSDP's DTensor
    parameters are not yet tested with ``found_inf``, so both stay on ``host``; asking for ``device`` there
    raises a :class:`~medfoundry.config.loader.ConfigError` naming the key.
    """
    fused_adamw = isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))
    if mode == "auto":
        return "device" if device.type == "cuda" and fused_adamw and not sharded else "host"
    if mode == "device" and (not fused_adamw or sharded):
        why = "FSDP (dist.strategy=fsdp)" if sharded else f"optimizer {type(optimizer).__name__}"
        raise ConfigError(f"train.nonfinite_check=device is not supported with {why}: it needs a fused AdamW "
                         "(optim.name=adamw) outside FSDP; use train.nonfinite_check=host (or auto)")
    return mode


@dataclass
class StepFlags:
    """What the host learns about one optimizer step: ``step`` (1-based), whether it was finite, a stop request."""

    step: int
    finite: bool
    stop: bool


class DeferredFlags:
    """Per-step device flags ``[non-finite count, stop count]`` read back without draining the device queue.

    :meth:`push` starts an asynchronous copy to (pinned) host memory and records a CUDA event; :meth:`pop`
    waits only for the events of the steps it returns. On the CPU the copy is immediate.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[int, Tensor, object]] = []

    def push(self, step: int, flags: Tensor) -> None:
        """Queue the flags of ``step`` (a ``(2,)`` float tensor on the device)."""
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=self.cuda)
        host.copy_(flags.detach(), non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((step, host, event))

    def pop(self, through: int) -> list[StepFlags]:
        """The flags of every queued step ``<= through``, oldest first (waiting for their copies only)."""
        ready = [p for p in self._pending if p[0] <= through]
        self._pending = [p for p in self._pending if p[0] > through]
        out = []
        for step, host, event in ready:
            if event is not None:
                event.synchronize()
            bad, stop = host.tolist()
            out.append(StepFlags(step, bad == 0, stop > 0))
        return out


class NonfiniteGuard:
    """Counts non-finite steps in a row, warns for each, and raises :class:`NonFiniteLossError` at the limit.

    Args:
        limit: ``train.max_nonfinite_steps``.
        in_a_row: the count restored from a checkpoint.
        warn: how to print a warning (the run logger's ``write``).
        last_checkpoint: the newest checkpoint, named in the error.
    """

    def __init__(self, limit: int, in_a_row: int, warn: Callable[[str], None],
                 last_checkpoint: Callable[[], object]) -> None:
        self.limit = int(limit)
        self.in_a_row = int(in_a_row)
        self.warn = warn
        self.last_checkpoint = last_checkpoint

    def record(self, flags: StepFlags) -> None:
        """Account for one step's outcome (steps in order): a skipped step is warned about and counted."""
        if flags.finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.warn(f"warning: non-finite loss at step {flags.step}; step skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit and not flags.stop:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite losses in a row (train.max_nonfinite_steps={self.limit}); stopping. "
                f"Last good checkpoint: {self.last_checkpoint()}. "
                "Try a lower optim.lr, optim.clip_grad, or train.precision=fp32."
            )


__all__ = ["DeferredFlags", "NonFiniteLossError", "NonfiniteGuard", "StepFlags", "resolve_check"]
