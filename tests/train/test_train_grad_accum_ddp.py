"""Gradient accumulation under DDP: 2 gloo ranks x 2 micro-batches (the first under ``no_sync``) give the gradients
and centre of one process with the whole batch, and ``torchrun`` with accumulation follows a one-process big-batch
run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medfoundry.config import load_config
from medfoundry.methods.dino.method import DINOMethod
from medfoundry.recipes import recipes_dir
from medfoundry.train.accumulate import StepOutputs
from medfoundry.train.loop import train
from medfoundry.train.run_logger import read_metrics

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)

OVERRIDES = ["model.name=vit_tiny_patch8", "model.img_size=32", "model.in_chans=1", "dino.head.out_dim=64",
             "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "dino.ibot_weight=1.0"]


def _batch(b: int = 8) -> dict:
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(2, b, 16, generator=g) < 0.3
    masks[:, :, 0] = True
    return {"global_crops": torch.randn(2, b, 1, 32, 32, generator=g),
            "local_crops": torch.randn(2, b, 1, 16, 16, generator=g), "masks": masks}


def _method() -> DINOMethod:
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    return DINOMethod(cfg.model, cfg.dino, total_steps=10)


def _grads(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, result_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        method = _method()
        ddp = torch.nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
        full = _batch()
        acc = StepOutputs(2)
        method.start_step(0)
        for m in range(2):  # micro-batch m holds samples 4m .. 4m+3; rank r its r-th half (StepBatchSampler)
            lo = 4 * m + 2 * rank
            micro = {k: v[:, lo:lo + 2] for k, v in full.items()}
            acc.forward_backward(ddp, micro, 0, m == 1, False, "fp32", torch.device("cpu"))
        assert acc.finite and not acc.stop
        method.after_optimizer_step(0)
        if rank == 0:
            torch.save((_grads(method), method.dino_loss.center.clone()), result_path)
        del ddp
        dist.barrier()
    finally:
        import gc

        gc.collect()  # release the DDP reducer before the process group goes away
        dist.destroy_process_group()


def test_two_ranks_accumulating_match_one_process(free_port: int, tmp_path) -> None:
    method = _method()
    method(_batch(), 0)["loss"].backward()
    ref = _grads(method)
    method.after_optimizer_step(0)
    result = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(free_port, str(result)), nprocs=2, join=True)
    grads, center = torch.load(result)
    assert set(grads) == set(ref)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(center, method.dino_loss.center, atol=1e-6, rtol=1e-5)


def test_torchrun_with_accumulation_follows_the_big_batch(tmp_path: Path, png_folder: Path, free_port: int) -> None:
    """2 ranks x batch 4 x 2 micro-batches (the loop, DDP, no_sync) == 1 process x batch 8, step by step (DINO +
    iBOT with centering: both exact; iBOT on, since DDP needs the mask token to get a gradient)."""
    recipe = recipes_dir() / "tiny_dino_cpu.yaml"
    exact = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "model.drop_path_rate=0",
             "dino.koleo_weight=0", "dino.ibot_weight=1", "dino.head.out_dim=64", "dino.head.hidden_dim=32",
             "dino.head.bottleneck_dim=16", "train.progress=false", "train.tensorboard=false", "train.steps=3",
             f"data.root={png_folder}"]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           "-m", "medfoundry_cli", "train", str(recipe), *exact, f"output_dir={out}", "train.batch_size=4",
           "train.grad_accum_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train(load_config(recipe, [*exact, f"output_dir={tmp_path / 'one'}", "train.batch_size=8"]))
    want = read_metrics(tmp_path / "one")
    assert [r["step"] for r in got] == [1, 2, 3]
    for g, w in zip(got, want):
        for key in ("loss", "dino_loss", "ibot_loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["step"], key)
