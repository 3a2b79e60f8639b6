"""Retrieval evaluators on frozen features: augmented-view retrieval and recall@k.

``dinox_view_retrieval`` is the view-retrieval diagnostic of DINO-X for medical CT: it asks whether
an image's second augmented view is the nearest to its first among N images' second views, i.e.
whether the embedding is invariant to the augmentations *and* still discriminates images. It needs
no labels, so it can be tracked during pre-training on unlabelled medical data.
``retrieval_recall_at_k`` is the standard Recall@K of cross-modal retrieval (e.g. CLIP, Radford
et al. 2021), used for image-to-text and text-to-image evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .metrics import ArrayLike, _auto_chunk, _l2_normalize, _to_float_tensor, _to_numpy

if TYPE_CHECKING:
    from torch import nn

    from medfoundry.eval.registry import EvalInputs
    from medfoundry.eval.sections import FrozenEvalSections

__all__ = ["dinox_view_retrieval", "retrieval_recall_at_k", "run_task", "view_retrieval_metrics"]


def dinox_view_retrieval(feats_view1: ArrayLike, feats_view2: ArrayLike) -> dict[str, float]:
    """DINO-X's label-free view-retrieval ratio (timlawrenz/DINO-X, ``scripts/phase5_view_retrieval_eval.py``).

    ``feats_view1[i]`` and ``feats_view2[i]`` are the class-token features of two augmented views of
    image ``i`` (``N`` images). Both are L2-normalised; ``S = V1 @ V2^T`` is the ``N x N`` cosine
    similarity. Image ``i`` is a hit when the most similar view 2 to its view 1 is its own
    (``argmax_j S[i, j] == i``), one direction only. ``top1`` is the hit rate, chance is ``1 / N`` and the
    ratio is ``top1 / (1 / N) = top1 * N``: ``N`` for perfectly identifying features, about 1 for
    features that carry no image identity. This is the quantity behind every retrieval number of the
    DINO-X study (6 -> 311 -> 1,032 over training at ``N`` = 4,096), so it depends on ``N``: compare
    ratios at the same ``N`` only. Ties go to the lowest index (``numpy.argmax``, as DINO-X).

    Returns ``{"view_top1", "view_chance", "view_retrieval_ratio", "num_images"}``. Needs ``N >= 2``.
    """
    a = _to_float_tensor(feats_view1)
    b = _to_float_tensor(feats_view2).to(a.dtype)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"view features must be two (N, D) arrays of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    n = a.shape[0]
    if n < 2:
        raise ValueError("view retrieval needs at least two images")
    q, k = _l2_normalize(a), _l2_normalize(b)
    hits = 0
    step = _auto_chunk(n, None)
    with torch.no_grad():
        for start in range(0, n, step):
            stop = min(start + step, n)
            nearest = (q[start:stop] @ k.t()).argmax(dim=1)
            hits += int((nearest == torch.arange(start, stop)).sum())
    return {
        "view_top1": hits / n,
        "view_chance": 1.0 / n,
        "view_retrieval_ratio": float(hits),  # top1 / (1/N) = hits exactly
        "num_images": float(n),
    }


def retrieval_recall_at_k(
    query_feats: ArrayLike,
    gallery_feats: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    positives: np.ndarray | None = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K of cosine-similarity retrieval (as used for CLIP image<->text retrieval).

    Query and gallery features are L2-normalised and every gallery item is ranked by cosine
    similarity to the query. ``recall_at_{k}`` is the fraction of queries with at least one positive
    among the ``k`` highest-ranked gallery items; ``median_rank`` / ``mean_rank`` are statistics of the
    1-based rank of the best-ranked positive (lower is better).

    ``positives`` defines the ground truth: ``None`` means query ``i``'s only positive is gallery item
    ``i`` (requires ``len(query) <= len(gallery)``); a 1-D integer array gives the positive gallery index
    of each query; a 2-D boolean ``(n_query, n_gallery)`` mask allows several positives per query (e.g.
    five captions per image). The rank of a positive is ``1 +`` the number of gallery items scoring
    strictly higher than it, so ties are resolved in the query's favour. Queries without any
    positive raise ``ValueError``.
    """
    q = _to_float_tensor(query_feats)
    g = _to_float_tensor(gallery_feats).to(q.dtype)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature dims differ: query {q.shape[1]} vs gallery {g.shape[1]}")
    n_q, n_g = q.shape[0], g.shape[0]
    if positives is None:
        if n_q > n_g:
            raise ValueError("default positives (query i <-> gallery i) need n_query <= n_gallery")
        pos_index: torch.Tensor | None = torch.arange(n_q)
        pos_mask: torch.Tensor | None = None
    else:
        pos = _to_numpy(positives)
        if pos.ndim == 1:
            if pos.shape[0] != n_q or pos.min(initial=0) < 0 or pos.max(initial=0) >= n_g:
                raise ValueError("1-D positives must hold one valid gallery index per query")
            pos_index, pos_mask = torch.from_numpy(pos.astype(np.int64)), None
        elif pos.ndim == 2:
            if pos.shape != (n_q, n_g):
                raise ValueError(f"2-D positives must have shape {(n_q, n_g)}, got {pos.shape}")
            pos_mask, pos_index = torch.from_numpy(pos.astype(bool)), None
            if not bool(pos_mask.any(dim=1).all()):
                raise ValueError("every query needs at least one positive")
        else:
            raise ValueError("positives must be None, a 1-D index array or a 2-D boolean mask")

    q = _l2_normalize(q)
    g_t = _l2_normalize(g).t().contiguous()
    ranks = torch.empty(n_q, dtype=torch.int64)
    step = _auto_chunk(n_g, chunk_size)
    with torch.no_grad():
        for start in range(0, n_q, step):
            stop = min(start + step, n_q)
            sim = q[start:stop] @ g_t
            if pos_index is not None:
                best_pos = sim.gather(1, pos_index[start:stop, None])
            else:
                assert pos_mask is not None
                best_pos = sim.masked_fill(~pos_mask[start:stop], -torch.inf).amax(dim=1, keepdim=True)
            ranks[start:stop] = (sim > best_pos).sum(dim=1) + 1
    ranks_np = ranks.numpy()
    results = {f"recall_at_{k}": float(np.mean(ranks_np <= k)) for k in ks}
    results["median_rank"] = float(np.median(ranks_np))
    results["mean_rank"] = float(np.mean(ranks_np))
    return results


# -- the registered task ``retrieval`` (medfoundry.eval.registry) ------------------------------------------------
def view_retrieval_metrics(backbone: nn.Module, sections: FrozenEvalSections, feature: str = "cls",
                           batch_size: int = 64) -> dict[str, float]:
    """DINO-X's view-retrieval ratio of ``backbone`` on ``eval.retrieval_images`` images of the label-free
    retrieval set of a run's ``sections`` (data, crops, eval; see :mod:`medfoundry.eval.view_pairs`)."""
    # imported here: view pairs read the data pipeline, which the array evaluators above do not need
    from medfoundry.eval.view_pairs import view_pair_features

    fa, fb, _ = view_pair_features(backbone, sections, feature, batch_size=batch_size)
    return dinox_view_retrieval(fa, fb)


def run_task(inputs: EvalInputs) -> dict[str, float]:
    """``retrieval``: :func:`view_retrieval_metrics` of the backbone on the config's label-free retrieval set."""
    assert inputs.backbone is not None and inputs.sections is not None
    return view_retrieval_metrics(inputs.backbone, inputs.sections, inputs.settings.feature,
                                  inputs.settings.batch_size)
