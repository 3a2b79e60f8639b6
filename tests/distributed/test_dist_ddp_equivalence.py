"""Two gloo processes with half a batch each == one process with the whole batch (loss and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medfoundry.config import load_config
from medfoundry.methods.dino.method import DINOMethod

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)

OVERRIDES = [
    "model.name=vit_tiny_patch8",
    "model.img_size=32",
    "model.in_chans=1",
    "dino.head.out_dim=64",
    "dino.head.hidden_dim=32",
    "dino.head.bottleneck_dim=16",
    "dino.ibot_weight=1.0",
    "dino.gram_weight=0.5",
]


def _batch(b: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(2, b, 16, generator=g) < 0.3
    masks[:, :, 0] = True
    return {
        "global_crops": torch.randn(2, b, 1, 32, 32, generator=g),
        "local_crops": torch.randn(2, b, 1, 16, 16, generator=g),
        "masks": masks,
    }


def _method(centering: str) -> DINOMethod:
    cfg = load_config(None, [*OVERRIDES, f"dino.centering={centering}"])
    torch.manual_seed(0)
    return DINOMethod(cfg.model, cfg.dino, total_steps=10)


def _grads(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, centering: str, result_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        method = _method(centering)
        ddp = torch.nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
        full = _batch()
        half = {k: v[:, rank * 2 : (rank + 1) * 2] for k, v in full.items()}
        out = ddp(half, 0)
        out["loss"].backward()
        loss = out["loss"].detach().clone()
        dist.all_reduce(loss)
        if rank == 0:
            torch.save((float(loss / 2), _grads(method)), result_path)
        del ddp, out
        dist.barrier()
    finally:
        import gc

        gc.collect()  # release the DDP reducer before the process group goes away
        dist.destroy_process_group()


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_two_processes_match_one(centering: str, free_port: int, tmp_path) -> None:
    method = _method(centering)
    out = method(_batch(), 0)
    out["loss"].backward()
    ref_loss, ref_grads = float(out["loss"].detach()), _grads(method)

    result = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(free_port, centering, str(result)), nprocs=2, join=True)
    loss, grads = torch.load(result)
    assert abs(loss - ref_loss) < 1e-5
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
