"""``train.nonfinite_check=device`` under DDP: a NaN on one rank skips the step on every rank, on the device.

Two gloo ranks run a DDP-wrapped DINO method (iBOT with centering) through the loop's own pieces
(``StepOutputs(defer=True)`` and ``train/step.py::update(skip=...)``) with a fused AdamW. At step 1 only rank 1's
loss is NaN: the all-reduced flag reaches rank 0, and on both ranks every tensor of the method (student, EMA
teacher, centres) and of the optimizer stays bit-identical to before the step; the next finite step moves them
again, equally on both ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)

OVERRIDES = ["model.name=vit_tiny_patch8", "model.img_size=32", "model.in_chans=1", "dino.head.out_dim=32",
             "dino.head.hidden_dim=16", "dino.head.bottleneck_dim=8", "dino.ibot_weight=1.0",
             "dino.centering=center"]


def _batch(rank: int, step: int, b: int = 2) -> dict:
    g = torch.Generator().manual_seed(10 * step + rank)
    masks = torch.rand(2, b, 16, generator=g) < 0.3
    masks[:, :, 0] = True
    return {"global_crops": torch.randn(2, b, 1, 32, 32, generator=g),
            "local_crops": torch.randn(2, b, 1, 16, 16, generator=g), "masks": masks}


def _digest(method, optimizer) -> dict[str, float]:
    """A float64 sum per tensor: enough to see any change, comparable across ranks as JSON."""
    out = {f"m.{k}": v.double().sum().item() for k, v in method.state_dict().items()}
    for i, st in enumerate(optimizer.state.values()):
        out.update({f"o.{i}.{k}": v.double().sum().item() for k, v in st.items()})
    return out


def _worker(rank: int, port: int, result: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from medfoundry.config import load_config
    from medfoundry.methods.dino.method import DINOMethod
    from medfoundry.train import step as train_step
    from medfoundry.train.accumulate import StepOutputs
    from medfoundry.train.optim import build_optimizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = load_config(None, OVERRIDES)
        torch.manual_seed(0)
        method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
        model = DistributedDataParallel(method)
        optimizer = build_optimizer(method, cfg.optim, method.student["backbone"].depth, fused=True)
        params = [p for p in method.parameters() if p.requires_grad]

        def poisoned(batch: dict, step: int) -> dict:
            out = model(batch, step)
            if step == 1 and rank == 1:
                out["loss"] = out["loss"] * float("nan")
            return out

        digests, flags = [], []
        for step in range(3):
            method.start_step(step)
            acc = StepOutputs(1, defer=True)
            acc.forward_backward(poisoned, _batch(rank, step), step, True, False, "fp32", torch.device("cpu"))
            train_step.update(method, optimizer, params, acc.mean(), step, 3.0, torch.device("cpu"), skip=acc.skip)
            flags.append(acc.flags.tolist())
            digests.append(_digest(method, optimizer))
        Path(f"{result}.{rank}").write_text(json.dumps({"digests": digests, "flags": flags}))
    finally:
        dist.destroy_process_group()


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path, free_port: int) -> None:
    result = tmp_path / "result"
    mp.spawn(_worker, args=(free_port, str(result)), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in (0, 1)]
    assert ranks[0]["flags"] == ranks[1]["flags"] == [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]  # agreed on both
    for r in ranks:
        d0, d1, d2 = r["digests"]
        assert d1 == d0  # step 1 (NaN on rank 1 only) changed nothing, on either rank
        assert d2 != d1 and all(v == v for v in d2.values())  # step 2 trains again, nothing non-finite
    assert ranks[0]["digests"] == ranks[1]["digests"]  # the ranks stay in step
