"""In-training evaluation: fires at its interval, logs with the training metrics, keeps best.pt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfoundry.config import load_config
from medfoundry.eval.in_training import EvaluationHook, read_eval_history
from medfoundry.methods.checkpoint_backbone import load_backbone
from medfoundry.methods.dino.pipeline import eval_hooks as build
from medfoundry.recipes import resolve_recipe
from medfoundry.train.loop import train
from medfoundry.train.run_logger import read_metrics


def _pngs(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        img = rng.random((40, 40)) * (0.4 if i % 2 else 1.0)
        Image.fromarray((img * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def _cfg(tmp_path: Path, data: Path, *extra: str):
    return load_config(resolve_recipe("tiny_dino_cpu"), [
        f"output_dir={tmp_path / 'run'}", f"data.root={data}", f"eval.data={data}", "train.steps=5",
        "eval.every_steps=2", "model.img_size=32", "crops.global_size=32", "crops.local_size=16", "crops.n_local=1",
        "dino.head.out_dim=32", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "train.batch_size=4",
        "train.progress=false", "train.tensorboard=false", "train.checkpoint_every=5", "eval.tasks=[knn,health]",
        "eval.best_metric=val_knn_top1_k10", *extra,
    ])


def test_evalx_hook_interval_logging_and_best(tmp_path: Path) -> None:
    data = _pngs(tmp_path / "data")
    cfg = _cfg(tmp_path, data)
    hooks = build(cfg)
    assert any(isinstance(h, EvaluationHook) for h in hooks)
    assert [s for s in range(1, 6) if hooks[0].due(s)] == [2, 4, 5]  # every 2 steps and the last step
    assert hooks[0].monitor is hooks[1]  # evaluated health statistics reach the collapse detector
    run = train(cfg)
    history = read_eval_history(run)
    assert [r["step"] for r in history] == [2, 4, 5]
    logged = {r["step"]: r for r in read_metrics(run)}
    for step in (2, 4, 5):
        assert "eval/knn_top1_k20" in logged[step] and "eval/health_effective_rank" in logged[step]
        assert "eval/val_knn_top1_k10" in logged[step]
    assert "eval/knn_top1_k20" not in logged[3]
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "val_knn_top1_k10" and best["step"] in (2, 4, 5)
    assert best["value"] == max(r["val_knn_top1_k10"] for r in history)
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    assert state["step"] == best["step"] and "teacher.backbone.vit.cls_token" in state["method"]
    lb = load_backbone(run, which="best")
    assert lb.step == best["step"]
    ref = state["method"]["teacher.backbone.vit.cls_token"]
    assert torch.equal(lb.backbone.vit.cls_token, ref)


def test_evalx_hook_best_min_mode_and_missing_metric(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _pngs(tmp_path / "data")
    cfg = _cfg(tmp_path, data, "eval.best_metric=eval/val_knn_top1_k10", "eval.best_mode=min", "train.steps=4")
    run = train(cfg)
    history = read_eval_history(run)
    best = json.loads((run / "best.json").read_text())
    assert best["value"] == min(r["val_knn_top1_k10"] for r in history)
    cfg2 = _cfg(tmp_path / "b", data, "eval.best_metric=val_not_a_metric", "train.steps=2")
    run2 = train(cfg2)
    assert not (run2 / "best.pt").exists()
    assert "not among the evaluation results" in capsys.readouterr().err


def test_evalx_no_eval_without_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = load_config(None, ["eval.every_steps=5"])
    assert not any(isinstance(h, EvaluationHook) for h in build(cfg))
    assert "eval.data is empty" in capsys.readouterr().err
    assert not any(isinstance(h, EvaluationHook) for h in build(load_config(None, [])))


def test_evalx_bad_eval_config_fails_at_start(tmp_path: Path) -> None:
    from medfoundry.config import ConfigError

    data = _pngs(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"eval\.tasks.*zeroshot"):
        build(_cfg(tmp_path, data, "eval.tasks=[knn,zeroshot]"))
    with pytest.raises(ConfigError, match="eval.data"):
        build(_cfg(tmp_path, data, f"eval.data={tmp_path / 'missing.csv'}"))


def test_evalx_task_that_cannot_run_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _pngs(tmp_path / "data")
    manifest = tmp_path / "one_class.csv"
    files = sorted(data.rglob("*.png"))
    manifest.write_text("path,label,split\n" + "".join(
        f"{f},same,{'train' if i < 8 else 'test'}\n" for i, f in enumerate(files)))
    run = train(_cfg(tmp_path, data, f"eval.data={manifest}", "eval.tasks=[linear,health]", "train.steps=2",
                     "eval.best_metric="))
    history = read_eval_history(run)
    assert "health_effective_rank" in history[-1] and "linear_auc" not in history[-1]
    assert "task 'linear' skipped" in capsys.readouterr().err
