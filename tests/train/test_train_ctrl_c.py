"""Ctrl-C checkpoints like SIGTERM: the first press (SIGINT to the whole process group, as a terminal sends it,
data-loader workers included) writes the checkpoint of the current step and exits with the pre-emption code;
the same command then resumes from it and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfoundry.recipes import recipes_dir
from medfoundry.train.preemption import PREEMPTED_EXIT_CODE

ARGS = ["model.img_size=32", "crops.global_size=32", "crops.local_size=16", "dino.head.out_dim=64",
        "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "train.batch_size=4", "train.steps=400",
        "train.schedule_steps=400", "train.checkpoint_every=1000", "train.log_every=1", "train.progress=false",
        "train.tensorboard=false", "data.num_workers=1"]


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
def test_first_ctrl_c_checkpoints_the_current_step_and_the_run_resumes(tmp_path: Path, png_folder: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medfoundry_cli", "train", str(recipes_dir() / "tiny_dino_cpu.yaml"), *ARGS,
           f"output_dir={out}", f"data.root={png_folder}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while _steps_logged(out) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "Ctrl-C: writing a checkpoint" in err and "Traceback" not in err
    saved = sorted((out / "checkpoints").glob("step_*.pt"))
    assert saved, "no checkpoint written on Ctrl-C"
    stopped_at = int(saved[-1].stem.split("_")[1])
    assert 3 <= stopped_at < 400
    done = subprocess.run([*cmd, "train.steps=" + str(stopped_at + 2)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == stopped_at + 2
