"""Gated attention MIL (Ilse et al. 2018): the attention formula, its MIL symmetries, and training that finds the
key instances of positive bags, selected on val only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfoundry.eval.metrics import auc_roc
from medfoundry.eval.slide.aggregators import GatedAttentionMIL
from medfoundry.eval.slide.fit import fit_gated_attention, predict
from medfoundry.eval.slide.settings import SlideSettings


def _model(in_dim: int = 6) -> GatedAttentionMIL:
    torch.manual_seed(0)
    model = GatedAttentionMIL(in_dim, 2, embed_dim=8, attention_dim=5).eval()
    return model.requires_grad_(False)


def test_attention_is_the_gated_formula_and_sums_to_one() -> None:
    model = _model()
    bag = torch.randn(7, 6)
    logits, a = model(bag)
    h = torch.relu(bag @ model.embed[0].weight.T + model.embed[0].bias)
    v = torch.tanh(h @ model.attention_V.weight.T + model.attention_V.bias)
    u = torch.sigmoid(h @ model.attention_U.weight.T + model.attention_U.bias)
    scores = (v * u) @ model.attention_w.weight[0] + model.attention_w.bias[0]  # w^T (tanh(V h) ⊙ sigm(U h))
    want = torch.exp(scores) / torch.exp(scores).sum()
    torch.testing.assert_close(a, want)
    assert float(a.sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(logits, model.classifier(want @ h))


def test_permutation_invariant_prediction_and_equivariant_attention() -> None:
    model = _model()
    bag = torch.randn(9, 6)
    perm = torch.randperm(9)
    (l1, a1), (l2, a2) = model(bag), model(bag[perm])
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(a1[perm], a2)
    _, flat = model(bag[:1].repeat(5, 1))  # identical tiles: uniform weights, as mean pooling
    torch.testing.assert_close(flat, torch.full((5,), 0.2))
    with pytest.raises(ValueError, match="at least one tile"):
        model(torch.zeros(0, 6))


SHIFT = 5.0


def _key_instance_bags(n: int, seed: int, tiles: int = 16, dim: int = 8) -> tuple[list[np.ndarray], np.ndarray,
                                                                                   list[np.ndarray]]:
    """Bags of N(0, 1) tiles; a positive bag has 2 key tiles shifted by +5 on dimension 0 (MIL's classic setting)."""
    rng = np.random.default_rng(seed)
    bags, labels, keys = [], [], []
    for i in range(n):
        bag = rng.standard_normal((tiles, dim)).astype(np.float32)
        key = np.zeros(tiles, dtype=bool)
        if i % 2:
            key[rng.choice(tiles, 2, replace=False)] = True
            bag[key, 0] += SHIFT
        bags.append(bag)
        labels.append(i % 2)
        keys.append(key)
    return bags, np.asarray(labels), keys


def test_training_finds_the_key_instances_and_selects_on_val() -> None:
    train, y_train, _ = _key_instance_bags(40, seed=1)
    val, y_val, _ = _key_instance_bags(12, seed=2)
    test, y_test, keys = _key_instance_bags(20, seed=3)
    settings = SlideSettings(epochs=15, patience=5, lr=2e-3, embed_dim=16, attention_dim=16, seed=0)
    fitted = fit_gated_attention(train, y_train, val, y_val, 2, settings)
    assert fitted.selection == "auc" and 1 <= fitted.best_epoch <= len(fitted.history) <= 15
    assert fitted.val_auc == max(h["val_auc"] for h in fitted.history)  # the kept epoch is the best on val
    probs, weights = predict(fitted.model, fitted.standardiser, test)
    assert auc_roc(y_test, probs[:, 1]) >= 0.9
    positives = [w[k].sum() for w, k, y in zip(weights, keys, y_test) if y == 1]
    assert np.mean(positives) > 0.5  # 2 of 16 tiles hold over half the attention (uniform: 0.125)
    assert all(float(w.sum()) == pytest.approx(1.0, abs=1e-5) for w in weights)
    again = fit_gated_attention(train, y_train, val, y_val, 2, settings)  # seeded: the same run
    assert again.best_epoch == fitted.best_epoch
    np.testing.assert_allclose(predict(again.model, again.standardiser, test)[0], probs, rtol=1e-5, atol=1e-6)


def test_training_needs_val_and_two_classes() -> None:
    train, y_train, _ = _key_instance_bags(6, seed=1)
    with pytest.raises(ValueError, match="selects its epoch on the val slides, and there are none"):
        fit_gated_attention(train, y_train, [], np.zeros(0), 2, SlideSettings(epochs=2))
    with pytest.raises(ValueError, match="single class"):
        fit_gated_attention(train, np.zeros(6, dtype=int), train, y_train, 2, SlideSettings(epochs=2))
