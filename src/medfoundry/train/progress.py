"""Progress of a run as plain lines, for when stderr is not a terminal (a SLURM or CI log file).

A tqdm bar redraws itself with ``\\r``: in a file, a thousand steps end up on three physical lines that
neither ``tail`` nor ``grep`` can read. :class:`PlainProgress` writes one newline-terminated line every
``train.log_every`` steps (and at the last step) instead::

    train step 40/1000 (4%) loss 5.1234 lr 4.99e-04 2.31 steps/s ETA 0:06:55

The rate is measured over the last interval, so the ETA follows the run's current speed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal: there a tqdm bar is right, anywhere else plain lines are."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day), for an ETA."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days} day{'s' if days != 1 else ''}, {clock}" if days else clock


class PlainProgress:
    """Writes one progress line every ``every`` steps and at step ``total`` (see the module docstring)."""

    def __init__(self, start_step: int, total: int, every: int, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.every = max(1, every)
        self.stream = stream
        self.clock = clock
        self.step = start_step
        self._mark = (start_step, clock())

    def update(self, n: int = 1, loss: float | None = None, lr: float | None = None) -> str | None:
        """Advance by ``n`` steps; at a line's step write the line (step/total, loss, lr, steps/s, ETA), return it."""
        self.step += n
        if self.step % self.every and self.step != self.total:
            return None
        now = self.clock()
        last_step, last_time = self._mark
        self._mark = (self.step, now)
        rate = (self.step - last_step) / (now - last_time) if now > last_time else 0.0
        width = len(str(self.total))
        parts = [f"train step {self.step:>{width}}/{self.total} ({100 * self.step // max(1, self.total)}%)"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        if rate > 0:
            parts.append(f"{rate:.3g} steps/s" if rate >= 1 else f"{1 / rate:.3g} s/step")
            parts.append(f"ETA {format_duration((self.total - self.step) / rate)}")
        line = " ".join(parts)
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()
        return line
