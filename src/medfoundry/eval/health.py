"""Label-free (and optionally label-aware) health statistics of a representation.

These numbers detect the failure modes of joint-embedding self-supervised learning without a
downstream task: complete collapse (all samples map to one point; DINO, Caron et al. 2021, tracks
the per-dimension standard deviation of normalised features for this), dimensional collapse
(features span a low-dimensional subspace; RankMe, Garrido et al., ICML 2023) and inactive output
dimensions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import ArrayLike, _to_labels, _to_numpy

if TYPE_CHECKING:
    from medfoundry.eval.features import FeatureSet
    from medfoundry.eval.registry import EvalInputs

__all__ = ["effective_rank", "health_metrics", "representation_health", "run_task"]

_RANKME_EPS = 1e-7


def effective_rank(feats: ArrayLike) -> float:
    """RankMe effective rank (Garrido et al., "RankMe: Assessing the Downstream Performance of
    Pretrained Self-Supervised Representations by Their Rank", ICML 2023).

    With ``sigma`` the singular values of the ``(N, D)`` feature matrix (no centring, as in the paper),
    ``p_k = sigma_k / sum(sigma) + eps`` and the result is ``exp(-sum_k p_k log p_k)``: a smooth count of
    the dimensions actually used, between ~1 (rank one) and ``min(N, D)`` (flat spectrum). It
    correlates with downstream accuracy and detects dimensional collapse without labels.
    """
    x = _to_numpy(feats).astype(np.float64, copy=False)
    if x.ndim != 2:
        raise ValueError(f"feats must be 2-D (n_samples, dim), got shape {x.shape}")
    sigma = np.linalg.svd(x, compute_uv=False)
    total = sigma.sum()
    if sigma.size == 0 or total <= 0:
        return float("nan")
    p = sigma / total + _RANKME_EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def _class_separation(z: np.ndarray, y: np.ndarray) -> dict[str, float]:
    classes = np.unique(y)
    if classes.size < 2:
        nan = float("nan")
        return {"class_separation": nan, "inter_class_distance": nan, "intra_class_distance": nan}
    centroids = np.stack([z[y == c].mean(axis=0) for c in classes])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    cos = centroids @ centroids.T
    off = ~np.eye(classes.size, dtype=bool)
    inter = float(np.mean(1.0 - cos[off]))
    intra = float(np.mean([np.mean(1.0 - z[y == c] @ centroids[i]) for i, c in enumerate(classes)]))
    ratio = inter / intra if intra > 0 else float("inf")
    return {"class_separation": float(ratio), "inter_class_distance": inter, "intra_class_distance": intra}


def representation_health(
    feats: ArrayLike,
    labels: ArrayLike | None = None,
    active_threshold: float = 0.01,
) -> dict[str, Any]:
    """Collapse and quality diagnostics of an ``(N, D)`` feature matrix.

    Keys:

    * ``active_dims``: number of dimensions whose standard deviation over the samples, computed on the
      *raw* (un-normalised) features, exceeds ``active_threshold`` (0.01); ``active_dims_frac`` is that
      count divided by ``D``. Dead dimensions indicate dimensional collapse.
    * ``mean_pairwise_cosine``: mean cosine similarity over all ordered pairs ``i != j`` (diagonal
      excluded), computed in O(N D) from the sum of normalised features. Near 1 means every sample
      points the same way (collapse).
    * ``feature_std``: mean over dimensions of the per-dimension standard deviation of the
      L2-normalised features, the collapse indicator tracked by DINO (Caron et al. 2021). It tends to
      0 under collapse and is about ``1 / sqrt(D)`` for features spread uniformly on the sphere.
    * ``effective_rank``: RankMe (Garrido et al. 2023), see :func:`effective_rank`, on the raw features.
    * With ``labels``: ``class_separation = inter_class_distance / intra_class_distance``, where, with
      unit-normalised class centroids ``mu_c`` of the L2-normalised features ``z``,
      ``inter_class_distance`` is the mean cosine distance ``1 - cos(mu_c, mu_c')`` over pairs of distinct
      classes and ``intra_class_distance`` is the mean over classes (each class weighted equally) of the
      mean cosine distance ``1 - cos(z_i, mu_c)`` of the class's samples to their own centroid. Higher
      is better; ``nan`` with fewer than two classes, ``inf`` when every class is a single point.

    Also returns ``num_samples`` and ``dim``.
    """
    x = _to_numpy(feats).astype(np.float64, copy=False)
    if x.ndim != 2:
        raise ValueError(f"feats must be 2-D (n_samples, dim), got shape {x.shape}")
    n, d = x.shape
    if n < 2:
        raise ValueError("representation_health needs at least two samples")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    z = x / np.maximum(norms, 1e-12)

    raw_std = x.std(axis=0)
    active = int(np.sum(raw_std > active_threshold))
    total = z.sum(axis=0)
    self_sims = float(np.sum(z * z))  # == n unless some rows are all-zero
    mean_cos = (float(total @ total) - self_sims) / (n * (n - 1))

    out: dict[str, Any] = {
        "num_samples": n,
        "dim": d,
        "active_dims": active,
        "active_dims_frac": active / d,
        "mean_pairwise_cosine": mean_cos,
        "feature_std": float(z.std(axis=0).mean()),
        "effective_rank": effective_rank(x),
    }
    if labels is not None:
        y = _to_labels(labels, "labels")
        if y.shape[0] != n:
            raise ValueError("labels length does not match feats")
        out.update(_class_separation(z, y))
    return out


# -- the registered task ``health`` (medfoundry.eval.registry) ---------------------------------------------------
def health_metrics(fs: FeatureSet) -> dict[str, float]:
    """Representation health over every sample of the set (labels give the class separation)."""
    res = representation_health(fs.feats, fs.labels if len(fs.classes) > 1 else None)
    keys = ("active_dims", "active_dims_frac", "mean_pairwise_cosine", "feature_std", "effective_rank",
            "class_separation")
    return {f"health_{k}": float(res[k]) for k in keys if k in res}


def run_task(inputs: EvalInputs) -> dict[str, float]:
    """``health``: :func:`health_metrics` of the whole feature set."""
    assert inputs.features is not None
    return health_metrics(inputs.features)
