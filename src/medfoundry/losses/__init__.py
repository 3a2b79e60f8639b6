"""medfoundry.losses: self-supervised objectives for DINO-family training.

* :class:`DINOLoss` - image-level self-distillation (Caron et al. 2021; Oquab et al. 2023).
* :class:`IBOTPatchLoss` - masked patch self-distillation (Zhou et al. 2022).
* :func:`sinkhorn_knopp` - balanced teacher targets (Caron et al. 2020, SwAV; DINOv2).
* :class:`KoLeoLoss` - nearest-neighbour spreading (Sablayrolles et al. 2019).
* :class:`KDEUniformityLoss` - kernel-density uniformity (Wang & Isola 2020; Midnight/OpenMidnight).
* :class:`GramLoss` - patch Gram-matrix anchoring (Siméoni et al. 2025, DINOv3).

Cross-rank statistics (teacher centers, Sinkhorn normalisers) are all-reduced explicitly via
``medfoundry.losses._dist``; every helper is a no-op outside ``torch.distributed``.
"""

from .dino import DINOLoss
from .gram import GramLoss
from .ibot import IBOTPatchLoss
from .kde import KDEUniformityLoss
from .koleo import KoLeoLoss
from .sinkhorn import sinkhorn_knopp

__all__ = [
    "DINOLoss",
    "GramLoss",
    "IBOTPatchLoss",
    "KDEUniformityLoss",
    "KoLeoLoss",
    "sinkhorn_knopp",
]
