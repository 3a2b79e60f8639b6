"""Tests for medfoundry.losses.ibot.IBOTPatchLoss."""

import pytest
import torch
import torch.nn.functional as F

from medfoundry.losses import IBOTPatchLoss, sinkhorn_knopp


def _token_ce(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    return -(teacher * F.log_softmax(student / temp, dim=-1)).sum(-1)


def test_per_image_weighting_hand_case():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 5, generator=g)
    teacher = torch.softmax(torch.randn(4, 5, generator=g), dim=-1)
    # image 0: 1 masked token; image 1: 3 masked tokens; image 2: none.
    image_index = torch.tensor([1, 0, 1, 1])
    ce = _token_ce(student, teacher, 0.1)
    expected = (ce[1] + (ce[0] + ce[2] + ce[3]) / 3 + 0.0) / 3
    loss = IBOTPatchLoss(out_dim=5)(student, teacher, image_index, n_images=3)
    torch.testing.assert_close(loss, expected)


def test_equal_counts_reduce_to_token_mean():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(6, 7, generator=g)
    teacher = torch.softmax(torch.randn(6, 7, generator=g), dim=-1)
    image_index = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = IBOTPatchLoss(out_dim=7, student_temp=0.2)(student, teacher, image_index, n_images=3)
    torch.testing.assert_close(loss, _token_ce(student, teacher, 0.2).mean())


def test_empty_mask_returns_zero_with_graph():
    student = torch.randn(0, 5, requires_grad=True)
    loss = IBOTPatchLoss(out_dim=5)(student, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), n_images=4)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert student.grad is not None and student.grad.shape == (0, 5)


def test_gradient_only_to_student():
    student = torch.randn(3, 4, requires_grad=True)
    teacher_logits = torch.randn(3, 4, requires_grad=True)
    loss_fn = IBOTPatchLoss(out_dim=4)
    probs = loss_fn.teacher_probs_centered(teacher_logits, teacher_temp=0.04)
    assert not probs.requires_grad
    loss_fn(student, probs, torch.tensor([0, 1, 1]), n_images=2).backward()
    assert student.grad is not None and teacher_logits.grad is None


def test_center_and_teacher_targets():
    loss_fn = IBOTPatchLoss(out_dim=3, center_momentum=0.9)
    x = torch.tensor([[1.0, 0.0, -1.0], [3.0, 2.0, 1.0], [2.0, 1.0, 3.0]])  # mean [2, 1, 1]
    loss_fn.update_center(x)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.2, 0.1, 0.1]]))
    probs = loss_fn.teacher_probs_centered(x, teacher_temp=0.5)
    torch.testing.assert_close(probs, torch.softmax((x - loss_fn.center) / 0.5, dim=-1))
    torch.testing.assert_close(loss_fn.teacher_probs_sinkhorn(x, 0.5), sinkhorn_knopp(x, 0.5))
    assert loss_fn.teacher_probs_sinkhorn(torch.zeros(0, 3), 0.5).shape == (0, 3)


def test_bad_inputs():
    loss_fn = IBOTPatchLoss(out_dim=2)
    s, t = torch.randn(2, 2), torch.softmax(torch.randn(2, 2), -1)
    with pytest.raises(ValueError):
        loss_fn(s, t, torch.tensor([0, 2]), n_images=2)
    with pytest.raises(ValueError):
        loss_fn(s, t, torch.tensor([0]), n_images=2)
    with pytest.raises(ValueError):
        loss_fn(s, t[:1], torch.tensor([0, 1]), n_images=2)
