"""Pre-emption: SIGTERM/SIGUSR1 (and a first Ctrl-C) ask every rank to checkpoint and exit together with a
distinct code.

SLURM sends the signal to every task, but not at the same instant, and a user's ``kill`` may reach one
rank only. The request is therefore agreed across ranks every step (:func:`agree_step`, one small
all-reduce that also carries the non-finite-loss flag the loop already synchronised on), so all ranks
see it at the same step, enter the checkpoint's collectives together, and exit with
:data:`PREEMPTED_EXIT_CODE`. The SLURM script written by ``medfoundry launch --slurm`` requeues the job on
that code, and the rerun resumes from the checkpoint.

Ctrl-C (SIGINT) in the main thread is treated the same way, so an interactive run stopped by hand keeps its
last steps: the first press checkpoints at the end of the step and exits with :data:`PREEMPTED_EXIT_CODE`; a
second press while that is under way raises ``KeyboardInterrupt`` at once (the previous checkpoint stays).
"""

from __future__ import annotations

import contextlib
import signal
import sys

import torch

#: Exit status of a run stopped by a pre-emption signal after writing its checkpoint (sysexits EX_TEMPFAIL:
#: "a temporary failure; retry"). Distinct from 0 (finished), 1 (crash), 2 (user error), 3 (run unhealthy).
PREEMPTED_EXIT_CODE = 75

PREEMPT_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class StopFlag:
    """Records SIGTERM/SIGUSR1 and a first Ctrl-C (installed on construction, undone by :meth:`restore`)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}
        for sig in (*PREEMPT_SIGNALS, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
            sys.stderr.write("\nCtrl-C: writing a checkpoint at the end of this step, then stopping "
                             "(press Ctrl-C again to stop at once)\n")
        self.requested = True
        self.signum = signum

    def restore(self) -> None:
        """Put the previous handlers back, unless a stop was requested (then ignore further pre-emption signals).

        After a pre-emption the process is about to exit with :data:`PREEMPTED_EXIT_CODE`; a second signal
        (SLURM signals every task, a user may press twice) must not kill it with the default action on the
        way out. Python resets its own handlers to the default during interpreter shutdown but keeps
        ``SIG_IGN``, so that is what is installed.
        """
        for sig, handler in self._previous.items():
            keep_ignoring = self.requested and sig != signal.SIGINT  # Ctrl-C on the way out still interrupts
            signal.signal(sig, signal.SIG_IGN if keep_ignoring else handler)


def agree_flags(loss: torch.Tensor, stop_requested: bool, device: torch.device) -> torch.Tensor:
    """``[non-finite count, stop count]`` over all ranks, as a ``(2,)`` float tensor on ``device``; no host read.

    One all-reduce (sum) of this rank's two flags, so a single rank's signal or NaN is seen by all.
    Without a process group it is the local answer.
    """
    flags = torch.stack([(~torch.isfinite(loss.detach())).any().float(),
                         torch.full((), float(stop_requested), device=loss.device)]).to(device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags)
    return flags


def agree_step(loss: torch.Tensor, stop_requested: bool, device: torch.device) -> tuple[bool, bool]:
    """``(loss finite on every rank, stop requested on any rank)``: :func:`agree_flags` read on the host."""
    bad, stop = agree_flags(loss, stop_requested, device).tolist()
    return bad == 0, stop > 0
