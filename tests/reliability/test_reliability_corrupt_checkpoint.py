"""A bad newest checkpoint (truncated, garbage, zero bytes, one flipped byte, no checksum record and truncated)
is named in the log and ``error.log``, moved aside, and the run resumes from the previous one exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_testutil import FAST, RECIPE, TERMS

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.checkpoints.integrity import sidecar_path, verify_checkpoint
from medfoundry.config import load_config
from medfoundry.train.loop import train
from medfoundry.train.run_logger import read_metrics


def _train(out: Path, root: Path, steps: int):
    return train(load_config(RECIPE, [*FAST, f"output_dir={out}", f"data.root={root}", f"train.steps={steps}",
                                      "train.checkpoint_every=2", "train.keep_last=3"]))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00not a checkpoint\xff" * 200)


def _zero(p: Path) -> None:
    p.write_bytes(b"")


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor data: torch would load it silently
    p.write_bytes(bytes(data))


def _truncate_unrecorded(p: Path) -> None:
    sidecar_path(p).unlink()  # as written before checksum records existed
    _truncate(p)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _zero, _flip, _truncate_unrecorded],
                         ids=["truncated", "garbage", "zero-byte", "flipped-byte", "unrecorded-truncated"])
def test_bad_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, png_folder: Path, damage,
                                                              capsys) -> None:
    ref = _train(tmp_path / "ref", png_folder, 6)
    run = _train(tmp_path / "run", png_folder, 4)
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step_00000004.pt" and verify_checkpoint(newest) == "checksum"
    damage(newest)
    capsys.readouterr()

    _train(run, png_folder, 6)

    out = capsys.readouterr().out
    assert "step_00000004.pt is unusable" in out and "resumed from" in out and "step_00000002.pt" in out
    assert "step_00000004.pt" in (run / "error.log").read_text()
    assert (run / "checkpoints" / "step_00000004.pt.corrupt").is_file()  # kept for inspection, never resumed
    a, b = read_metrics(run), read_metrics(ref)
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for key in TERMS:
            assert x[key] == y[key], (x["step"], key)


def test_a_flipped_byte_would_load_silently_without_the_checksum(tmp_path: Path, png_folder: Path) -> None:
    """Why the checksum: torch reads a checkpoint with one flipped data bit without complaint."""
    from medfoundry.safe_load import load_torch_file

    run = _train(tmp_path / "run", png_folder, 2)
    path = list_checkpoints(run)[-1]
    _flip(path)
    assert load_torch_file(path)["step"] == 2
    with pytest.raises(Exception, match="SHA-256"):
        verify_checkpoint(path)
