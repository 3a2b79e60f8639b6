"""FSDP2 on CPU (gloo): trains the tiny recipe, writes a sharded checkpoint, resumes on 1 rank."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medfoundry.checkpoints.format import list_checkpoints, load_checkpoint
from medfoundry.recipes import recipes_dir
from medfoundry.train.run_logger import read_metrics

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)

ARGS = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4",
        "train.progress=false", "train.tensorboard=false", "dist.strategy=fsdp", "dino.koleo_weight=0",
        "train.checkpoint_every=2"]


def _train(out: Path, root: Path, steps: int, nproc: int, port: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(port)] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "medfoundry_cli", "train", str(recipes_dir() / "tiny_dino_cpu.yaml"), *ARGS,
           f"output_dir={out}", f"data.root={root}", f"train.steps={steps}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_rank_sharded_checkpoint_resumes_on_one_rank(tmp_path: Path, png_folder: Path, free_port: int) -> None:
    _train(tmp_path / "a", png_folder, steps=2, nproc=2, port=free_port)
    ckpts = list_checkpoints(tmp_path / "a")
    assert [p.name for p in ckpts] == ["step_00000002.dcp"] and ckpts[0].is_dir()
    assert len(list(ckpts[0].glob("*.distcp"))) == 2  # one shard file per rank

    _train(tmp_path / "a", png_folder, steps=3, nproc=1, port=free_port)  # resume on one process
    _train(tmp_path / "b", png_folder, steps=3, nproc=2, port=free_port + 1)  # uninterrupted on two ranks
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [1, 2, 3]
    for key in ("loss", "dino_loss", "ibot_loss"):
        assert a[2][key] == pytest.approx(b[2][key], rel=1e-5, abs=1e-6), key

    state = load_checkpoint(ckpts[0])  # consolidated view for export
    assert state["step"] == 2 and "student.backbone.vit.cls_token" in state["method"]
