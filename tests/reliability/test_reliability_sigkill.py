"""SIGKILL at random moments, in the middle of a checkpoint write and between a write and its checksum record:
every rerun resumes, the final metrics equal an uninterrupted run's, and no temporary file is left behind."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from reliability_testutil import TERMS, logged_steps, run, stale_temporaries, start, train_args, wait_for_step

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.train.run_logger import read_metrics

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)

STEPS = 10
EXTRA = [f"train.steps={STEPS}", "train.checkpoint_every=1", "train.keep_last=2"]


def _assert_same_metrics(a: Path, b: Path) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == list(range(1, STEPS + 1)), [r["step"] for r in ra]
    for x, y in zip(ra, rb):
        for key in TERMS:
            assert x[key] == y[key], (x["step"], key, x[key], y[key])


def test_random_sigkills_resume_exactly_and_leave_no_temporaries(tmp_path: Path, png_folder: Path) -> None:
    ref = run(train_args(tmp_path / "ref", png_folder, *EXTRA))
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    args = train_args(out, png_folder, *EXTRA)
    rng = random.Random(12)
    kills = 0
    # deterministic faults first: half-written checkpoint, then a checkpoint renamed without its checksum record
    for fault in ("kill_mid_write:3", "kill_before_record:2"):
        proc = run(args, fault=fault)
        assert proc.returncode == -9, (fault, proc.returncode, proc.stderr[-2000:])
        kills += 1
        if fault.startswith("kill_mid_write"):
            assert stale_temporaries(out), "the half-written temporary file should be there until the rerun"
    rerun = start(args)  # the rerun removes the half-written file and verifies the unrecorded checkpoint
    wait_for_step(out, 4, [rerun])
    rerun.kill()
    rerun.wait()
    kills += 1
    # then SIGKILLs at random moments of the run (some land inside a checkpoint write: one is written per step)
    while kills < 7:
        done = max(logged_steps(out), default=0)
        if done >= STEPS - 1:
            break
        proc = start(args)
        wait_for_step(out, min(STEPS - 1, done + rng.randint(1, 2)), [proc])  # a step target: CPU speed does not matter
        time.sleep(rng.uniform(0.0, 0.15))  # then anywhere in the next step, often inside its checkpoint write
        proc.kill()
        proc.wait()
        kills += 1
    assert kills >= 5
    final = run(args)
    assert final.returncode == 0, final.stderr[-3000:]

    _assert_same_metrics(out, tmp_path / "ref")
    assert stale_temporaries(out) == []
    assert [p.name for p in list_checkpoints(out)][-1] == f"step_{STEPS:08d}.pt"
    assert "resumed from" in final.stdout
