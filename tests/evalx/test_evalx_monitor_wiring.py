"""Entropy-wall and collapse monitors wired into training: constructed teacher logits and tiny real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfoundry.config import load_config
from medfoundry.eval.in_training import MonitorHook, build, read_monitor_warnings
from medfoundry.eval.monitors import RepresentationHealthError
from medfoundry.losses import DINOLoss
from medfoundry.recipes import resolve_recipe
from medfoundry.train.loop import train
from medfoundry.train.run_logger import read_metrics

K = 256


def _monitor(*overrides: str) -> MonitorHook:
    cfg = load_config(None, [f"dino.head.out_dim={K}", "eval.entropy_wall.after_steps=20",
                             "eval.entropy_wall.patience=20", *overrides])
    hooks = [h for h in build(cfg) if isinstance(h, MonitorHook)]
    assert len(hooks) == 1
    return hooks[0]


def _teacher_entropy_stream(logits_fn, center_momentum: float, steps: int = 80, temp: float = 0.04) -> list[float]:
    """Per-step mean teacher entropy of DINO's centred targets (the method's `_targets` path)."""
    loss = DINOLoss(K, center_momentum=center_momentum)
    out = []
    for step in range(steps):
        logits = logits_fn(step)
        probs = loss.teacher_probs_centered(logits, temp)
        out.append(float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()))
        loss.update_center(logits)
    return out


def test_evalx_entropy_wall_fires_on_uniform_teacher_with_center_09(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, K, generator=g)
    stream = _teacher_entropy_stream(lambda s: v.expand(16, K).clone(), center_momentum=0.9)
    assert stream[-1] > 0.99 * math.log(K)  # the center cancels identical logits: uniform targets
    hook = _monitor()
    fired = []
    for step, h in enumerate(stream, start=1):
        out = hook.on_step_end(step, {"teacher_entropy": h, "loss": 1.0}, torch.nn.Identity(), tmp_path)
        if out:
            fired.append((step, out))
    assert len(fired) == 1 and fired[0][1] == {"monitor/entropy_wall": 1.0}
    assert fired[0][0] >= 20 + 20 - 1
    warnings = read_monitor_warnings(tmp_path)
    assert len(warnings) == 1 and warnings[0]["monitor"] == "entropy_wall"
    assert "0.999" in warnings[0]["message"] and "center" in warnings[0]["message"]


def test_evalx_entropy_wall_quiet_on_peaked_diverse_teacher(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)

    def logits(step: int) -> torch.Tensor:  # each sample confidently on its own prototype
        idx = torch.randint(0, K, (16,), generator=g)
        return 0.3 * torch.randn(16, K, generator=g) + 2.0 * torch.nn.functional.one_hot(idx, K)

    stream = _teacher_entropy_stream(logits, center_momentum=0.999)
    hook = _monitor()
    for step, h in enumerate(stream, start=1):
        assert hook.on_step_end(step, {"teacher_entropy": h}, torch.nn.Identity(), tmp_path) is None
    assert max(stream[20:]) < 0.98 * math.log(K)
    assert read_monitor_warnings(tmp_path) == []


def test_evalx_monitors_fatal_and_collapse(tmp_path: Path) -> None:
    hook = _monitor("eval.entropy_wall.fatal=true")
    with pytest.raises(RepresentationHealthError, match="0.999"):
        for step in range(1, 60):
            hook.on_step_end(step, {"teacher_entropy": math.log(K)}, torch.nn.Identity(), tmp_path)
    assert read_monitor_warnings(tmp_path)[-1]["fatal"] is True

    hook = _monitor("eval.collapse.after_steps=5", "eval.collapse.patience=3", "eval.collapse.eval_patience=2")
    fired = {}
    for step in range(1, 12):
        out = hook.on_step_end(step, {"teacher_feature_std": 1e-4}, torch.nn.Identity(), tmp_path / "c")
        fired.update(out or {})
    assert fired == {"monitor/collapse": 1.0}
    assert "KoLeo" in read_monitor_warnings(tmp_path / "c")[0]["message"]
    # collapse seen by the in-training health evaluation (active dimensions falling towards zero)
    hook = _monitor("eval.collapse.after_steps=0", "eval.collapse.eval_patience=2")
    outs = [hook.observe_evaluation(s, {"eval/health_feature_std": 0.2, "eval/health_active_dims_frac": 0.02},
                                    tmp_path / "e") for s in (10, 20)]
    assert outs[0] is None and outs[1] == {"monitor/collapse": 1.0}
    assert "active-dimension fraction" in read_monitor_warnings(tmp_path / "e")[0]["message"]
    assert not any(isinstance(h, MonitorHook) for h in build(load_config(None, [
        "eval.entropy_wall.enabled=false", "eval.collapse.enabled=false"])))


def _structured_pngs(root: Path, n: int = 16) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    root.mkdir(parents=True)
    for i in range(n):
        cy, cx, r = rng.integers(10, 38), rng.integers(10, 38), rng.integers(5, 14)
        img = 0.2 + 0.4 * (xx / 48) * (i % 3) / 2 + 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


TINY = ["model.img_size=32", "crops.global_size=32", "crops.local_size=16", "crops.n_local=1",
        "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "train.batch_size=8", "train.progress=false",
        "train.tensorboard=false", "train.checkpoint_every=100", "train.steps=16", "dino.center_momentum=0.9",
        "eval.entropy_wall.after_steps=6", "eval.entropy_wall.patience=6"]


def test_evalx_entropy_wall_in_real_runs(tmp_path: Path) -> None:
    data = _structured_pngs(tmp_path / "data")
    # forced uniform teacher outputs: a huge teacher temperature flattens the centred teacher softmax
    forced = load_config(resolve_recipe("tiny_dino_cpu"), [
        f"output_dir={tmp_path / 'forced'}", f"data.root={data}", *TINY,
        "dino.teacher_temp=100", "dino.warmup_teacher_temp=100"])
    run = train(forced)
    warnings = read_monitor_warnings(run)
    assert [w["monitor"] for w in warnings] == ["entropy_wall"]
    assert "center_momentum=0.999" in warnings[0]["message"]
    logged = [r for r in read_metrics(run) if r.get("monitor/entropy_wall") == 1.0]
    assert len(logged) == 1 and logged[0]["step"] == warnings[0]["step"] >= 11

    healthy = load_config(resolve_recipe("tiny_dino_cpu"), [f"output_dir={tmp_path / 'healthy'}",
                                                            f"data.root={data}", *TINY])
    run = train(healthy)
    assert read_monitor_warnings(run) == []
    fracs = [r["teacher_entropy_frac"] for r in read_metrics(run)]
    assert max(fracs[6:]) < 0.98

    fatal = load_config(resolve_recipe("tiny_dino_cpu"), [
        f"output_dir={tmp_path / 'fatal'}", f"data.root={data}", *TINY, "dino.teacher_temp=100",
        "dino.warmup_teacher_temp=100", "eval.entropy_wall.fatal=true"])
    with pytest.raises(RepresentationHealthError):
        train(fatal)
    assert "RepresentationHealthError" in (tmp_path / "fatal" / "error.log").read_text()
    assert json.loads((tmp_path / "fatal" / "monitors.jsonl").read_text().splitlines()[0])["fatal"] is True
