"""Helpers of the bad-input corpus (``test_reliability_bad_input*.py``): the CLI as a user runs it, the one-line
error form every refusal must take, a small real NIfTI volume and a folder's file digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfoundry_cli.cli import main


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit code and stderr of ``medfoundry ARGV``."""
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def assert_user_error(rc: int, err: str, command: str, *needles: str) -> None:
    """Exit 2, the one-line ``medfoundry CMD: error:`` form, no traceback, every needle in the message."""
    assert rc == 2, f"exit code {rc}; stderr: {err}"
    assert err.startswith(f"medfoundry {command}: error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"


def nifti_volume(path: Path, nan: bool = False, frames: int = 0) -> Path:
    """A small real NIfTI volume (x, y, z) = (24, 20, 4), optionally with NaN/inf voxels or extra frames."""
    vol = np.random.default_rng(0).random((24, 20, 4)).astype(np.float32) * 100
    if nan:
        vol[3, 4, 1], vol[5, 6, 2], vol[0, 0, 0] = np.nan, np.nan, np.inf
    data = np.stack([vol + k for k in range(frames)], axis=-1) if frames else vol
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 2.0, 1.0])), path)
    return path


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative path -> hex): what "unchanged" is checked against."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
