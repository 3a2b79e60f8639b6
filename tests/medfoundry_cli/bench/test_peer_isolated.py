"""The peer comparison's isolated blocks: each one a fresh process running one side; its failure names the cause;
with dinov2's code in the cache, the isolated comparison fills both sides from their own processes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from medfoundry_cli.bench.peer_code import has_code
from medfoundry_cli.bench.peer_compare import Side, compare_with_dinov2, time_block
from medfoundry_cli.bench.peer_isolated import RESULT_PREFIX, child_command, main, run_block
from medfoundry_cli.bench.step import StepSpec

ROOT = Path(__file__).resolve().parents[3]
CACHE = ROOT / ".cache" / "peers" / "dinov2"
needs_peer = pytest.mark.skipif(not has_code(CACHE), reason=f"dinov2 code not in {CACHE} (see benchmarks/README.md)")
TINY = StepSpec(batch=2, global_size=32, local_size=16, n_local=2)
BLOCK_KEYS = {"cpu_s", "wall_s", "user_s", "sys_s", "minflt"}


def test_time_block_reports_per_step_figures_and_side_keeps_them() -> None:
    held = []
    block = time_block(lambda: held.append(torch.ones(2**20)), steps=4, device=torch.device("cpu"))
    assert set(block) == BLOCK_KEYS and len(held) == 4
    assert block["cpu_s"] >= 0 and block["wall_s"] > 0 and block["minflt"] >= 0
    side = Side("medfoundry")
    side.add_block(block)
    side.add_block({**block, "sys_s": block["sys_s"] + 1.0})
    assert len(side.cpu_s) == len(side.minflt) == 2 and side.median_of("sys_s") == pytest.approx(block["sys_s"] + 0.5)
    assert math.isnan(Side("dinov2").median_of("user_s"))  # no blocks yet


def test_child_command_carries_the_spec_exactly() -> None:
    spec = dataclasses.replace(TINY, extra=["dino.koleo_weight=0.2"], seed=3)
    cmd = child_command("dinov2", spec, Path("/x/peer"), steps=2, warmup=1, threads=1)
    assert cmd[1:3] == ["-m", "medfoundry_cli.bench.peer_isolated"] and cmd[cmd.index("--side") + 1] == "dinov2"
    assert StepSpec(**json.loads(cmd[cmd.index("--spec") + 1])) == spec


def test_failed_child_raises_with_its_error(tmp_path) -> None:
    missing = tmp_path / "no_dinov2_here"
    with pytest.raises(RuntimeError, match="isolated medfoundry block failed") as err:
        run_block("medfoundry", TINY, missing, steps=1, warmup=0, threads=1)
    assert str(missing) in str(err.value)  # the child's own one-line reason, naming the folder


@needs_peer
def test_child_runs_one_side_and_prints_its_block(capsys) -> None:
    code = main(["--side", "dinov2", "--spec", json.dumps(dataclasses.asdict(TINY)), "--peer-path", str(CACHE),
                 "--steps", "2", "--warmup", "0", "--threads", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(RESULT_PREFIX)]
    assert code == 0 and len(lines) == 1
    block = json.loads(lines[0][len(RESULT_PREFIX):])
    assert set(block) == BLOCK_KEYS and block["cpu_s"] > 0


@needs_peer
def test_isolated_comparison_fills_both_sides() -> None:
    result = compare_with_dinov2(TINY, str(CACHE), fetch=False, repeats=2, steps=1, warmup=0, isolate=True)
    assert len(result.medfoundry.cpu_s) == len(result.dinov2.cpu_s) == 2 and len(result.dinov2.minflt) == 2
    assert result.flops_equal() and result.cpu_ratio() > 0
    assert any("fresh process" in note for note in result.notes)
    assert "minor faults/step" in result.format()
