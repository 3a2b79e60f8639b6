"""A sweep arm's wall time (hence its GPU-hours and cost) is the training loop's, not the process's one-time setup:
two identical arms report similar wall times even though the first one pays for the imports."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfoundry.recipes import recipes_dir
from medfoundry_cli.sweep import run_arm

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)

RECIPE = recipes_dir() / "tiny_dino_cpu.yaml"
FAST = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4",
        "train.progress=false", "train.tensorboard=false", "train.checkpoint_every=100"]


def test_identical_arms_in_a_fresh_process_report_similar_wall_times(tmp_path: Path, png_folder: Path) -> None:
    """In a new interpreter the first arm imports torch, timm, the method, data and evaluation modules."""
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "medfoundry_cli.cli", "sweep", str(RECIPE), "train.seed=0,0", "train.steps=3", *FAST,
         f"data.root={png_folder}", "--sweep-dir", str(sweep_dir)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((sweep_dir / name / "sweep_arm.json").read_text())
               for name in ("arm_00_seed-0", "arm_01_seed-0")]
    walls = [r["wall_s"] for r in records]
    assert all(r["status"] == "ok" for r in records) and min(walls) > 0
    assert max(walls) / min(walls) < 3.0, records  # the imports (several seconds) are not in the first arm's time
    assert all(r["setup_s"] >= 0 for r in records)


def test_wall_time_starts_when_the_training_loop_starts(tmp_path: Path, png_folder: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow work before the loop (here a method build that sleeps, as a first import does) is setup, not wall time."""
    from medfoundry import methods
    from medfoundry.train.hooks import HOOK_BUILDERS

    real = methods.METHODS["dino"]
    delay = 2.0

    def slow_build(cfg):
        time.sleep(delay)
        return real.build(cfg)

    monkeypatch.setitem(methods.METHODS, "dino", dataclasses.replace(real, build=slow_build))
    out = tmp_path / "arm"
    rec = run_arm(str(RECIPE), ["train.steps=2", *FAST, f"data.root={png_folder}", f"output_dir={out}"], str(out))
    assert rec["status"] == "ok", rec["error"]
    assert 0 < rec["wall_s"] < delay, rec
    assert rec["setup_s"] >= delay
    assert json.loads((out / "sweep_arm.json").read_text())["wall_s"] == rec["wall_s"]
    assert all(getattr(b, "__module__", "") != "medfoundry_cli.sweep" for b in HOOK_BUILDERS)  # the clock is removed
