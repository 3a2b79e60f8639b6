"""The best checkpoint of in-training evaluation: ``best.pt`` in one process, one kind per run folder, resolution.

The sharded ``best.dcp`` an FSDP run writes is tested with two gloo ranks in
``tests/distributed/test_dist_fsdp_sharded_save.py`` (no gather, shards per rank, loads back).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from medfoundry.checkpoints.format import best_checkpoint, is_best_checkpoint, load_checkpoint
from medfoundry.checkpoints.integrity import verify_checkpoint
from medfoundry.eval.best import BestCheckpoint
from medfoundry.methods.checkpoint_backbone import run_folder_of


def _tracker() -> BestCheckpoint:
    return BestCheckpoint("val_knn_top1_k20", "max", {"method": "dino"}, "eval.best_metric", say=lambda _: None)


def test_best_pt_is_written_checksummed_and_replaces_a_sharded_one(tmp_path: Path) -> None:
    stale = tmp_path / "best.dcp"  # e.g. left by an FSDP run that was resumed with DDP
    stale.mkdir()
    (stale / "meta.pt").write_bytes(b"x")
    model = nn.Linear(3, 2)
    tracker = _tracker()
    assert tracker.update(4, {"val_knn_top1_k20": 0.25}, model, tmp_path)
    assert not stale.exists() and best_checkpoint(tmp_path) == tmp_path / "best.pt"
    assert verify_checkpoint(tmp_path / "best.pt") == "checksum"
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["step"] == 4 and torch.equal(state["method"]["weight"], model.weight)
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "best.pt"
    assert not tracker.update(5, {"val_knn_top1_k20": 0.2}, model, tmp_path)  # worse: nothing rewritten
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 4


def test_best_checkpoint_resolution(tmp_path: Path) -> None:
    assert best_checkpoint(tmp_path) is None
    (tmp_path / "best.dcp").mkdir()
    assert best_checkpoint(tmp_path) is None  # an unfinished folder (no meta.pt) is not a checkpoint
    (tmp_path / "best.dcp" / "meta.pt").write_bytes(b"x")
    assert best_checkpoint(tmp_path) == tmp_path / "best.dcp"
    (tmp_path / "best.pt").write_bytes(b"x")
    (tmp_path / "best.json").write_text(json.dumps({"checkpoint": "best.dcp"}))
    assert best_checkpoint(tmp_path) == tmp_path / "best.dcp"  # both (a crash between): best.json decides
    (tmp_path / "best.json").write_text(json.dumps({"checkpoint": "best.pt"}))
    assert best_checkpoint(tmp_path) == tmp_path / "best.pt"
    assert is_best_checkpoint(tmp_path / "best.dcp") and not is_best_checkpoint(tmp_path / "step_00000001.dcp")
    assert run_folder_of(tmp_path / "best.dcp") == tmp_path
