"""Detectors that watch the training-metrics stream and say what to change.

Three failure modes of DINO-style self-distillation (Caron et al. 2021) are caught early:

* the *entropy wall* (DINO-X): the DINO loss sits near ``ln K`` (K prototypes) for thousands of steps,
  i.e. the student's prediction is no better than uniform against the teacher targets -- the teacher
  output is near-uniform or the student does not follow it, and self-distillation learns nothing. DINO-X's
  troubleshooting advice is a higher learning rate and a look at the teacher/student entropies; on HU/CT
  data at large batch it also uses a slower center (momentum 0.999 instead of DINO's 0.9). Watched:
  ``dino_loss_frac`` = DINO loss / ``ln K``.
* *prototype (head) collapse*: the teacher sends (almost) every image to the same few prototypes. The
  per-sample targets are confident (low entropy) and the DINO loss falls to ~0, while backbone features
  can stay spread out under KoLeo -- so the feature-std indicator below never fires. Seen at small scale
  with DINO-X's center momentum 0.999: the slow center cannot follow the teacher. Watched:
  ``teacher_effective_prototypes_frac`` = exp(entropy of the batch-mean target) / min(K, rows).
* *representation collapse*: the per-dimension std of normalised features (DINO's collapse
  indicator) or the fraction of active dimensions falls towards zero. The KoLeo regulariser
  (Sablayrolles et al., ICLR 2019; used in DINOv2, Oquab et al. 2023) spreads features apart.

Each detector is fed one logged value per call, fires at most once, and either returns the
advice as a string or, with ``fatal=True``, raises :class:`RepresentationHealthError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["CollapseDetector", "EntropyWallDetector", "PrototypeCollapseDetector", "RepresentationHealthError"]


class RepresentationHealthError(RuntimeError):
    """Raised by a detector created with ``fatal=True`` when training has entered a failure mode."""


class _PatienceDetector:
    """Counts consecutive unhealthy observations after a warm-up and fires once.

    ``stride`` is the number of steps one observation stands for (the training loop feeds the logged steps, so
    ``train.log_every``; 1 for a detector fed every evaluation): the detector fires once ``consecutive x stride
    >= patience``, so ``patience`` counts training steps whatever ``train.log_every`` is (with ``log_every=1``
    exactly the consecutive observations)."""

    def __init__(self, after_steps: int, patience: int, fatal: bool) -> None:
        if patience < 1:
            raise ValueError("patience must be >= 1")
        self.after_steps = int(after_steps)
        self.patience = int(patience)
        self.stride = 1
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
        return self.consecutive * self.stride >= self.patience

    def _fire(self, message: str) -> str:
        self.fired = True
        if self.fatal:
            raise RepresentationHealthError(message)
        return message


class EntropyWallDetector(_PatienceDetector):
    """Detects DINO-X's "entropy wall": the DINO loss stays near ``ln K`` and self-distillation stalls.

    The DINO loss is the cross-entropy ``H(teacher, student) = H(teacher) + KL(teacher || student)`` over
    ``K = num_prototypes`` prototypes; a uniform student scores exactly ``ln K`` (nats) against any target,
    and a uniform teacher forces at least ``ln K``. DINO-X describes the wall as the loss sitting near
    ``ln K`` for thousands of steps. After ``after_steps`` training steps, if the logged ``dino_loss_frac``
    (loss / ``ln K``) stays at or above ``threshold_frac`` for ``patience`` consecutive logged values,
    :meth:`update` returns (once) a warning naming DINO-X's fixes: a higher learning rate (``optim.lr=``), a
    sharper teacher (``dino.teacher_temp=0.04``), and -- only when the run centers with a fast center
    (momentum < 0.99, DINO's 0.9) on HU/CT-like data (``hu_data``) -- DINO-X's ``dino.center_momentum=0.999``
    at large batch. Non-finite values are ignored. ``fatal=True`` raises :class:`RepresentationHealthError`
    instead of returning.

    Args:
        num_prototypes: ``K`` (``dino.head.out_dim``).
        after_steps, patience: warm-up and streak length; early DINO training naturally starts near ``ln K``.
        threshold_frac: the loss counts as "at the wall" when ``loss / ln K >= threshold_frac``.
        fatal: raise instead of returning the warning.
        metric_key: the logged key holding loss / ``ln K``.
        center_momentum, centering: the run's ``dino.center_momentum`` and ``dino.centering`` (for the advice).
        hu_data: whether the run trains on HU/CT-like data (HU windows, DICOM/NIfTI volumes).
        lr: the run's ``optim.lr``, to suggest a concrete higher value.
        mean_entropy_key: logged entropy of the batch-mean teacher target, quoted in the message if present.
    """

    def __init__(
        self,
        num_prototypes: int,
        after_steps: int = 200,
        patience: int = 50,
        threshold_frac: float = 0.9,
        fatal: bool = False,
        metric_key: str = "dino_loss_frac",
        center_momentum: float | None = None,
        centering: str = "center",
        hu_data: bool = False,
        lr: float | None = None,
        mean_entropy_key: str = "teacher_mean_entropy",
    ) -> None:
        if num_prototypes < 2:
            raise ValueError("num_prototypes must be >= 2")
        if not 0.0 < threshold_frac <= 1.0:
            raise ValueError("threshold_frac must be in (0, 1]")
        super().__init__(after_steps, patience, fatal)
        self.num_prototypes = int(num_prototypes)
        self.threshold_frac = float(threshold_frac)
        self.max_entropy = math.log(self.num_prototypes)
        self.threshold = self.threshold_frac * self.max_entropy  # in nats of DINO loss
        self.metric_key = metric_key
        self.center_momentum = None if center_momentum is None else float(center_momentum)
        self.centering = centering
        self.hu_data = bool(hu_data)
        self.lr = None if lr is None else float(lr)
        self.mean_entropy_key = mean_entropy_key

    def update(self, step: int, dino_loss_frac: float, teacher_mean_entropy: float | None = None) -> str | None:
        """Feed ``dino_loss / ln K`` logged at ``step`` (and optionally the teacher's batch-mean entropy, nats,
        for the message); returns the warning when it fires."""
        frac = float(dino_loss_frac)
        if not math.isfinite(frac):
            return None
        if not self._step(step, frac >= self.threshold_frac):
            return None
        log_k = self.max_entropy
        teacher = ""
        if teacher_mean_entropy is not None and math.isfinite(float(teacher_mean_entropy)):
            h = float(teacher_mean_entropy)
            teacher = (f" The teacher's batch-mean target entropy is {h:.4f} nats ({h / log_k:.0%} of ln K, "
                       f"~{math.exp(h):.1f} effective prototypes).")
        lr = f"`optim.lr={2 * self.lr:g}` (twice the current {self.lr:g})" if self.lr else "`optim.lr=` (higher)"
        fixes = [f"raise the learning rate, e.g. {lr} -- DINO-X's first advice against the wall",
                 "sharpen the teacher with `dino.teacher_temp=0.04`"]
        if (self.hu_data and self.centering == "center" and self.center_momentum is not None
                and self.center_momentum < 0.99):
            fixes.append(f"on this HU/CT data with center momentum {self.center_momentum:g}, DINO-X's slower "
                         "center `dino.center_momentum=0.999` -- at large batch (64+) and long runs only; at "
                         "small scale a slow center can collapse the head instead")
        return self._fire(
            f"Entropy wall detected at step {step}: the DINO loss {frac * log_k:.4f} nats has stayed at or "
            f"above {self.threshold_frac:.0%} of ln K = {log_k:.4f} (K = {self.num_prototypes} prototypes; now "
            f"{frac:.0%} of ln K) for {self.consecutive} consecutive logged steps since step "
            f"{self.first_bad_step}. The student predicts no better than a uniform distribution against the "
            f"teacher targets (DINO-X's 'entropy wall'), so self-distillation is not learning.{teacher} "
            f"Fixes: {'; '.join(fixes)}. Check the teacher/student entropies (`teacher_entropy`, "
            "`teacher_mean_entropy`) and restart from the last healthy checkpoint."
        )

    def observe(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """Like :meth:`update`, reading ``metrics[self.metric_key]`` (and the teacher mean entropy if present);
        a missing key is ignored."""
        if self.metric_key not in metrics:
            return None
        return self.update(step, metrics[self.metric_key], metrics.get(self.mean_entropy_key))


class PrototypeCollapseDetector(_PatienceDetector):
    """Detects DINO head collapse: the teacher maps (almost) every image to the same few prototypes.

    The logged ``teacher_effective_prototypes_frac`` is ``exp(H(mean teacher target)) / min(K, N)`` over the
    ``N`` teacher rows of a step (1 = every row on its own prototype). After ``after_steps`` steps, if it stays
    below ``min_effective_frac`` for ``patience`` consecutive logged values, :meth:`update` returns (once) a
    warning. The DINO loss then falls to ~0 (confident, identical targets are easy to match) while backbone
    features can look healthy under KoLeo, so neither the entropy wall nor the feature-std collapse detector
    sees it. The advice depends on the run: with ``centering="center"`` and ``center_momentum >= 0.99``
    (DINO-X's 0.999, which holds at its scale: batch 64+, K = 8192, 50k+ steps) the slow center cannot follow
    the teacher at small scale -- ``dino.center_momentum=0.9`` or ``dino.centering=sinkhorn``; otherwise
    ``dino.centering=sinkhorn``, a higher ``dino.teacher_temp`` or fewer prototypes ``dino.head.out_dim``.
    Non-finite values are ignored. ``fatal=True`` raises :class:`RepresentationHealthError` instead.

    Args:
        num_prototypes: ``K`` (``dino.head.out_dim``).
        after_steps, patience: warm-up and streak length.
        min_effective_frac: ``teacher_effective_prototypes_frac`` below this counts as collapsed.
        fatal: raise instead of returning the warning.
        center_momentum, centering: the run's ``dino.center_momentum`` and ``dino.centering`` (for the advice).
        teacher_temp: the run's ``dino.teacher_temp``, to suggest a concrete higher value.
        metric_key, effective_key, distinct_key: logged keys of the fraction, the effective and the distinct
            prototype counts (the last two only enter the message).
    """

    def __init__(
        self,
        num_prototypes: int,
        after_steps: int = 200,
        patience: int = 50,
        min_effective_frac: float = 0.1,
        fatal: bool = False,
        center_momentum: float | None = None,
        centering: str = "center",
        teacher_temp: float | None = None,
        metric_key: str = "teacher_effective_prototypes_frac",
        effective_key: str = "teacher_effective_prototypes",
        distinct_key: str = "teacher_distinct_prototypes",
    ) -> None:
        if num_prototypes < 2:
            raise ValueError("num_prototypes must be >= 2")
        if not 0.0 < min_effective_frac <= 1.0:
            raise ValueError("min_effective_frac must be in (0, 1]")
        super().__init__(after_steps, patience, fatal)
        self.num_prototypes = int(num_prototypes)
        self.min_effective_frac = float(min_effective_frac)
        self.center_momentum = None if center_momentum is None else float(center_momentum)
        self.centering = centering
        self.teacher_temp = None if teacher_temp is None else float(teacher_temp)
        self.metric_key = metric_key
        self.effective_key = effective_key
        self.distinct_key = distinct_key

    def _advice(self) -> str:
        if self.centering == "center" and self.center_momentum is not None and self.center_momentum >= 0.99:
            return (f"This run centers with momentum {self.center_momentum:g}. DINO-X's 0.999 holds at its scale "
                    "(batch 64+, K = 8192, 50k+ steps), but at small scale the slow center cannot follow the "
                    "teacher and the head collapses -- set `dino.center_momentum=0.9` (or "
                    "`dino.centering=sinkhorn`)")
        temp = (f"e.g. `dino.teacher_temp={1.5 * self.teacher_temp:.3g}`, now {self.teacher_temp:g}"
                if self.teacher_temp else "`dino.teacher_temp=`")
        return ("Spread the teacher targets over the prototypes: `dino.centering=sinkhorn` (balanced "
                f"Sinkhorn-Knopp assignments), a higher teacher temperature ({temp}), or fewer prototypes "
                "(`dino.head.out_dim=`)")

    def update(self, step: int, effective_frac: float, effective: float | None = None,
               distinct: float | None = None) -> str | None:
        """Feed ``teacher_effective_prototypes_frac`` logged at ``step`` (and optionally the effective and
        distinct prototype counts, for the message); returns the warning when it fires."""
        frac = float(effective_frac)
        if not math.isfinite(frac):
            return None
        if not self._step(step, frac < self.min_effective_frac):
            return None
        counts = []
        if effective is not None and math.isfinite(float(effective)):
            counts.append(f"{float(effective):.2f} effective prototypes")
        if distinct is not None and math.isfinite(float(distinct)):
            counts.append(f"{float(distinct):.1f} distinct argmax prototypes")
        counts_text = f" ({', '.join(counts)})" if counts else ""
        return self._fire(
            f"Prototype collapse detected at step {step}: the teacher maps (almost) every image to a few of the "
            f"K = {self.num_prototypes} prototypes{counts_text}; the effective-prototype fraction {frac:.3f} has "
            f"stayed below {self.min_effective_frac:g} for {self.consecutive} consecutive logged steps since step "
            f"{self.first_bad_step}. The DINO loss then falls to ~0 (identical confident targets are trivial to "
            "match) while the backbone features can still look healthy under KoLeo, so the representation "
            f"stops learning from the DINO objective. {self._advice()}; restart from the last healthy checkpoint."
        )

    def observe(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """Like :meth:`update`, reading ``metrics[self.metric_key]`` (and the counts if present); a missing key
        is ignored."""
        if self.metric_key not in metrics:
            return None
        return self.update(step, metrics[self.metric_key], metrics.get(self.effective_key),
                           metrics.get(self.distinct_key))


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
