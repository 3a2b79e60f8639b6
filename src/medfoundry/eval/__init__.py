"""medfoundry.eval: evaluators over fixed features (numpy arrays or torch tensors).

kNN (DINO), linear probe (CLIP/DINOv2 protocol), metrics with bootstrap CIs, view retrieval
(DINO-X) and recall@k, representation health (RankMe, DINO collapse indicators) and training
monitors (entropy wall, prototype collapse, representation collapse).

The names below are imported on first use (PEP 562 module ``__getattr__``), not when the package is: a module
that needs one evaluator (``train`` needs the monitors' exception class) then pays for that module only, not for
scikit-learn and scipy behind the probe and the metrics. The probe function is
``medfoundry.eval.linear_probe.linear_probe``: ``medfoundry.eval.linear_probe`` is its module.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule defining it
_EXPORTS = {
    "effective_rank": "health",
    "representation_health": "health",
    "knn_classify": "knn",
    "knn_evaluate": "knn",
    "DEFAULT_CS": "linear_probe",
    "accuracy": "metrics",
    "auc_roc": "metrics",
    "balanced_accuracy": "metrics",
    "bootstrap_ci": "metrics",
    "CollapseDetector": "monitors",
    "EntropyWallDetector": "monitors",
    "PrototypeCollapseDetector": "monitors",
    "RepresentationHealthError": "monitors",
    "dinox_view_retrieval": "retrieval",
    "retrieval_recall_at_k": "retrieval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access (``medfoundry.eval.linear_probe`` and so on)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medfoundry.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
