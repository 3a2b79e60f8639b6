"""Tests for medfoundry.losses.dino.DINOLoss."""

import math

import pytest
import torch
import torch.nn.functional as F

from medfoundry.losses import DINOLoss, sinkhorn_knopp


def _double_loop(student: torch.Tensor, teacher: torch.Tensor, temp: float, skip: bool) -> torch.Tensor:
    total, n_terms = 0.0, 0
    for t_idx in range(teacher.shape[0]):
        for s_idx in range(student.shape[0]):
            if skip and s_idx == t_idx:
                continue
            per_sample = []
            for b in range(student.shape[1]):
                log_p = F.log_softmax(student[s_idx, b] / temp, dim=-1)
                per_sample.append(-(teacher[t_idx, b] * log_p).sum())
            total = total + torch.stack(per_sample).mean()
            n_terms += 1
    return total / n_terms


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize(("n_s", "n_t"), [(2, 2), (4, 2), (3, 1)])
def test_matches_double_loop(n_s, n_t, skip):
    g = torch.Generator().manual_seed(n_s * 10 + n_t)
    student = torch.randn(n_s, 3, 4, generator=g)
    teacher = torch.softmax(torch.randn(n_t, 3, 4, generator=g), dim=-1)
    loss = DINOLoss(out_dim=4, student_temp=0.1)(student, teacher, skip_same_view=skip)
    torch.testing.assert_close(loss, _double_loop(student, teacher, 0.1, skip))


def test_single_view_pair():
    student = torch.randn(1, 3, 4)
    teacher = torch.softmax(torch.randn(1, 3, 4), dim=-1)
    loss_fn = DINOLoss(out_dim=4)
    torch.testing.assert_close(
        loss_fn(student, teacher, skip_same_view=False), _double_loop(student, teacher, 0.1, False)
    )
    with pytest.raises(ValueError):
        loss_fn(student, teacher, skip_same_view=True)


def test_minimal_when_student_matches_teacher():
    g = torch.Generator().manual_seed(3)
    temp = 0.1
    teacher = torch.softmax(torch.randn(1, 5, 6, generator=g), dim=-1)
    loss_fn = DINOLoss(out_dim=6, student_temp=temp)
    optimum = (temp * teacher.log()).requires_grad_(True)
    best = loss_fn(optimum, teacher, skip_same_view=False)
    # At the optimum the cross-entropy equals the teacher entropy and the gradient vanishes.
    torch.testing.assert_close(best, DINOLoss.entropy(teacher).mean())
    best.backward()
    torch.testing.assert_close(optimum.grad, torch.zeros_like(optimum), atol=1e-6, rtol=0)
    for seed in range(5):
        noise = 0.05 * torch.randn(optimum.shape, generator=torch.Generator().manual_seed(seed))
        assert loss_fn(optimum.detach() + noise, teacher, skip_same_view=False) > best


def test_gradient_reaches_only_student():
    student = torch.randn(3, 2, 4, requires_grad=True)
    teacher_logits = torch.randn(2, 2, 4, requires_grad=True)
    loss_fn = DINOLoss(out_dim=4)
    probs = loss_fn.teacher_probs_centered(teacher_logits, teacher_temp=0.04)
    assert not probs.requires_grad
    loss_fn(student, probs).backward()
    assert student.grad is not None and teacher_logits.grad is None


def test_center_ema_math():
    loss_fn = DINOLoss(out_dim=3, center_momentum=0.9)
    assert loss_fn.center.shape == (1, 3) and torch.count_nonzero(loss_fn.center) == 0
    assert "center" in loss_fn.state_dict()
    x1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # mean [2, 2, 2]
    loss_fn.update_center(x1)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.2, 0.2, 0.2]]))
    x2 = torch.tensor([[4.0, 0.0, -4.0]])
    loss_fn.update_center(x2)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.9 * 0.2 + 0.4, 0.18, 0.18 - 0.4]]))
    loss_fn.update_center(torch.zeros(0, 3))  # empty batch: unchanged
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.58, 0.18, -0.22]]))


def test_teacher_probs_centered():
    loss_fn = DINOLoss(out_dim=4)
    loss_fn.center.copy_(torch.tensor([[0.5, -0.5, 0.0, 1.0]]))
    logits = torch.randn(2, 3, 4)
    probs = loss_fn.teacher_probs_centered(logits, teacher_temp=0.07)
    expected = torch.softmax((logits - loss_fn.center) / 0.07, dim=-1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))


def test_teacher_probs_sinkhorn():
    loss_fn = DINOLoss(out_dim=5)
    logits = torch.randn(6, 5)
    torch.testing.assert_close(
        loss_fn.teacher_probs_sinkhorn(logits, 0.05, n_iterations=4), sinkhorn_knopp(logits, 0.05, 4)
    )


def test_entropy_helper():
    uniform = torch.full((2, 8), 1 / 8)
    torch.testing.assert_close(DINOLoss.entropy(uniform), torch.full((2,), math.log(8)))
    one_hot = F.one_hot(torch.tensor([1, 3]), 4).float()
    torch.testing.assert_close(DINOLoss.entropy(one_hot), torch.zeros(2))


def test_shape_errors():
    loss_fn = DINOLoss(out_dim=4)
    with pytest.raises(ValueError):
        loss_fn(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError):
        loss_fn(torch.randn(2, 3, 4), torch.randn(2, 2, 4))
