"""``medfoundry sweep recipes/tiny_dino_cpu.yaml dino.center_momentum=0.9,0.999 train.steps=20`` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from medfoundry.recipes import recipes_dir
from medfoundry.train.run_logger import read_metrics
from medfoundry_cli.cli import main

RECIPE = recipes_dir() / "tiny_dino_cpu.yaml"
FAST = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4",
        "train.progress=false", "train.tensorboard=false"]



def test_sweep_two_arms_writes_table(tmp_path: Path, png_folder: Path, capsys) -> None:
    sweep_dir = tmp_path / "sweep"
    argv = ["sweep", str(RECIPE), "dino.center_momentum=0.9,0.999", "train.steps=20", *FAST,
            f"data.root={png_folder}", "--sweep-dir", str(sweep_dir), "--price-per-gpu-hour", "3.0"]
    assert main(argv) == 0
    names = ["arm_00_center_momentum-0.9", "arm_01_center_momentum-0.999"]
    for name in names:
        records = read_metrics(sweep_dir / name)
        assert [r["step"] for r in records][-1] == 20
        cfg_text = (sweep_dir / name / "config.yaml").read_text()
        assert f"center_momentum: {name.rsplit('-', 1)[1]}" in cfg_text
        assert json.loads((sweep_dir / name / "sweep_arm.json").read_text())["status"] == "ok"
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert [r["arm"] for r in rows] == names
    assert [r["overrides"] for r in rows] == ["dino.center_momentum=0.9", "dino.center_momentum=0.999"]
    for row in rows:
        assert row["status"] == "ok" and row["steps"] == "20"
        assert float(row["best_loss"]) <= float(row["final_loss"])
        assert row["device"] == "cpu" and row["gpus"] == "0"
        assert float(row["wall_hours"]) > 0 and float(row["gpu_hours"]) == 0 and float(row["cost_usd"]) == 0
    md = (sweep_dir / "results.md").read_text()
    assert all(f"| {name} | ok |" in md for name in names)
    assert "3 USD per GPU-hour" in md
    assert "results.md" in capsys.readouterr().out

    # a second call skips the finished arms and rewrites the same table; --collect only tabulates
    assert main(argv) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["sweep", "--collect", "--sweep-dir", str(sweep_dir)]) == 0
    assert [r["arm"] for r in csv.DictReader((sweep_dir / "results.csv").open())] == names


def test_failed_arm_is_recorded_and_sweep_continues(tmp_path: Path, capsys) -> None:
    sweep_dir = tmp_path / "sweep"
    missing = [str(tmp_path / "no_images_a"), str(tmp_path / "no_images_b")]
    rc = main(["sweep", str(RECIPE), f"data.root={missing[0]},{missing[1]}", "train.steps=2", *FAST,
               "--sweep-dir", str(sweep_dir)])
    assert rc == 1
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "failed" and r["error"] for r in rows)
    assert "arm(s) not ok" in capsys.readouterr().err


def test_submitit_dry_run_writes_array_script(tmp_path: Path, monkeypatch, capsys) -> None:
    import subprocess

    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "sw"
    rc = main(["sweep", "--submitit", "nodes=1", "gpus_per_node=2", "time=45", str(RECIPE), "optim.lr=1e-4,2e-4,4e-4",
               "--sweep-dir", str(sweep_dir), "--dry-run"])
    assert rc == 0
    script = (sweep_dir / "launch" / "array.sbatch").read_text()
    assert script.startswith("#!/bin/bash") and "#SBATCH --array=0-2%3" in script
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --time=45" in script
    assert "submitit.core._submit" in script
    assert subprocess.run(["bash", "-n", str(sweep_dir / "launch" / "array.sbatch")]).returncode == 0
    assert not (sweep_dir / "results.csv").exists()
    assert len(json.loads((sweep_dir / "sweep.json").read_text())["arms"]) == 3


def test_submitit_job_array_with_fake_scheduler(tmp_path: Path, png_folder: Path, fake_slurm: Path, capsys) -> None:
    """Submit through submitit (stand-in sbatch/srun), then run one array task as SLURM would and collect."""
    import os
    import subprocess
    import sys

    sweep_dir = tmp_path / "sw"
    rc = main(["sweep", "--submitit", "nodes=1", "gpus_per_node=0", "time=10", str(RECIPE), "train.steps=1,2",
               *FAST, f"data.root={png_folder}", "--sweep-dir", str(sweep_dir), "--no-wait"])
    assert rc == 0 and "submitted job array 4242 with 2 arm(s)" in capsys.readouterr().out
    assert json.loads((sweep_dir / "launch" / "jobs.json").read_text()) == {
        "arm_00_steps-1": "4242_0", "arm_01_steps-2": "4242_1"}

    env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4242",
           "SLURM_ARRAY_TASK_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost",
           "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    worker = subprocess.run([sys.executable, "-u", "-m", "submitit.core._submit", str(sweep_dir / "launch")],
                            env=env, capture_output=True, text=True, timeout=240)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert main(["sweep", "--collect", "--sweep-dir", str(sweep_dir)]) == 1  # arm 1 never ran
    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert [(r["arm"], r["status"], r["steps"]) for r in rows] == [("arm_00_steps-1", "ok", "1"),
                                                                   ("arm_01_steps-2", "not run", "")]
