"""A sweep arm stopped by SIGTERM (pre-emption) is recorded as interrupted, stops the sweep, and resumes on a rerun."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.recipes import resolve_recipe
from medfoundry.train.hooks import HOOK_BUILDERS
from medfoundry_cli.sweep import arm_done, plan_sweep, run_local
from medfoundry_cli.sweep_results import collect, write_table

FAST = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4",
        "train.progress=false", "train.tensorboard=false", "train.log_every=1", "train.checkpoint_every=100"]


class _Steps:
    """Hook builder: records the steps each run sees; with ``kill_after`` sends SIGTERM to this process then."""

    def __init__(self, kill_after: int | None = None) -> None:
        self.kill_after = kill_after
        self.seen: list[int] = []

    def __call__(self, cfg) -> list:
        return [self]

    def on_step_end(self, step, metrics, method, run_dir) -> None:
        self.seen.append(step)
        if step == self.kill_after:
            self.kill_after = None  # once: the pre-emption of the first arm
            os.kill(os.getpid(), signal.SIGTERM)


def _with_hook(builder: _Steps, fn):
    HOOK_BUILDERS.append(builder)
    try:
        return fn()
    finally:
        HOOK_BUILDERS[:] = [b for b in HOOK_BUILDERS if b is not builder]


def test_sigterm_interrupts_the_arm_stops_the_sweep_and_a_rerun_resumes(tmp_path: Path, png_folder: Path) -> None:
    plan = plan_sweep(resolve_recipe("tiny_dino_cpu"), ["train.seed=0,1", "train.steps=4", *FAST,
                                                        f"data.root={png_folder}"], tmp_path / "sweep")
    first, second = plan.arms
    logs: list[str] = []
    killer = _Steps(kill_after=1)
    records = _with_hook(killer, lambda: run_local(plan, log=logs.append))

    # the signal came in after step 1's agreement point, so every rank learns of it in step 2 and stops there
    assert killer.seen == [1, 2]
    assert [r["status"] for r in records] == ["interrupted"]  # the second arm was not started
    rec = json.loads((Path(first.output_dir) / "sweep_arm.json").read_text())
    assert rec["status"] == "interrupted" and rec["stopped_step"] == 2 and "step 2" in rec["error"]
    assert [p.name for p in list_checkpoints(Path(first.output_dir))] == ["step_00000002.pt"]
    assert not arm_done(first)
    assert not (Path(second.output_dir) / "sweep_arm.json").exists()
    assert any("INTERRUPTED" in line for line in logs) and any("1 arm(s) not started" in line for line in logs)
    rows, columns = collect(plan)
    assert [r["status"] for r in rows] == ["interrupted", "not run"]
    _, md = write_table(plan, rows, columns)
    assert f"| {first.name} | interrupted |" in md.read_text() and "0 ok, 1 interrupted" in md.read_text()

    # the same sweep again: the interrupted arm resumes from its step-2 checkpoint, then the second arm runs
    resumed = _Steps()
    records = _with_hook(resumed, lambda: run_local(plan, log=logs.append))
    assert resumed.seen == [3, 4, 1, 2, 3, 4]  # arm 0 continues at step 3 (no restart), arm 1 runs from scratch
    assert [r["status"] for r in records] == ["ok", "ok"]
    rec = json.loads((Path(first.output_dir) / "sweep_arm.json").read_text())
    assert rec["attempts"] == 2 and rec["stopped_step"] is None and rec["error"] == ""
    assert arm_done(first) and arm_done(second)
    rows, columns = collect(plan)
    assert [(r["status"], r["steps"]) for r in rows] == [("ok", 4), ("ok", 4)]
    _, md = write_table(plan, rows, columns)
    assert f"| {first.name} | ok |" in md.read_text() and "2 ok" in md.read_text()
    assert "interrupted" not in md.read_text()
