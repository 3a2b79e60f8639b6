"""Zero-shot AUC, prompt ensembles and retrieval recall checked against scikit-learn and brute force."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from medfoundry.eval.zero_shot import (
    class_embeddings,
    image_text_retrieval,
    multiclass_zero_shot,
    prompt_pair_auc,
    prompt_pair_probabilities,
)


def test_prompt_pair_probability_is_chexzero_softmax():
    g = torch.Generator().manual_seed(0)
    img, pos, neg = torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    probs = prompt_pair_probabilities(img, pos, neg)
    u = F.normalize(img, dim=-1)
    sp, sn = u @ F.normalize(pos, dim=-1).t(), u @ F.normalize(neg, dim=-1).t()
    torch.testing.assert_close(probs, torch.exp(sp) / (torch.exp(sp) + torch.exp(sn)))
    # the AUC does not depend on the softmax temperature (monotone in s+ - s-)
    y = (torch.rand(7, 3, generator=g) > 0.5).long().numpy()
    y[0], y[1] = 1, 0
    a1 = prompt_pair_auc(y, probs.numpy(), ["a", "b", "c"], n_bootstrap=0)
    a2 = prompt_pair_auc(y, prompt_pair_probabilities(img, pos, neg, scale=5.0).numpy(), ["a", "b", "c"], 0)
    assert all(np.isclose(a1[k], a2[k], equal_nan=True) for k in a1)


def test_prompt_pair_auc_matches_sklearn_with_unknown_labels():
    rng = np.random.default_rng(1)
    n, findings = 60, ["effusion", "edema", "cardiomegaly"]
    y = rng.choice([0, 1, -1], size=(n, 3), p=[0.5, 0.35, 0.15])
    probs = rng.random((n, 3))
    probs[:, 0] = np.round(probs[:, 0], 1)  # ties
    out = prompt_pair_auc(y, probs, findings, n_bootstrap=200, seed=3)
    expected = []
    for j, f in enumerate(findings):
        known = y[:, j] >= 0
        ref = roc_auc_score(y[known, j], probs[known, j])
        assert np.isclose(out[f"auc/{f}"], ref)
        assert out[f"auc_low/{f}"] <= ref <= out[f"auc_high/{f}"]
        assert out[f"n_pos/{f}"] == (y[:, j] == 1).sum()
        expected.append(ref)
    assert np.isclose(out["mean_auc"], np.mean(expected))
    # a perfect and a constant scorer
    perfect = prompt_pair_auc(np.array([[0], [1], [1], [0]]), np.array([[0.1], [0.9], [0.8], [0.2]]), ["x"], 0)
    assert perfect["auc/x"] == 1.0
    flat = prompt_pair_auc(np.array([[0], [1], [1], [0]]), np.full((4, 1), 0.5), ["x"], 0)
    assert flat["auc/x"] == 0.5


def test_class_embeddings_are_normalised_template_means():
    table = {f"{t} {c}": torch.randn(4) for c in ("ct", "mr") for t in ("a", "b")}

    def encode(prompts):
        return torch.stack([table[p] for p in prompts])

    emb = class_embeddings(encode, ["ct", "mr"], ["a {}", "b {}"])
    for i, c in enumerate(("ct", "mr")):
        mean = (F.normalize(table[f"a {c}"], dim=0) + F.normalize(table[f"b {c}"], dim=0)) / 2
        torch.testing.assert_close(emb[i], F.normalize(mean, dim=0))


def test_multiclass_zero_shot_matches_sklearn():
    rng = np.random.default_rng(2)
    classes = torch.tensor(rng.standard_normal((4, 8)), dtype=torch.float32)
    y = rng.integers(0, 4, size=80)
    img = classes[y] + 1.5 * torch.tensor(rng.standard_normal((80, 8)), dtype=torch.float32)
    y_with_unknown = y.copy()
    y_with_unknown[:5] = -1
    out = multiclass_zero_shot(img, classes, y_with_unknown, n_bootstrap=100)
    scores = (F.normalize(img, dim=-1) @ F.normalize(classes, dim=-1).t()).numpy()[5:]
    assert np.isclose(out["accuracy"], accuracy_score(y[5:], scores.argmax(1)))
    assert np.isclose(out["balanced_accuracy"], balanced_accuracy_score(y[5:], scores.argmax(1)))
    ovr = np.mean([roc_auc_score(y[5:] == c, scores[:, c]) for c in range(4)])  # one-vs-rest on each cosine column
    assert np.isclose(out["macro_auc"], ovr)
    assert out["chance_accuracy"] == 0.25


def _brute_force_recall(sim: np.ndarray, positives: np.ndarray, k: int) -> float:
    hits = 0
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda j: (-sim[i, j], 0 if positives[i, j] else 1))
        hits += any(positives[i, j] for j in order[:k])  # ties resolved in the query's favour
    return hits / sim.shape[0]


def test_retrieval_recall_matches_brute_force_both_directions():
    rng = np.random.default_rng(4)
    n = 25
    img = torch.tensor(rng.standard_normal((n, 6)), dtype=torch.float32)
    txt = img + torch.tensor(rng.standard_normal((n, 6)), dtype=torch.float32) * 1.2
    txt[3] = txt[7]  # two identical reports: both are correct for images 3 and 7
    pos = np.eye(n, dtype=bool)
    pos[3, 7] = pos[7, 3] = True
    out = image_text_retrieval(img, txt, ks=(1, 5, 10), positives=pos)
    sim = (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()).numpy()
    for k in (1, 5, 10):
        assert np.isclose(out[f"i2t_recall_at_{k}"], _brute_force_recall(sim, pos, k))
        assert np.isclose(out[f"t2i_recall_at_{k}"], _brute_force_recall(sim.T, pos.T, k))
        assert np.isclose(out[f"chance_at_{k}"], k / n)
    ideal = image_text_retrieval(img, img, ks=(1,))
    assert ideal["i2t_recall_at_1"] == 1.0 and ideal["t2i_recall_at_1"] == 1.0
