"""Tests for medfoundry.losses.gram.GramLoss."""

import pytest
import torch

from medfoundry.losses import GramLoss


def test_zero_for_identical_inputs():
    x = torch.randn(2, 5, 8)
    for remove in (False, True):
        for norm in (False, True):
            assert GramLoss(normalize=norm, remove_negatives=remove)(x, x.clone()).item() == pytest.approx(
                0.0, abs=1e-7
            )


def test_hand_computed_values():
    identity = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # Gram = I
    parallel = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])  # normalised Gram = ones
    torch.testing.assert_close(GramLoss()(identity, parallel), torch.tensor(0.5))
    # Unnormalised: Gram(parallel) = [[1, 2], [2, 4]] against Gram(identity) = I.
    expected = ((1 - 1) ** 2 + 2**2 + 2**2 + (4 - 1) ** 2) / 4
    torch.testing.assert_close(GramLoss(normalize=False)(parallel, identity), torch.tensor(float(expected)))
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # Gram [[1, -1], [-1, 1]]
    torch.testing.assert_close(GramLoss()(opposite, identity), torch.tensor(0.5))
    torch.testing.assert_close(GramLoss(remove_negatives=True)(opposite, identity), torch.tensor(0.0))


def test_invariant_to_feature_norms_when_normalized():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 6, 4, generator=g)
    t = torch.randn(3, 6, 4, generator=g)
    scale_s = torch.rand(3, 6, 1, generator=g) * 5 + 0.1
    scale_t = torch.rand(3, 6, 1, generator=g) * 5 + 0.1
    base = GramLoss()(s, t)
    torch.testing.assert_close(GramLoss()(s * scale_s, t * scale_t), base)
    assert not torch.allclose(GramLoss(normalize=False)(s * scale_s, t), GramLoss(normalize=False)(s, t))


def test_per_image_not_cross_image():
    s = torch.randn(2, 4, 3)
    t = torch.randn(2, 4, 3)
    per_image = torch.stack([GramLoss()(s[i : i + 1], t[i : i + 1]) for i in range(2)]).mean()
    torch.testing.assert_close(GramLoss()(s, t), per_image)


def test_target_detached_and_dims_may_differ():
    s = torch.randn(2, 4, 3, requires_grad=True)
    t = torch.randn(2, 4, 7, requires_grad=True)
    loss = GramLoss()(s, t)
    loss.backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError):
        GramLoss()(s, torch.randn(2, 5, 3))
