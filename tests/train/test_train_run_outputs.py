"""What a run tells its user besides metrics.jsonl: the start-of-run summary, plain progress lines in a log file,
TensorBoard's sample input crops and hparams."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medfoundry.config import load_config
from medfoundry.methods import get_method_entry
from medfoundry.recipes import recipes_dir
from medfoundry.train import run_logger
from medfoundry.train.progress import PlainProgress, format_duration
from medfoundry.train.run_logger import RunLogger, read_metrics
from medfoundry.train.run_summary import RunSummary, format_summary, parameter_counts, source_counts
from medfoundry.train.sample_images import input_grid

RECIPE = recipes_dir() / "tiny_dino_cpu.yaml"
SMALL = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4", "train.device=cpu"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 5-step run through the real command line, stdout and stderr into files (not a terminal), as under SLURM."""
    from labelled_images import write_grey_pngs

    work = tmp_path_factory.mktemp("outputs")
    pngs = write_grey_pngs(work / "pngs")
    run = work / "run"
    args = [*SMALL, f"output_dir={run}", f"data.root={pngs}", "train.steps=5", "train.log_every=2",
            "train.progress=true", "train.tensorboard=true", "train.checkpoint_every=1000"]
    with open(work / "out.log", "w") as out, open(work / "err.log", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "medfoundry_cli", "train", str(RECIPE), *args], stdout=out,
                              stderr=err, timeout=300, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    stderr = (work / "err.log").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    return {"run": run, "stdout": (work / "out.log").read_text(), "stderr": stderr, "args": args}


def test_progress_in_a_log_file_is_one_plain_line_per_log_interval(logged_run: dict) -> None:
    err = logged_run["stderr"]
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train step")]
    assert [line.split()[2] for line in lines] == ["2/5", "4/5", "5/5"]  # every log_every=2 steps and the last
    for line, record in zip(lines, [r for r in read_metrics(logged_run["run"]) if r["step"] in (2, 4, 5)]):
        assert f"loss {record['loss']:.4f}" in line and f"lr {record['lr']:.3g}" in line
        assert "steps/s" in line or "s/step" in line
        assert " ETA " in line


def test_start_summary_is_printed_and_written_to_the_run_folder(logged_run: dict) -> None:
    run = logged_run["run"]
    text = (run / "run_summary.txt").read_text()
    assert text.strip() in logged_run["stdout"]
    summary = json.loads((run / "run_summary.json").read_text())
    cfg = load_config(RECIPE, logged_run["args"])
    torch.manual_seed(cfg.train.seed)
    method = get_method_entry(cfg.method).build(cfg)
    counts = {c["name"]: c for c in summary["parameters"]}
    student = sum(p.numel() for p in method.student.parameters())
    teacher = sum(p.numel() for p in method.teacher.parameters())
    assert counts["all"]["total"] == student + teacher
    assert counts["student"]["total"] == student and counts["teacher"]["trainable"] == 0
    assert counts["all"]["trainable"] == sum(p.numel() for p in method.parameters() if p.requires_grad)
    assert counts["all"]["trainable"] + counts["all"]["frozen"] == counts["all"]["total"]
    assert counts["student.backbone"]["total"] == sum(p.numel() for p in method.student["backbone"].parameters())
    assert summary["method"] == "dino" and summary["backbone"] == cfg.model.name == "vit_tiny_patch8"
    assert summary["device"] == "cpu" and summary["precision"] == "fp32" and summary["world_size"] == 1
    assert summary["data_kind"] == "image_folder" and summary["inputs"] == {"data.root": cfg.data.root}
    assert summary["samples"] == 12 and summary["skipped"] is None  # a folder source does not report skips
    assert (summary["batch_size"], summary["steps"], summary["start_step"]) == (4, 5, 0)
    assert summary["outputs"] == ["metrics.jsonl", "tensorboard"]
    for needle in ("run dir", str(run), "vit_tiny_patch8", "12 samples found", "batch 4", "5 steps",
                   "new run (step 0)", "world size 1"):
        assert needle in text, needle
    assert len(text.strip().splitlines()) <= 12


def test_tensorboard_has_the_first_batch_crops_and_the_hparams(logged_run: dict) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(logged_run["run"] / "tensorboard"),
                              size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    (image,) = events.Images("inputs/global_crops")
    # 4 samples x 2 global crops of 32 px: one row per sample, its two views side by side, 2 px padding
    assert (image.step, image.height, image.width) == (0, 4 * 32 + 5 * 2, 2 * 32 + 3 * 2)
    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(5e-4)
    assert start.hparams["train.batch_size"].number_value == 4
    assert start.hparams["model.name"].string_value == "vit_tiny_patch8"
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    last = read_metrics(logged_run["run"])[-1]
    assert {"loss", "dino_loss", "lr"} <= metric_tags
    assert events.Scalars("loss")[-1].value == pytest.approx(last["loss"])  # the hparams metric's final value


def test_plain_progress_lines_rate_and_eta() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = PlainProgress(start_step=10, total=20, every=4, stream=stream, clock=lambda: now[0])
    written = []
    for _ in range(10):  # half a second per step
        now[0] += 0.5
        written.append(progress.update(1, loss=1.5, lr=2e-4))
    lines = stream.getvalue().splitlines()
    assert [w is not None for w in written] == [False, True, False, False, False, True, False, False, False, True]
    assert lines == [w for w in written if w is not None]
    assert lines[0] == "train step 12/20 (60%) loss 1.5000 lr 0.0002 2 steps/s ETA 0:00:04"
    assert lines[-1].startswith("train step 20/20 (100%)") and lines[-1].endswith("ETA 0:00:00")
    assert format_duration(2 * 86400 + 3661) == "2 days, 1:01:01"


def test_a_terminal_keeps_the_bar_and_a_file_gets_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_logger, "stderr_is_terminal", lambda: True)
    tty = RunLogger(tmp_path / "a", True, 0, 10, tensorboard=False)
    assert tty.bar is not None and tty.lines is None
    tty.close()
    monkeypatch.setattr(run_logger, "stderr_is_terminal", lambda: False)
    log = RunLogger(tmp_path / "b", True, 0, 10, tensorboard=False, log_every=5)
    assert log.bar is None and log.lines is not None and log.lines.every == 5
    assert RunLogger(tmp_path / "c", True, 0, 10, tensorboard=False, progress=False).lines is None


def test_input_grid_draws_nothing_random_and_handles_each_layout() -> None:
    torch.manual_seed(3)
    views = torch.randn(2, 6, 1, 16, 16)  # (global views, batch, C, H, W)
    local = torch.randn(4, 6, 1, 8, 8)
    stacked = torch.randn(5, 5, 12, 12)  # CLIP-style images with 5 stacked slices
    state, before = torch.get_rng_state(), views.clone()
    key, grid = input_grid({"global_crops": views, "local_crops": local})
    assert key == "global_crops" and grid.shape == (3, 4 * 16 + 5 * 2, 2 * 16 + 3 * 2)  # 8 of 12 crops: 4 rows
    assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0
    key, grid = input_grid({"images": stacked})
    assert key == "images" and grid.shape == (3, 2 * 12 + 3 * 2, 4 * 12 + 5 * 2)
    first = grid[:, 2:14, 2:14]
    middle = stacked[0, 2]
    assert torch.allclose(first[0], (middle - middle.min()) / (middle.max() - middle.min()), atol=1e-6)
    assert input_grid({"input_ids": torch.zeros(2, 7)}) is None
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(views, before)  # the batch itself is not normalised in place


def test_summary_counts_a_frozen_part_and_reports_skipped_files() -> None:
    module = torch.nn.Module()
    module.student = torch.nn.Linear(4, 3)  # 15 trainable
    module.teacher = torch.nn.Linear(4, 3).requires_grad_(False)  # 15 frozen
    module.scale = torch.nn.Parameter(torch.ones(()))  # 1, on the module itself
    counts = {c.name: c for c in parameter_counts(module, {"student.backbone": module.student})}
    assert (counts["all"].total, counts["all"].trainable, counts["all"].frozen) == (31, 16, 15)
    assert counts["teacher"].frozen == 15 and counts["(own)"].total == 1 and counts["student.backbone"].total == 15

    class Source:
        skipped = [(f"/d/vol{i}.nii.gz", "ReaderError: truncated") for i in range(7)]

    class Dataset:
        source = Source()

        def __len__(self) -> int:
            return 40

    samples, skipped = source_counts(Dataset())
    assert samples == 40 and len(skipped) == 7
    text = format_summary(RunSummary(
        run_dir="runs/x", method="dino", backbone="vit_small_patch16", parameters=list(counts.values()), device="cpu",
        precision="fp32", world_size=2, data_kind="nifti", inputs={"data.root": "/d"}, samples=samples,
        skipped=skipped, batch_size=8, steps=100, start_step=40, resumed_from="runs/x/checkpoints/step_00000040.pt"))
    assert "40 samples found, 7 skipped while indexing" in text
    assert "skipped /d/vol0.nii.gz: ReaderError: truncated" in text and "... and 2 more skipped" in text
    assert "batch 8 (4 per rank)" in text and "resuming at step 40 from runs/x/checkpoints/step_00000040.pt" in text
    assert "teacher 15 frozen" in text and "31 total, 16 trainable, 15 frozen" in text
