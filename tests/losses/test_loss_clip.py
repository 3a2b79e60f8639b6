"""The contrastive losses: equal to open_clip's on the same inputs, and exact under 2-process DDP (gloo)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from medfoundry.losses.clip import ClipInfoNCELoss, SigLIPLoss

WORLD = 2


def _features(n: int = 12, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def test_infonce_equals_open_clip_cliploss():
    from open_clip.loss import ClipLoss

    img, txt = _features()
    for scale in (1.0, 1 / 0.07, 100.0):
        s = torch.tensor(scale)
        ours = ClipInfoNCELoss()(img, txt, s)
        ref = ClipLoss()(img, txt, s)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_siglip_equals_open_clip_sigliploss():
    from open_clip.loss import SigLipLoss

    img, txt = _features(seed=1)
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    torch.testing.assert_close(SigLIPLoss()(img, txt, s, b), SigLipLoss()(img, txt, s, b), rtol=1e-6, atol=1e-6)


def test_infonce_gradient_matches_manual_formula():
    img, txt = _features(n=6, d=8, seed=2)
    img.requires_grad_(True)
    scale = torch.tensor(14.0, requires_grad=True)
    ClipInfoNCELoss()(img, txt, scale).backward()
    img2 = img.detach().clone().requires_grad_(True)
    scale2 = torch.tensor(14.0, requires_grad=True)
    logits = scale2 * img2 @ txt.t()
    labels = torch.arange(6)
    (0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))).backward()
    torch.testing.assert_close(img.grad, img2.grad)
    torch.testing.assert_close(scale.grad, scale2.grad)


class _Towers(nn.Module):
    """Two linear 'towers' and a learnable logit scale (and bias): enough to check gradients end to end."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.img = nn.Linear(10, 8)
        self.txt = nn.Linear(6, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))
        # a bias only where the loss uses it: DDP needs every trainable parameter to receive a gradient
        self.logit_bias = nn.Parameter(torch.tensor(-1.0)) if isinstance(loss, SigLIPLoss) else None
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fi = F.normalize(self.img(x), dim=-1)
        ft = F.normalize(self.txt(y), dim=-1)
        return self.loss(fi, ft, self.logit_scale.exp(), self.logit_bias)


def _losses() -> list[nn.Module]:
    return [ClipInfoNCELoss(local_loss=True), ClipInfoNCELoss(local_loss=False), SigLIPLoss()]


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(8, 10, generator=g)  # global batch of 8 pairs
    y = torch.randn(8, 6, generator=g)

    refs = []  # single process, whole batch (no process group yet)
    for loss in _losses():
        model = _Towers(loss)
        value = model(x, y)
        value.backward()
        refs.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        shard = slice(rank * 4, (rank + 1) * 4)
        for loss, (ref_value, ref_grads) in zip(_losses(), refs):
            model = _Towers(loss)
            ddp = nn.parallel.DistributedDataParallel(model)
            value = ddp(x[shard], y[shard])
            value.backward()  # DDP averages the parameter gradients over ranks
            mean_value = value.detach().clone()
            dist.all_reduce(mean_value)
            mean_value /= WORLD
            torch.testing.assert_close(mean_value, ref_value, rtol=1e-5, atol=1e-6)
            assert set(ref_grads) == {n for n, _ in model.named_parameters()}
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name, lo=loss: f"{lo!r} grad of {n}: {m}")
            del ddp, model, value
        dist.barrier()
    finally:
        import gc

        gc.collect()  # release DDP reducers before the process group goes away
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.slow
def test_gathered_negatives_equal_single_process_whole_batch(free_port: int) -> None:
    """Two gloo ranks with 4 pairs each == one process with all 8 pairs: loss and every parameter gradient."""
    mp.spawn(_worker, args=(free_port,), nprocs=WORLD, join=True)
