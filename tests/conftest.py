"""Shared fixtures: small real image files written in standard formats."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use tiny models: one intra-op thread avoids oversubscribing small (2-core) CI machines."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_preemption_handlers():
    """A training loop stopped by a signal ignores further pre-emption signals; give each test the handlers back."""
    import signal

    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None]
    before = {s: signal.getsignal(s) for s in sigs}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.fixture()
def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def png_folder(tmp_path: Path) -> Path:
    """Twelve 16-bit grey PNGs with structured content (gradients and discs) in nested folders."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:80, 0:96]
    for i in range(12):
        sub = root / f"series_{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        cy, cx, r = rng.integers(20, 60), rng.integers(20, 76), rng.integers(8, 20)
        img = 0.3 * (xx / 96) + 0.6 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2)
        img = img + 0.05 * rng.standard_normal(img.shape)
        arr = (np.clip(img, 0, 1) * 65535).astype(np.uint16)
        Image.fromarray(arr).save(sub / f"slice_{i:02d}.png")
    return root


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
