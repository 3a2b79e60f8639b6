"""Entropy-wall, prototype-collapse and collapse monitors wired into training: constructed teacher logits, tiny
real runs on PNGs and on real CT (pydicom-data) that show the symptoms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfoundry.config import load_config
from medfoundry.eval.in_training import MonitorHook, read_monitor_warnings
from medfoundry.eval.monitors import RepresentationHealthError
from medfoundry.losses import DINOLoss
from medfoundry.methods import get_method_entry
from medfoundry.methods.dino.method import teacher_target_stats
from medfoundry.recipes import resolve_recipe
from medfoundry.train.loop import train
from medfoundry.train.run_logger import read_metrics

K = 256


def build(cfg) -> list:
    """The hooks the run's method builds (the DINO entry turns on the prototype detectors)."""
    return get_method_entry(cfg.method).build_hooks(cfg)


def _monitor(*overrides: str) -> MonitorHook:
    cfg = load_config(None, [f"dino.head.out_dim={K}", "eval.entropy_wall.after_steps=20",
                             "eval.entropy_wall.patience=20", *overrides])
    hooks = [h for h in build(cfg) if isinstance(h, MonitorHook)]
    assert len(hooks) == 1
    return hooks[0]


def _dino_loss_frac_stream(logits_fn, student_fn, center_momentum: float, steps: int = 80,
                           temp: float = 0.04) -> list[dict[str, float]]:
    """Per-step DINO loss / ln K and teacher statistics of DINO's centred targets (the method's path)."""
    loss = DINOLoss(K, center_momentum=center_momentum)
    out = []
    for step in range(steps):
        logits = logits_fn(step)
        probs = loss.teacher_probs_centered(logits, temp)
        value = loss(student_fn(step, logits)[None], probs[None], skip_same_view=False)
        out.append({k: float(v) for k, v in teacher_target_stats(probs, value).items()})
        loss.update_center(logits)
    return out


def test_evalx_entropy_wall_fires_on_uniform_teacher_with_center_09(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, K, generator=g)
    # identical logits for every image: the 0.9 center cancels them, the targets turn uniform and the DINO
    # loss of a (still random) student sits at >= ln K
    stream = _dino_loss_frac_stream(lambda s: v.expand(16, K).clone(),
                                    lambda s, t: 0.1 * torch.randn(16, K, generator=g), center_momentum=0.9)
    assert stream[-1]["dino_loss_frac"] > 0.99 and stream[-1]["teacher_mean_entropy_frac"] > 0.99
    hook = _monitor("data.kind=dicom", "data.intensity=window")
    fired = []
    for step, metrics in enumerate(stream, start=1):
        out = hook.on_step_end(step, {**metrics, "loss": 1.0}, torch.nn.Identity(), tmp_path)
        if out:
            fired.append((step, out))
    assert len(fired) == 1 and fired[0][1] == {"monitor/entropy_wall": 1.0}
    assert fired[0][0] >= 20 + 20 - 1
    warnings = read_monitor_warnings(tmp_path)
    assert len(warnings) == 1 and warnings[0]["monitor"] == "entropy_wall"
    msg = warnings[0]["message"]
    assert "`optim.lr=" in msg and "`dino.teacher_temp=0.04`" in msg
    assert "`dino.center_momentum=0.999`" in msg and "large batch" in msg  # HU data, center 0.9
    assert "batch-mean target entropy" in msg


def test_evalx_entropy_wall_quiet_on_peaked_diverse_teacher(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)

    def logits(step: int) -> torch.Tensor:  # each sample confidently on its own prototype
        idx = torch.randint(0, K, (16,), generator=g)
        return 0.3 * torch.randn(16, K, generator=g) + 2.0 * torch.nn.functional.one_hot(idx, K)

    # a student that has learnt the teacher's prototypes: the loss is far below ln K
    stream = _dino_loss_frac_stream(logits, lambda s, t: t * 0.1 / 0.04, center_momentum=0.9)
    hook = _monitor()
    for step, metrics in enumerate(stream, start=1):
        assert hook.on_step_end(step, metrics, torch.nn.Identity(), tmp_path) is None
    assert max(m["dino_loss_frac"] for m in stream[20:]) < 0.9
    assert min(m["teacher_effective_prototypes_frac"] for m in stream) > 0.5  # diverse: no prototype collapse
    assert read_monitor_warnings(tmp_path) == []


def test_evalx_prototype_collapse_wiring(tmp_path: Path) -> None:
    hook = _monitor("dino.center_momentum=0.999", "eval.prototype_collapse.after_steps=5",
                    "eval.prototype_collapse.patience=3")
    assert hook.prototypes is not None and hook.prototypes.center_momentum == 0.999
    fired = {}
    for step in range(1, 12):  # every row on one prototype: effective 1 of min(K, 32) = 32
        metrics = {"teacher_effective_prototypes_frac": 1 / 32, "teacher_effective_prototypes": 1.0,
                   "teacher_distinct_prototypes": 1.0, "dino_loss_frac": 0.001}
        fired.update(hook.on_step_end(step, metrics, torch.nn.Identity(), tmp_path) or {})
    assert fired == {"monitor/prototype_collapse": 1.0}
    (warning,) = read_monitor_warnings(tmp_path)
    assert warning["monitor"] == "prototype_collapse" and warning["step"] == 7
    assert "`dino.center_momentum=0.9`" in warning["message"]
    off = _monitor("eval.prototype_collapse.enabled=false")
    assert off.prototypes is None
    assert _monitor("method=distill").prototypes is None  # dino only


def test_evalx_monitors_fatal_and_collapse(tmp_path: Path) -> None:
    hook = _monitor("eval.entropy_wall.fatal=true")
    with pytest.raises(RepresentationHealthError, match="optim.lr"):
        for step in range(1, 60):
            hook.on_step_end(step, {"dino_loss_frac": 1.0}, torch.nn.Identity(), tmp_path)
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
        "eval.entropy_wall.enabled=false", "eval.prototype_collapse.enabled=false", "eval.collapse.enabled=false"])))


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
    assert "`optim.lr=" in warnings[0]["message"] and "`dino.teacher_temp=0.04`" in warnings[0]["message"]
    assert "center_momentum=0.999" not in warnings[0]["message"]  # PNGs, not HU/CT data
    print("forced dino_loss_frac:", [round(r["dino_loss_frac"], 3) for r in read_metrics(run) if "dino_loss_frac" in r])
    logged = [r for r in read_metrics(run) if r.get("monitor/entropy_wall") == 1.0]
    assert len(logged) == 1 and logged[0]["step"] == warnings[0]["step"] >= 11

    # the same run with the slow center learns (loss well below ln K). With the 0.9 center these tiny PNG runs
    # reach the wall on their own by step ~12 (measured: loss / ln K 0.69 -> 1.0); the CT test below shows that
    healthy = load_config(resolve_recipe("tiny_dino_cpu"), [f"output_dir={tmp_path / 'healthy'}",
                                                            f"data.root={data}", *TINY, "dino.center_momentum=0.999"])
    run = train(healthy)
    assert read_monitor_warnings(run) == []
    fracs = [r["dino_loss_frac"] for r in read_metrics(run) if "dino_loss_frac" in r]
    print("healthy dino_loss_frac:", [round(f, 3) for f in fracs])
    assert max(fracs[6:]) < 0.9

    fatal = load_config(resolve_recipe("tiny_dino_cpu"), [
        f"output_dir={tmp_path / 'fatal'}", f"data.root={data}", *TINY, "dino.teacher_temp=100",
        "dino.warmup_teacher_temp=100", "eval.entropy_wall.fatal=true"])
    with pytest.raises(RepresentationHealthError):
        train(fatal)
    assert "RepresentationHealthError" in (tmp_path / "fatal" / "error.log").read_text()
    assert json.loads((tmp_path / "fatal" / "monitors.jsonl").read_text().splitlines()[0])["fatal"] is True


REAL_CT = ("693_UNCI.dcm", "eCT_Supplemental.dcm", "CT_small.dcm")  # real CT in pydicom / pydicom-data: 4 slices


def _real_ct(root: Path) -> list[str]:
    """Overrides that train on the real CT slices bundled with pydicom / pydicom-data (lung window)."""
    from pydicom.data import get_testdata_file

    for i, name in enumerate(REAL_CT):  # by explicit name: a wildcard lookup would try to download
        (root / f"s{i}").mkdir(parents=True)
        shutil.copy(get_testdata_file(name), root / f"s{i}" / name)
    return [f"data.root={root}", "data.kind=dicom", "data.intensity=window", "data.windows=[lung]",
            "data.channels=1", "model.in_chans=1"]


# the tiny recipe's head (K = 256) pinned, 32 px crops, batch 8 (16 teacher rows), lr 2e-3 on a fixed horizon
CT_TINY = ["model.img_size=32", "crops.global_size=32", "crops.local_size=16", "crops.n_local=1",
           "dino.head.out_dim=256", "dino.head.hidden_dim=128", "dino.head.bottleneck_dim=64", "dino.head.nlayers=3",
           "train.batch_size=8", "train.schedule_steps=100", "optim.lr=2e-3", "train.progress=false",
           "train.tensorboard=false", "train.checkpoint_every=1000", "train.seed=0"]


def _ct_run(tmp_path: Path, name: str, overrides: list[str]) -> tuple[list[dict], list[dict]]:
    cfg = load_config(resolve_recipe("tiny_dino_cpu"), [f"output_dir={tmp_path / name}", *overrides])
    run = train(cfg)
    rows = [r for r in read_metrics(run) if "dino_loss_frac" in r]
    print(f"{name}: step: dino_loss_frac / teacher_effective_prototypes (frac) / distinct / teacher_feature_std")
    print("  " + "  ".join(f"{r['step']}: {r['dino_loss_frac']:.3f} / {r['teacher_effective_prototypes']:.2f} "
                           f"({r['teacher_effective_prototypes_frac']:.3f}) / {r['teacher_distinct_prototypes']:.0f}"
                           f" / {r['teacher_feature_std']:.3f}" for r in rows))
    return rows, read_monitor_warnings(run)


def test_evalx_prototype_collapse_in_real_ct_runs(tmp_path: Path) -> None:
    """Center momentum 0.999 at small scale on real CT: the head collapses onto one prototype (loss -> 0) while
    KoLeo keeps the features spread; the prototype-collapse monitor fires and names `dino.center_momentum=0.9`.
    The same run with the 0.9 center keeps its targets spread over the prototypes."""
    common = [*_real_ct(tmp_path / "ct"), *CT_TINY, "train.steps=50", "dino.teacher_momentum=0.9",
              "dino.teacher_momentum_end=0.99", "eval.prototype_collapse.after_steps=20",
              "eval.prototype_collapse.patience=15", "eval.collapse.after_steps=20", "eval.collapse.patience=15"]
    rows, warnings = _ct_run(tmp_path, "slow_center", [*common, "dino.center_momentum=0.999"])
    assert [w["monitor"] for w in warnings] == ["prototype_collapse"]  # the feature-std collapse monitor is quiet
    msg = warnings[0]["message"]
    assert "`dino.center_momentum=0.9`" in msg and "`dino.centering=sinkhorn`" in msg and "K = 256" in msg
    assert 34 <= warnings[0]["step"] <= 50
    late = rows[-10:]
    assert max(r["teacher_effective_prototypes"] for r in late) < 1.6  # of min(K, 16 rows) = 16
    assert max(r["dino_loss_frac"] for r in late) < 0.1  # the loss falls towards 0
    assert min(r["teacher_feature_std"] for r in late) > 0.05  # backbone features still spread (KoLeo)

    rows, warnings = _ct_run(tmp_path, "fast_center", [*common, "dino.center_momentum=0.9"])
    assert warnings == []
    assert min(r["teacher_effective_prototypes_frac"] for r in rows[20:]) > 0.5


def test_evalx_entropy_wall_in_real_ct_runs(tmp_path: Path) -> None:
    """DINO's center momentum 0.9 on real CT: the center cancels the teacher logits, the targets turn flat and
    the DINO loss climbs to ln K and stays there (DINO-X's entropy wall); the monitor fires with DINO-X's fixes
    (HU data: the 0.999 center among them). The same run with the 0.999 center learns, neither monitor fires."""
    common = [*_real_ct(tmp_path / "ct"), *CT_TINY, "train.steps=40", "eval.entropy_wall.after_steps=15",
              "eval.entropy_wall.patience=15", "eval.prototype_collapse.after_steps=15",
              "eval.prototype_collapse.patience=15"]
    rows, warnings = _ct_run(tmp_path, "center_09", [*common, "dino.center_momentum=0.9"])
    assert [w["monitor"] for w in warnings] == ["entropy_wall"]
    msg = warnings[0]["message"]
    assert "`optim.lr=0.004`" in msg and "`dino.teacher_temp=0.04`" in msg
    assert "`dino.center_momentum=0.999`" in msg and "ln K = 5.5452" in msg and "batch-mean target entropy" in msg
    assert warnings[0]["step"] == 29  # at the wall from step 15 on: the 15th consecutive step
    assert min(r["dino_loss_frac"] for r in rows[14:]) > 0.95
    assert min(r["teacher_mean_entropy_frac"] for r in rows[14:]) > 0.9  # flat targets, not a collapsed head

    rows, warnings = _ct_run(tmp_path, "center_0999", [*common, "dino.center_momentum=0.999"])
    assert warnings == []
    assert max(r["dino_loss_frac"] for r in rows[14:]) < 0.8
