"""In-training evaluation under 2-process DDP and FSDP (gloo, CPU): no deadlock, same results on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfoundry.checkpoints.format import load_checkpoint
from medfoundry.eval.in_training import read_eval_history
from medfoundry.methods.checkpoint_backbone import load_backbone
from medfoundry.recipes import recipes_dir
from medfoundry.train.run_logger import read_metrics

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)


def _pngs(root: Path, n: int = 16) -> Path:
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:40, 0:40]
    for i in range(n):
        d = root / ("disc" if i % 2 else "plain")
        d.mkdir(parents=True, exist_ok=True)
        disc = 0.5 * (((yy - 20) ** 2 + (xx - 20) ** 2) < 80) if i % 2 else 0.0
        img = 0.2 + 0.05 * rng.standard_normal((40, 40)) + disc
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_evalx_in_training_eval_two_ranks(strategy: str, tmp_path: Path, free_port: int) -> None:
    data = _pngs(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           "-m", "medfoundry_cli", "train", str(recipes_dir() / "tiny_dino_cpu.yaml"), f"output_dir={out}",
           f"data.root={data}", f"eval.data={data}", "train.steps=3", "eval.every_steps=2", f"dist.strategy={strategy}",
           "crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4",
           "dino.head.out_dim=32", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "dino.koleo_weight=0",
           "train.progress=false", "train.tensorboard=false", "train.checkpoint_every=3",
           "eval.tasks=[knn,health,retrieval]", "eval.retrieval_images=4", "eval.best_metric=val_knn_top1_k10"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in read_eval_history(out)] == [2, 3]  # written once (rank 0), not per rank
    logged = {r["step"]: r for r in read_metrics(out)}
    assert "eval/knn_top1_k20" in logged[2] and "eval/view_retrieval_ratio" in logged[3]
    best = json.loads((out / "best.json").read_text())
    name = "best.dcp" if strategy == "fsdp" else "best.pt"  # FSDP: sharded, every rank writes its own shards
    assert best["checkpoint"] == name
    assert {p.name for p in out.glob("best.*")} - {"best.json", "best.pt.sha256.json"} == {name}  # one kind only
    state = load_checkpoint(out / name)
    assert state["step"] == best["step"]
    cls = state["method"]["teacher.backbone.vit.cls_token"]
    assert isinstance(cls, torch.Tensor) and cls.shape == (1, 1, 64)  # full tensor, not a shard
    lb = load_backbone(out, which="best")
    assert torch.equal(lb.backbone.vit.cls_token, cls)
    last = load_backbone(out)  # the newest checkpoint: a .pt file (DDP) or a sharded .dcp folder (FSDP)
    assert last.checkpoint.name.startswith("step_00000003") and last.step == 3
