"""Detectors that watch the training-metrics stream and say what to change.

Two failure modes of DINO-style self-distillation (Caron et al. 2021) are caught early:

* the *entropy wall*: the teacher output (after centering and sharpening) stays near the uniform
  distribution, so the student is trained towards a flat target and learns nothing. DINO-X
  reports this on medical CT, where low-variance intensity statistics let the fast-moving center
  cancel the teacher logits; a slower center (momentum 0.999 instead of 0.9) is the known fix.
* *representation collapse*: the per-dimension std of normalised features (DINO's collapse
  indicator) or the fraction of active dimensions falls towards zero. The KoLeo regulariser
  (Sablayrolles et al., ICLR 2019; used in DINOv2, Oquab et al. 2023) spreads features apart.

Each detector is fed one logged value per call, fires at most once, and either returns the
advice as a string or, with ``fatal=True``, raises :class:`RepresentationHealthError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["CollapseDetector", "EntropyWallDetector", "RepresentationHealthError"]


class RepresentationHealthError(RuntimeError):
    """Raised by a detector created with ``fatal=True`` when training has entered a failure mode."""


class _PatienceDetector:
    """Counts consecutive unhealthy logged steps after a warm-up and fires once."""

    def __init__(self, after_steps: int, patience: int, fatal: bool) -> None:
        if patience < 1:
            raise ValueError("patience must be >= 1")
        self.after_steps = int(after_steps)
        self.patience = int(patience)
        self.fatal = bool(fatal)
        self.fired = False
        self.consecutive = 0
        self.first_bad_step: int | None = None

    def reset(self) -> None:
        """Forget the history, including whether the detector has fired."""
        self.fired = False
        self.consecutive = 0
        self.first_bad_step = None

    def _step(self, step: int, unhealthy: bool) -> bool:
        """Advance the counter; True exactly when the detector should fire now."""
        if self.fired or step < self.after_steps:
            return False
        if not unhealthy:
            self.consecutive = 0
            self.first_bad_step = None
            return False
        if self.consecutive == 0:
            self.first_bad_step = step
        self.consecutive += 1
        return self.consecutive >= self.patience

    def _fire(self, message: str) -> str:
        self.fired = True
        if self.fatal:
            raise RepresentationHealthError(message)
        return message


class EntropyWallDetector(_PatienceDetector):
    """Detects DINO-X's "entropy wall": a near-uniform teacher output that stalls self-distillation.

    The teacher distribution over ``K = num_prototypes`` prototypes has entropy at most ``log K``
    (nats), reached by the uniform distribution. After ``after_steps`` training steps, if the logged
    teacher entropy stays above ``threshold_frac * log K`` for ``patience`` consecutive logged values,
    :meth:`update` returns (once) a warning recommending a slower teacher center, ``center momentum
    0.999`` (``dino.center_momentum=0.999``), the fix DINO-X found for medical CT. Non-finite values are
    ignored. ``fatal=True`` raises :class:`RepresentationHealthError` instead of returning.
    """

    def __init__(
        self,
        num_prototypes: int,
        after_steps: int = 200,
        patience: int = 50,
        threshold_frac: float = 0.98,
        fatal: bool = False,
        metric_key: str = "teacher_entropy",
    ) -> None:
        if num_prototypes < 2:
            raise ValueError("num_prototypes must be >= 2")
        if not 0.0 < threshold_frac <= 1.0:
            raise ValueError("threshold_frac must be in (0, 1]")
        super().__init__(after_steps, patience, fatal)
        self.num_prototypes = int(num_prototypes)
        self.threshold_frac = float(threshold_frac)
        self.max_entropy = math.log(self.num_prototypes)
        self.threshold = self.threshold_frac * self.max_entropy
        self.metric_key = metric_key

    def update(self, step: int, teacher_entropy: float) -> str | None:
        """Feed the teacher-output entropy (nats) logged at ``step``; returns the warning when it fires."""
        value = float(teacher_entropy)
        if not math.isfinite(value):
            return None
        if not self._step(step, value > self.threshold):
            return None
        return self._fire(
            f"Entropy wall detected at step {step}: teacher output entropy {value:.4f} nats has stayed "
            f"above {self.threshold_frac:.0%} of the maximum log(K) = {self.max_entropy:.4f} "
            f"(K = {self.num_prototypes} prototypes) for {self.consecutive} consecutive logged steps since "
            f"step {self.first_bad_step}. The teacher output is near-uniform (the 'entropy wall'), so the "
            "student is distilled towards a flat target and the representation stops improving. Known fix "
            "for medical CT (DINO-X): slow down teacher centering with center momentum 0.999 instead of "
            "0.9 -- set `dino.center_momentum=0.999` (e.g. as a command-line override) and restart from the "
            "last healthy checkpoint."
        )

    def observe(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """Like :meth:`update`, reading ``metrics[self.metric_key]``; a missing key is ignored."""
        if self.metric_key not in metrics:
            return None
        return self.update(step, metrics[self.metric_key])


class CollapseDetector(_PatienceDetector):
    """Detects representation collapse from DINO's feature-std indicator and the active-dimension fraction.

    After ``after_steps`` steps, a logged step is unhealthy when ``feature_std`` (mean per-dimension std of
    L2-normalised features, Caron et al. 2021) is below ``min_feature_std`` or, when given,
    ``active_dims_frac`` is below ``min_active_dims_frac``. After ``patience`` consecutive unhealthy logged
    steps :meth:`update` returns (once) a warning recommending the KoLeo regulariser
    (``dino.koleo_weight=0.1``; Sablayrolles et al. 2019, DINOv2). Non-finite values are ignored.
    ``fatal=True`` raises :class:`RepresentationHealthError` instead of returning.
    """

    def __init__(
        self,
        min_feature_std: float = 0.01,
        min_active_dims_frac: float = 0.1,
        after_steps: int = 200,
        patience: int = 50,
        fatal: bool = False,
        std_key: str = "feature_std",
        active_key: str = "active_dims_frac",
    ) -> None:
        super().__init__(after_steps, patience, fatal)
        self.min_feature_std = float(min_feature_std)
        self.min_active_dims_frac = float(min_active_dims_frac)
        self.std_key = std_key
        self.active_key = active_key

    def update(self, step: int, feature_std: float, active_dims_frac: float | None = None) -> str | None:
        """Feed the collapse statistics logged at ``step``; returns the warning when it fires."""
        std = float(feature_std)
        frac = None if active_dims_frac is None else float(active_dims_frac)
        if not math.isfinite(std) or (frac is not None and not math.isfinite(frac)):
            return None
        low_std = std < self.min_feature_std
        few_dims = frac is not None and frac < self.min_active_dims_frac
        if not self._step(step, low_std or few_dims):
            return None
        reasons = []
        if low_std:
            reasons.append(f"feature std {std:.4g} < {self.min_feature_std:g}")
        if few_dims:
            reasons.append(f"active-dimension fraction {frac:.3f} < {self.min_active_dims_frac:g}")
        return self._fire(
            f"Representation collapse detected at step {step}: {' and '.join(reasons)} for "
            f"{self.consecutive} consecutive logged steps since step {self.first_bad_step}. The features are "
            "collapsing to a point or a low-dimensional subspace. Remedy: add the KoLeo regulariser, which "
            "spreads features apart -- set `dino.koleo_weight=0.1` -- and restart from the last healthy "
            "checkpoint."
        )

    def observe(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """Like :meth:`update`, reading ``metrics[self.std_key]`` (and ``self.active_key`` if present)."""
        if self.std_key not in metrics:
            return None
        return self.update(step, metrics[self.std_key], metrics.get(self.active_key))
