"""Fixtures for the scale tests: a stand-in SLURM scheduler on PATH."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture()
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put stand-in ``sbatch`` (records its arguments, answers job 4242) and ``srun`` on PATH; cd to tmp_path.

    Returns the file where each ``sbatch`` call appends its argument line.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls.txt"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for exe in ("sbatch", "srun"):
        (bin_dir / exe).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return calls
