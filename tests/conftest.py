"""Shared fixtures: small real image files written in standard formats."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from labelled_images import write_grey_pngs

import medfoundry.methods  # noqa: F401  (registers the methods' config classes, as the CLI does)

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

    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None]
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
    return write_grey_pngs(tmp_path / "images")


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
