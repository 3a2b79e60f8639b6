"""Zero-shot classification and image<->text retrieval from image and text embeddings.

* Prompt pairs per finding (CheXzero, Tiu et al., Nature BME 2022): for finding ``f`` the positive
  prompt (``"{f}"``) and the negative prompt (``"no {f}"``) are embedded; an image's probability of
  ``f`` is the softmax of its two cosine similarities, ``exp(s+) / (exp(s+) + exp(s-))``. The AUC
  per finding (with a percentile-bootstrap CI) and the mean AUC over findings summarise it. Any
  positive temperature gives the same AUC (the softmax is monotone in ``s+ - s-``).
* Class-name x template prompt ensembles (Radford et al. 2021, Sec. 3.1.4): each class embedding is
  the re-normalised mean of its normalised template embeddings; images are scored by cosine.
* Retrieval: image->text and text->image Recall@K (Radford et al. 2021) via
  :func:`medfoundry.eval.retrieval.retrieval_recall_at_k`, with the chance level for N pairs.

All functions take plain tensors/arrays; encoding with a model happens in :mod:`medfoundry.eval.clip_hook`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from medfoundry.eval.metrics import accuracy, auc_roc, balanced_accuracy, bootstrap_ci
from medfoundry.eval.retrieval import retrieval_recall_at_k

__all__ = [
    "class_embeddings",
    "image_text_retrieval",
    "multiclass_zero_shot",
    "prompt_pair_auc",
    "prompt_pair_probabilities",
]


def _unit(x: Tensor) -> Tensor:
    x = torch.as_tensor(x).float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def prompt_pair_probabilities(image_features: Tensor, positive: Tensor, negative: Tensor,
                              scale: float = 1.0) -> Tensor:
    """CheXzero's positive/negative softmax: (N, D) images, (F, D) prompt embeddings -> (N, F) probabilities.

    ``p[i, f] = softmax([scale * cos(x_i, pos_f), scale * cos(x_i, neg_f)])[0]``; CheXzero uses
    ``scale = 1`` (raw cosines). Features need not be normalised.
    """
    img = _unit(image_features)
    s_pos = img @ _unit(positive).t()
    s_neg = img @ _unit(negative).t()
    return torch.sigmoid(scale * (s_pos - s_neg))  # == exp(s+) / (exp(s+) + exp(s-)) at scale


def prompt_pair_auc(y_true: np.ndarray, probs: np.ndarray, findings: Sequence[str], n_bootstrap: int = 1000,
                    seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """AUC per finding with a bootstrap CI and the mean over findings.

    ``y_true`` (N, F) holds 1 (positive), 0 (negative) or anything else (unknown: that image is left
    out for that finding, as CheXpert's uncertain labels are). Returns ``auc/<finding>``,
    ``auc_low/<finding>``, ``auc_high/<finding>``, ``n_pos/<finding>`` and ``mean_auc`` (over findings
    with both classes present; nan when none). The CI uses :func:`medfoundry.eval.metrics.bootstrap_ci`.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(findings):
        raise ValueError(f"y_true {y.shape} and probs {p.shape} must both be (N, {len(findings)})")
    out: dict[str, float] = {}
    aucs = []
    for j, name in enumerate(findings):
        known = (y[:, j] == 0) | (y[:, j] == 1)
        yj, pj = y[known, j].astype(np.int64), p[known, j]
        point, low, high = bootstrap_ci(yj, pj, auc_roc, n_bootstrap=n_bootstrap, seed=seed + j, alpha=alpha)
        out[f"auc/{name}"] = point
        out[f"auc_low/{name}"] = low
        out[f"auc_high/{name}"] = high
        out[f"n_pos/{name}"] = float((yj == 1).sum())
        if np.isfinite(point):
            aucs.append(point)
    out["mean_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    return out


def class_embeddings(encode_texts: Callable[[list[str]], Tensor], class_names: Sequence[str],
                     templates: Sequence[str]) -> Tensor:
    """(C, D) unit class embeddings: the mean of the unit embeddings of ``template.format(name)``, re-normalised."""
    if not templates:
        raise ValueError("at least one prompt template is needed")
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = _unit(encode_texts(prompts)).view(len(class_names), len(templates), -1)
    return _unit(emb.mean(dim=1))


def multiclass_zero_shot(image_features: Tensor, class_emb: Tensor, y_true: np.ndarray, n_bootstrap: int = 1000,
                         seed: int = 0) -> dict[str, float]:
    """Accuracy, balanced accuracy and one-vs-rest macro AUC of cosine scores against class embeddings.

    Images with label < 0 are left out. The macro AUC uses softmax-free cosine scores (AUC is rank
    based) and comes with a bootstrap CI.
    """
    y = np.asarray(y_true).astype(np.int64)
    scores = (_unit(image_features) @ _unit(class_emb).t()).numpy().astype(np.float64)
    known = y >= 0
    y, scores = y[known], scores[known]
    out = {"accuracy": accuracy(y, scores), "balanced_accuracy": balanced_accuracy(y, scores)}
    point, low, high = bootstrap_ci(y, scores, auc_roc, n_bootstrap=n_bootstrap, seed=seed)
    out.update({"macro_auc": point, "macro_auc_low": low, "macro_auc_high": high,
                "chance_accuracy": 1.0 / max(1, class_emb.shape[0])})
    return out


def image_text_retrieval(image_features: Tensor, text_features: Tensor, ks: Sequence[int] = (1, 5, 10),
                         positives: np.ndarray | None = None) -> dict[str, float]:
    """Image->text and text->image Recall@K, ranks and chance levels for paired features.

    ``positives`` (n_images, n_texts) boolean marks all correct texts of each image (default: pair
    ``i`` <-> ``i``). Keys: ``i2t_recall_at_{k}``, ``t2i_recall_at_{k}``, ``i2t_median_rank`` ...,
    and ``chance_at_{k}`` = k / n_texts (the recall of a random ranking with one positive per query).
    """
    img = torch.as_tensor(image_features).float()
    txt = torch.as_tensor(text_features).float()
    i2t = retrieval_recall_at_k(img, txt, ks, positives=positives)
    t2i = retrieval_recall_at_k(txt, img, ks, positives=None if positives is None else np.asarray(positives).T)
    out = {f"i2t_{k}": v for k, v in i2t.items()}
    out.update({f"t2i_{k}": v for k, v in t2i.items()})
    n = txt.shape[0]
    out.update({f"chance_at_{k}": min(1.0, k / n) for k in ks})
    return out
