"""medfoundry.eval: evaluators over fixed features (numpy arrays or torch tensors).

kNN (DINO), linear probe (CLIP/DINOv2 protocol), metrics with bootstrap CIs, view retrieval
(DINO-X) and recall@k, representation health (RankMe, DINO collapse indicators) and training
monitors (entropy wall, prototype collapse, representation collapse).
"""

from .health import effective_rank, representation_health
from .knn import knn_classify, knn_evaluate
from .linear_probe import DEFAULT_CS, linear_probe
from .metrics import accuracy, auc_roc, balanced_accuracy, bootstrap_ci
from .monitors import CollapseDetector, EntropyWallDetector, PrototypeCollapseDetector, RepresentationHealthError
from .retrieval import dinox_view_retrieval, retrieval_recall_at_k

__all__ = [
    "DEFAULT_CS",
    "CollapseDetector",
    "EntropyWallDetector",
    "PrototypeCollapseDetector",
    "RepresentationHealthError",
    "accuracy",
    "auc_roc",
    "balanced_accuracy",
    "bootstrap_ci",
    "dinox_view_retrieval",
    "effective_rank",
    "knn_classify",
    "knn_evaluate",
    "linear_probe",
    "representation_health",
    "retrieval_recall_at_k",
]
