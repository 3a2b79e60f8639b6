"""FSDP sharded checkpoints on two gloo ranks: each is verified against its ``checksums.json``; a damaged
shard in the newest one is named, the folder moved aside, and both ranks resume from the previous one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from reliability_testutil import FAST, RECIPE, child_env

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.checkpoints.integrity import DCP_MANIFEST, verify_checkpoint
from medfoundry.errors import CorruptFileError
from medfoundry.train.run_logger import read_metrics

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)

ARGS = [*FAST, "dist.strategy=fsdp", "dino.koleo_weight=0", "train.checkpoint_every=2", "train.keep_last=3"]


def _train(out: Path, root: Path, steps: int, port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "medfoundry_cli", "train", str(RECIPE), *ARGS, f"output_dir={out}", f"data.root={root}",
           f"train.steps={steps}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_damaged_shard_falls_back_to_the_previous_sharded_checkpoint(tmp_path: Path, png_folder: Path,
                                                                     free_port: int) -> None:
    run = tmp_path / "run"
    _train(run, png_folder, 4, free_port)
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step_00000004.dcp" and (newest / DCP_MANIFEST).is_file()
    assert verify_checkpoint(newest) == "checksum"
    shard = sorted(newest.glob("*.distcp"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=shard.name):
        verify_checkpoint(newest)

    resumed = _train(run, png_folder, 6, free_port + 1)
    assert "step_00000004.dcp is unusable" in resumed.stdout + resumed.stderr
    assert "step_00000004.dcp" in (run / "error.log").read_text()
    assert (run / "checkpoints" / "step_00000004.dcp.corrupt").is_dir()
    assert [p.name for p in list_checkpoints(run)][-1] == "step_00000006.dcp"

    _train(tmp_path / "ref", png_folder, 6, free_port + 2)
    a, b = read_metrics(run), read_metrics(tmp_path / "ref")
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for key in ("loss", "dino_loss", "ibot_loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)
