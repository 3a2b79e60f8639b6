"""A full disk during a checkpoint save: the run stops with a one-line error naming the file, leaves no
temporary file, keeps the previous checkpoint intact, and the same command resumes once there is space."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_testutil import TERMS, run, stale_temporaries, train_args

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.checkpoints.integrity import verify_checkpoint
from medfoundry.train.run_logger import read_metrics

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)


def test_disk_full_during_a_save_loses_nothing_and_resumes(tmp_path: Path, png_folder: Path) -> None:
    ref = run(train_args(tmp_path / "ref", png_folder, "train.steps=4", "train.checkpoint_every=2"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    first = run(train_args(out, png_folder, "train.steps=2", "train.checkpoint_every=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    good = list_checkpoints(out)[-1]
    before = good.read_bytes()

    # no file may grow past 1 MB: the step-4 checkpoint (several MB) cannot be written
    full = run(train_args(out, png_folder, "train.steps=4", "train.checkpoint_every=2"), fault="fsize:1000000")
    assert full.returncode == 2, (full.returncode, full.stderr[-3000:])
    assert "step_00000004.pt" in full.stderr and "Traceback" not in full.stderr
    assert len(full.stderr.strip().splitlines()) == 1, full.stderr
    assert stale_temporaries(out) == []
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002.pt"]
    assert good.read_bytes() == before and verify_checkpoint(good) == "checksum"

    again = run(train_args(out, png_folder, "train.steps=4", "train.checkpoint_every=2"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    a, b = read_metrics(out), read_metrics(tmp_path / "ref")
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in TERMS:
            assert x[key] == y[key], (x["step"], key)
