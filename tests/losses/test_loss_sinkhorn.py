"""Tests for medfoundry.losses.sinkhorn (single process; see test_loss_distributed.py for ranks)."""

import pytest
import torch

from medfoundry.losses import sinkhorn_knopp


def _reference_sinkhorn(logits: torch.Tensor, temperature: float, n_iterations: int) -> torch.Tensor:
    """Plain float64 transcription of the SwAV/DINOv2 algorithm on a (K, B) matrix."""
    q = torch.exp(logits.double() / temperature).t()  # (K, B)
    n_protos, batch = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / n_protos
        q = q / q.sum(dim=0, keepdim=True) / batch
    return (q * batch).t()


def test_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    out = sinkhorn_knopp(logits, temperature=0.5, n_iterations=3)
    assert out.dtype == torch.float32 and out.shape == (6, 5)
    torch.testing.assert_close(out.double(), _reference_sinkhorn(logits, 0.5, 3), rtol=1e-5, atol=1e-6)


def test_rows_sum_to_one_and_columns_to_b_over_k():
    g = torch.Generator().manual_seed(1)
    batch, n_protos = 12, 4
    logits = torch.randn(batch, n_protos, generator=g)
    out = sinkhorn_knopp(logits, temperature=1.0, n_iterations=3)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(batch))
    # Three iterations are only approximately balanced...
    torch.testing.assert_close(out.sum(dim=0), torch.full((n_protos,), batch / n_protos), rtol=0.1, atol=0.1)
    # ...and converge to exact balance with more iterations.
    out = sinkhorn_knopp(logits, temperature=1.0, n_iterations=200)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(batch))
    torch.testing.assert_close(
        out.sum(dim=0), torch.full((n_protos,), batch / n_protos), rtol=1e-4, atol=1e-4
    )


def test_uniform_logits_give_uniform_targets():
    out = sinkhorn_knopp(torch.zeros(3, 5), temperature=0.1)
    torch.testing.assert_close(out, torch.full((3, 5), 0.2))


def test_shift_invariance_and_large_logits_are_finite():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 6, generator=g)
    temp = 1.0 / 64.0
    base = sinkhorn_knopp(logits, temperature=temp)
    # logits / temp ~ 128 + ...: exp would overflow float32 without the global shift.
    shifted = sinkhorn_knopp(logits + 2.0, temperature=temp)
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(base, shifted, rtol=1e-3, atol=1e-4)
    assert torch.isfinite(sinkhorn_knopp(logits * 1e4, temperature=0.04)).all()


def test_no_grad_and_dtype():
    logits = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    out = sinkhorn_knopp(logits, temperature=0.1)
    assert not out.requires_grad
    assert out.dtype == torch.float32


def test_n_rows_global_argument():
    logits = torch.randn(5, 3)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.2, n_rows_global=5), sinkhorn_knopp(logits, 0.2))
    with pytest.raises(ValueError):
        sinkhorn_knopp(logits, 0.2, n_rows_global=4)


def test_empty_and_bad_inputs():
    assert sinkhorn_knopp(torch.zeros(0, 7), temperature=0.1).shape == (0, 7)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3), temperature=0.1)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3, 2), temperature=0.0)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3, 2), temperature=0.1, n_iterations=0)
