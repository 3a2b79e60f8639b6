"""Grid expansion of ``key=a,b`` overrides, arm naming and result tabulation (no training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medfoundry.config import ConfigError
from medfoundry.recipes import recipes_dir
from medfoundry_cli.sweep import (
    Arm,
    SweepPlan,
    arm_name,
    expand_grid,
    plan_sweep,
    split_values,
)
from medfoundry_cli.sweep_results import collect, write_table

RECIPE = recipes_dir() / "tiny_dino_cpu.yaml"


def test_split_values_respects_brackets_and_quotes() -> None:
    assert split_values("0.9,0.999") == ["0.9", "0.999"]
    assert split_values("[0.4,1.0]") == ["[0.4,1.0]"]
    assert split_values("[0.3,1.0],[0.5,1.0]") == ["[0.3,1.0]", "[0.5,1.0]"]
    assert split_values("{a: 1, b: 2},x") == ["{a: 1, b: 2}", "x"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("single") == ["single"]


def test_expand_grid_product_order_and_fixed() -> None:
    fixed, axes, combos = expand_grid(["optim.lr=1e-4,5e-4", "train.steps=20", "dino.center_momentum=0.9,0.99,0.999",
                                       "crops.global_scale=[0.4,1.0]"])
    assert fixed == ["train.steps=20", "crops.global_scale=[0.4,1.0]"]
    assert [k for k, _ in axes] == ["optim.lr", "dino.center_momentum"]
    assert len(combos) == 6
    assert combos[0] == {"optim.lr": "1e-4", "dino.center_momentum": "0.9"}
    assert combos[1] == {"optim.lr": "1e-4", "dino.center_momentum": "0.99"}  # first axis varies slowest
    assert combos[-1] == {"optim.lr": "5e-4", "dino.center_momentum": "0.999"}


def test_list_typed_keys() -> None:
    fixed, axes, combos = expand_grid(["crops.mean=0.5,0.5"])  # a bare comma list of a list field is one value
    assert fixed == ["crops.mean=0.5,0.5"] and axes == [] and combos == [{}]
    fixed, axes, _ = expand_grid(["crops.global_scale=[0.3,1.0],[0.5,1.0]"])
    assert axes == [("crops.global_scale", ["[0.3,1.0]", "[0.5,1.0]"])]


def test_bad_overrides() -> None:
    with pytest.raises(ConfigError, match="twice"):
        expand_grid(["train.steps=1", "train.steps=2,3"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        expand_grid(["train.steps"])
    with pytest.raises(ConfigError, match="empty value"):
        expand_grid(["train.steps=1,"])


def test_arm_names() -> None:
    assert arm_name(0, {"dino.center_momentum": "0.9"}) == "arm_00_center_momentum-0.9"
    assert arm_name(3, {"crops.global_scale": "[0.3,1.0]", "optim.lr": "1e-4"}) == (
        "arm_03_global_scale-0.3-1.0_lr-1e-4")
    assert arm_name(1, {"a.lr": "1", "b.lr": "2"}) == "arm_01_a-lr-1_b-lr-2"
    assert arm_name(0, {}) == "arm_00"


def test_plan_validates_every_arm(tmp_path: Path) -> None:
    plan = plan_sweep(RECIPE, ["dino.center_momentum=0.9,0.999", "train.steps=20"], tmp_path / "sw")
    assert [a.name for a in plan.arms] == ["arm_00_center_momentum-0.9", "arm_01_center_momentum-0.999"]
    assert plan.arms[1].overrides == ["train.steps=20", "dino.center_momentum=0.999",
                                      f"output_dir={tmp_path / 'sw' / 'arm_01_center_momentum-0.999'}"]
    with pytest.raises(ConfigError, match="arm_01_steps--1"):
        plan_sweep(RECIPE, ["train.steps=5,-1"], tmp_path / "bad")
    with pytest.raises(ConfigError, match="nearest valid key"):
        plan_sweep(RECIPE, ["train.stepz=5,6"], tmp_path / "bad")
    default = plan_sweep(RECIPE, ["output_dir=" + str(tmp_path / "named"), "train.steps=1,2"])
    assert default.sweep_dir == tmp_path / "named" and all("output_dir=" + str(tmp_path / "named") != o
                                                           for o in default.arms[0].overrides)
    plan.save()
    assert SweepPlan.load(tmp_path / "sw").arms == plan.arms


def _fake_arm(plan: SweepPlan, name: str, records: list[dict], arm_record: dict | None) -> None:
    out = plan.sweep_dir / name
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if arm_record is not None:
        (out / "sweep_arm.json").write_text(json.dumps(arm_record))
    plan.arms.append(Arm(len(plan.arms), name, {"optim.lr": name[-1]}, [], str(out)))


def test_collect_final_best_gpu_hours_and_cost(tmp_path: Path) -> None:
    plan = SweepPlan(str(RECIPE), tmp_path, ["train.steps=3"], [("optim.lr", ["1", "2", "3"])])
    _fake_arm(plan, "arm_00_lr-1", [
        {"step": 1, "loss": 5.0},
        {"step": 2, "loss": 3.0, "eval/knn_acc": 0.6, "eval/knn_acc_ci_low": 0.5},
        {"step": 3, "loss": 4.0, "eval/knn_acc": 0.5, "eval/linear_loss": 0.7},
    ], {"status": "ok", "wall_s": 3600.0, "gpus": 4, "device": "cuda", "processes": 4})
    _fake_arm(plan, "arm_01_lr-2", [{"step": 1, "loss": "nan"}], {"status": "failed", "error": "boom",
                                                                  "wall_s": 36.0, "gpus": 0, "device": "cpu",
                                                                  "processes": 1})
    _fake_arm(plan, "arm_02_lr-3", [], None)
    rows, columns = collect(plan, price_per_gpu_hour=2.5)
    assert "final eval/knn_acc" in columns and "best eval/linear_loss" in columns
    assert not any("ci_low" in c for c in columns)
    a, b, c = rows
    assert (a["final_loss"], a["best_loss"], a["steps"]) == (4.0, 3.0, 3)
    assert (a["final eval/knn_acc"], a["best eval/knn_acc"]) == (0.5, 0.6)
    assert a["gpu_hours"] == pytest.approx(4.0) and a["cost"] == pytest.approx(10.0)
    assert b["status"] == "failed" and b["error"] == "boom" and b["final_loss"] is None
    assert b["gpus"] == 0 and b["gpu_hours"] == 0 and b["cost"] == 0 and b["device"] == "cpu"
    assert c["status"] == "not run"
    csv_path, md_path = write_table(plan, rows, columns, 2.5)
    table = list(csv.DictReader(csv_path.open()))
    assert [r["arm"] for r in table] == ["arm_00_lr-1", "arm_01_lr-2", "arm_02_lr-3"]
    assert float(table[0]["cost_usd"]) == pytest.approx(10.0)
    md = md_path.read_text()
    assert "| arm | status | overrides |" in md and "2.5 USD per GPU-hour" in md
    assert md.count("\n| arm_") == 3
