"""Training schedules as plain functions of the step (no state: exact resume needs only the step)."""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0,
           warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then cosine to ``end``.

    The cosine reaches ``end`` at ``total_steps - 1``; steps past it stay at ``end``. This is the
    schedule family DINO/DINOv2 use for lr, weight decay and teacher momentum.
    """
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / max(1, warmup_steps)
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def linear_warmup_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``, then ``end`` (teacher temperature)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
