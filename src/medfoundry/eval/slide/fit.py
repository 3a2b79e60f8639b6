"""Training gated attention MIL on cached tile features, with model selection on the val slides only.

One bag (slide) per step, Adam as in the reference implementation of Ilse et al. (2018), a seeded slide order and
initialisation. After every epoch the val slides are scored; the epoch kept is the one with the best val AUC (ties:
the lower val loss; a single-class val split falls back to the val loss) and training stops after ``patience``
epochs without a better one. The test slides are never seen here. Tile features are standardised with the mean
and standard deviation of the training slides' tiles (what the linear probe does to its features), so features of
any scale, random-init ones included, train with the same learning rate.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medfoundry.eval.metrics import auc_roc
from medfoundry.eval.slide.aggregators import GatedAttentionMIL
from medfoundry.eval.slide.settings import SlideSettings


@dataclass
class Standardiser:
    """Per-dimension mean and std of the training tiles; ``__call__`` maps a bag to standard units."""

    mean: np.ndarray
    std: np.ndarray

    @staticmethod
    def fit(bags: Sequence[np.ndarray]) -> Standardiser:
        """Statistics over every tile of ``bags`` (std floored at 1e-6 so constant dimensions stay finite)."""
        tiles = np.concatenate([np.asarray(b, dtype=np.float64) for b in bags])
        return Standardiser(tiles.mean(axis=0), np.maximum(tiles.std(axis=0), 1e-6))

    def __call__(self, bag: np.ndarray) -> Tensor:
        return torch.from_numpy(((np.asarray(bag, dtype=np.float64) - self.mean) / self.std).astype(np.float32))


@dataclass
class FittedMIL:
    """The selected model and how it was selected."""

    model: GatedAttentionMIL
    standardiser: Standardiser
    best_epoch: int  # 1-based epoch whose weights are kept
    val_auc: float  # val AUC of that epoch (nan when val holds one class)
    val_loss: float
    selection: str  # "auc" or "loss"
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: train_loss, val_loss, val_auc


@torch.no_grad()
def predict(model: GatedAttentionMIL, standardiser: Standardiser,
            bags: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(class probabilities (n_bags, C), attention weights per bag)`` of a fitted model (eval mode)."""
    model.eval()
    probs, weights = [], []
    for bag in bags:
        logits, a = model(standardiser(bag))
        probs.append(torch.softmax(logits, dim=-1).numpy())
        weights.append(a.numpy().astype(np.float64))
    return np.stack(probs) if probs else np.zeros((0, model.classifier.out_features)), weights


def _val_auc(y: np.ndarray, probs: np.ndarray) -> float:
    if np.unique(y).size < 2:
        return float("nan")
    return auc_roc(y, probs[:, 1] if probs.shape[1] == 2 else probs)


def _loss(y: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    return float(-np.log(p).mean())


def fit_gated_attention(
    train_bags: Sequence[np.ndarray],
    y_train: np.ndarray,
    val_bags: Sequence[np.ndarray],
    y_val: np.ndarray,
    n_classes: int,
    settings: SlideSettings,
) -> FittedMIL:
    """Train :class:`GatedAttentionMIL` on ``train_bags`` (labels ``y_train``, class indices < ``n_classes``) and
    keep the epoch that scores best on ``val_bags`` (see the module docstring); ``ValueError`` without val slides or
    with a single training class."""
    y_train, y_val = np.asarray(y_train, dtype=np.int64), np.asarray(y_val, dtype=np.int64)
    if len(val_bags) == 0:
        raise ValueError("gated attention MIL selects its epoch on the val slides, and there are none: add val rows "
                         "to the manifest's split column (or drop it so the slides are split by patient)")
    if np.unique(y_train).size < 2:
        raise ValueError(f"the training slides hold a single class ({np.unique(y_train).tolist()}); "
                         "a slide classifier needs two")
    standardiser = Standardiser.fit(train_bags)
    train_x = [standardiser(b) for b in train_bags]
    targets = torch.from_numpy(y_train)
    rng = np.random.default_rng(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = GatedAttentionMIL(train_x[0].shape[1], n_classes, settings.embed_dim, settings.attention_dim)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay)
    use_auc = np.unique(y_val).size >= 2
    best: tuple[float, float] | None = None  # (-val AUC or 0, val loss): lower is better
    best_state, best_epoch, best_auc, best_loss, stale = None, 0, float("nan"), float("inf"), 0
    history: list[dict[str, float]] = []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        total = 0.0
        for i in rng.permutation(len(train_x)):
            logits, _ = model(train_x[i])
            loss = F.cross_entropy(logits[None], targets[i : i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        probs, _ = predict(model, standardiser, val_bags)
        auc, vloss = _val_auc(y_val, probs), _loss(y_val, probs)
        history.append({"epoch": epoch, "train_loss": total / len(train_x), "val_loss": vloss, "val_auc": auc})
        score = (-auc if use_auc else 0.0, vloss)
        if best is None or score < best:
            best, best_state, best_epoch, best_auc, best_loss, stale = (
                score, copy.deepcopy(model.state_dict()), epoch, auc, vloss, 0)
        else:
            stale += 1
            if settings.patience and stale >= settings.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return FittedMIL(model, standardiser, best_epoch, best_auc, best_loss, "auc" if use_auc else "loss", history)
