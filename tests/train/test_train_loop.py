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


def test_log_every_changes_only_which_steps_are_read(tmp_path: Path, png_folder: Path, monkeypatch) -> None:
    """``train.log_every=2`` reads the device metrics only at steps 2 and 4, with the health monitors on (they
    observe logged steps); what it logs there equals what a run that reads every step logs, and the trained
    weights are the same (the skipped reads change nothing)."""
    from medfoundry.train import step as train_step

    reads: list[int] = []
    read = train_step.read_metrics
    monkeypatch.setattr(train_step, "read_metrics", lambda metrics: reads.append(1) or read(metrics))
    every = _run(tmp_path / "every", png_folder, "train.steps=4", "train.checkpoint_every=4", "train.log_every=1")
    assert len(reads) == 4
    reads.clear()
    sparse = _run(tmp_path / "sparse", png_folder, "train.steps=4", "train.checkpoint_every=4", "train.log_every=2")
    assert len(reads) == 2  # one host read per logged step, none in between
    from medfoundry.eval.in_training import MonitorHook
    from medfoundry.train.hooks import build_hooks

    assert any(isinstance(h, MonitorHook) for h in build_hooks(load_config(sparse / "config.yaml")))
    a = {r["step"]: r for r in read_metrics(every)}
    b = {r["step"]: r for r in read_metrics(sparse)}
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [2, 4]
    for step in (2, 4):
        assert set(a[step]) == set(b[step])
        for key, value in a[step].items():
            if key != "images_per_s":  # wall-clock throughput
                assert b[step][key] == value, (step, key)
    wa = torch.load(list_checkpoints(every)[-1], weights_only=False)["method"]
    wb = torch.load(list_checkpoints(sparse)[-1], weights_only=False)["method"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


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
