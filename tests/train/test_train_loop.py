"""The training loop end to end on real PNG files: run folder, exact resume, non-finite guard, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nan_method import nan_dino_method

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.config import load_config
from medfoundry.recipes import recipes_dir
from medfoundry.train.loop import NonFiniteLossError, train
from medfoundry.train.run_logger import read_metrics
from medfoundry_cli.cli import main

RECIPE = recipes_dir() / "tiny_dino_cpu.yaml"
FAST = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4",
        "train.progress=false", "train.tensorboard=false"]
TERMS = ("loss", "dino_loss", "ibot_loss", "koleo_loss", "teacher_entropy")


def _run(out: Path, root: Path, *extra: str) -> Path:
    return train(load_config(RECIPE, [*FAST, f"output_dir={out}", f"data.root={root}", *extra]))


def test_run_folder_contents(tmp_path: Path, png_folder: Path) -> None:
    run = _run(tmp_path / "run", png_folder, "train.steps=4", "train.checkpoint_every=2", "train.tensorboard=true")
    assert (run / "config.yaml").is_file()
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in (*TERMS, "lr", "grad_norm", "images_per_s", "teacher_momentum"):
        assert key in records[0], key
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002.pt", "step_00000004.pt"]
    assert any((run / "tensorboard").iterdir())
    state = torch.load(list_checkpoints(run)[-1], weights_only=False)
    assert state["step"] == 4 and "teacher.backbone.mask_token" in state["method"]


def test_resume_matches_an_uninterrupted_run(tmp_path: Path, png_folder: Path) -> None:
    _run(tmp_path / "a", png_folder, "train.steps=4", "train.checkpoint_every=4")
    _run(tmp_path / "a", png_folder, "train.steps=8", "train.checkpoint_every=4")
    _run(tmp_path / "b", png_folder, "train.steps=8", "train.checkpoint_every=4")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in a] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in TERMS:
            assert ra[key] == rb[key], (ra["step"], key)


def test_resume_after_a_crash_rewrites_metrics_past_the_checkpoint(tmp_path: Path, png_folder: Path) -> None:
    run = _run(tmp_path / "r", png_folder, "train.steps=3", "train.checkpoint_every=2", "train.keep_last=2")
    before = read_metrics(run)
    list_checkpoints(run)[-1].unlink()  # as if killed after logging step 3 but before its checkpoint
    _run(tmp_path / "r", png_folder, "train.steps=3", "train.checkpoint_every=2", "train.keep_last=2")
    after = read_metrics(run)
    assert [r["step"] for r in after] == [1, 2, 3]
    assert after[2]["loss"] == before[2]["loss"]


def test_nonfinite_losses_are_skipped_then_stop(tmp_path: Path, png_folder: Path, capsys) -> None:
    with nan_dino_method("nan_test"):
        cfg = load_config(RECIPE, [*FAST, f"output_dir={tmp_path / 'n'}", f"data.root={png_folder}",
                                   "train.steps=10", "train.checkpoint_every=2", "train.max_nonfinite_steps=3"])
        cfg.method = "nan_test"
        with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row") as err:
            train(cfg)
    assert "step_00000002.pt" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path / "n")] == ["step_00000002.pt"]
    assert "non-finite loss at step 3" in capsys.readouterr().out + (tmp_path / "n" / "error.log").read_text()
    assert [r["step"] for r in read_metrics(tmp_path / "n")] == [1, 2]


def test_too_many_unreadable_files_stop_with_their_names(tmp_path: Path, png_folder: Path) -> None:
    bad = png_folder / "series_0" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = main(["train", str(RECIPE), *FAST, f"output_dir={tmp_path / 'b'}", f"data.root={png_folder}",
                 "train.steps=6", "data.max_bad_fraction=0.0"])
    assert code == 3
    assert "broken.png" in (tmp_path / "b" / "error.log").read_text()
    code = main(["train", str(RECIPE), *FAST, f"output_dir={tmp_path / 'ok'}", f"data.root={png_folder}",
                 "train.steps=6", "data.max_bad_fraction=0.2"])
    assert code == 0


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path, png_folder: Path, free_port: int) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           "-m", "medfoundry_cli", "train", str(RECIPE), *FAST, f"output_dir={out}", f"data.root={png_folder}",
           "train.steps=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert len(list_checkpoints(out)) >= 1


def test_float8_on_cpu_is_refused_with_a_clear_message(tmp_path: Path, png_folder: Path, capsys) -> None:
    code = main(["train", str(RECIPE), *FAST, f"output_dir={tmp_path / 'f8'}", f"data.root={png_folder}",
                 "train.steps=1", "dist.float8=true"])
    assert code == 2
    assert "dist.float8" in capsys.readouterr().err
