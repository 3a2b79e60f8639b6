"""``train.nonfinite_check=device``: a non-finite step is skipped on the device, exactly as the host skips it.

The unit tests run one real DINO step (DINO + iBOT with centering, KoLeo) through the loop's own pieces
(``StepOutputs`` and ``train/step.py::update``) with a fused AdamW on the CPU: a skipped step leaves every tensor
of the method (student, EMA teacher, both centres) and of the optimizer (moments, step counts) bit-identical, and
a finite step equals the host-checked one bit for bit. The loop tests check what the host hears and when: the
same warnings, checkpoints and ``train.max_nonfinite_steps`` stop as in ``host`` mode, and a pre-emption stop
at most one step later, whose checkpoint resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch
from nan_method import nan_dino_method

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.config import load_config
from medfoundry.config.loader import ConfigError
from medfoundry.methods.dino.method import DINOMethod
from medfoundry.methods.registry import METHODS
from medfoundry.recipes import recipes_dir
from medfoundry.train import step as train_step
from medfoundry.train.accumulate import StepOutputs
from medfoundry.train.loop import NonFiniteLossError, train
from medfoundry.train.nonfinite import resolve_check
from medfoundry.train.optim import build_optimizer
from medfoundry.train.run_logger import read_metrics

BASE = ["model.name=vit_tiny_patch8", "model.img_size=32", "model.in_chans=1", "dino.head.out_dim=32",
        "dino.head.hidden_dim=16", "dino.head.bottleneck_dim=8", "dino.ibot_weight=1", "dino.koleo_weight=0.1",
        "dino.centering=center", "dino.teacher_momentum=0.9", "dino.teacher_momentum_end=0.9"]
RECIPE = recipes_dir() / "tiny_dino_cpu.yaml"
FAST = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4",
        "train.progress=false", "train.tensorboard=false"]


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(2, 3, 16, generator=g) < 0.4
    masks[:, :, 0] = True
    return {"global_crops": torch.randn(2, 3, 1, 32, 32, generator=g),
            "local_crops": torch.randn(4, 3, 1, 16, 16, generator=g), "masks": masks}


class Poisoned(torch.nn.Module):
    """The method, its loss times nan when ``poison`` is set (what a diverged step looks like to the loop)."""

    def __init__(self, method: DINOMethod) -> None:
        super().__init__()
        self.method = method
        self.poison = False

    def forward(self, batch: dict, step: int) -> dict:
        out = self.method(batch, step)
        if self.poison:
            out["loss"] = out["loss"] * float("nan")
        return out


def _step(model: Poisoned, optimizer, batch: dict, step: int, defer: bool) -> None:
    """One optimizer step as the loop runs it (one micro-batch), host- or device-checked."""
    method = model.method
    method.start_step(step)
    acc = StepOutputs(1, defer=defer)
    acc.forward_backward(model, batch, step, True, False, "fp32", torch.device("cpu"))
    params = [p for p in method.parameters() if p.requires_grad]
    if defer:
        train_step.update(method, optimizer, params, acc.mean(), step, 3.0, torch.device("cpu"), skip=acc.skip)
    elif acc.finite:
        train_step.update(method, optimizer, params, acc.mean(), step, 3.0, torch.device("cpu"))
    else:
        optimizer.zero_grad(set_to_none=True)


def _state(model: Poisoned, optimizer) -> dict[str, torch.Tensor]:
    flat = {f"method.{k}": v.clone() for k, v in model.method.state_dict().items()}
    for i, st in enumerate(optimizer.state.values()):
        flat.update({f"opt.{i}.{k}": v.clone() for k, v in st.items()})
    return flat


def _fresh() -> tuple[Poisoned, torch.optim.Optimizer]:
    cfg = load_config(None, BASE)
    torch.manual_seed(0)
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    return Poisoned(method), build_optimizer(method, cfg.optim, method.student["backbone"].depth, fused=True)


def test_a_skipped_step_changes_nothing_on_the_device() -> None:
    model, optimizer = _fresh()
    _step(model, optimizer, _batch(0), 0, defer=True)  # optimizer state exists now
    before = _state(model, optimizer)
    assert any(k.endswith("center") for k in before)
    model.poison = True
    _step(model, optimizer, _batch(1), 1, defer=True)
    after = _state(model, optimizer)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []  # student, EMA teacher, centres, AdamW moments and step counts
    assert all(p.grad is None for p in model.method.parameters())
    model.poison = False
    _step(model, optimizer, _batch(2), 2, defer=True)  # and the next finite step moves everything again
    moved = _state(model, optimizer)
    assert not torch.equal(moved["method.dino_loss.center"], after["method.dino_loss.center"])


def test_finite_and_skipped_steps_equal_the_host_checked_ones_bit_for_bit() -> None:
    device_side, host_side = _fresh(), _fresh()
    for defer, (model, optimizer) in ((True, device_side), (False, host_side)):
        for step, poison in enumerate([False, True, False, False]):
            model.poison = poison
            _step(model, optimizer, _batch(step), step, defer)
    a, b = _state(*device_side), _state(*host_side)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_device_check_needs_a_fused_adamw() -> None:
    model, _ = _fresh()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert resolve_check("auto", torch.device("cpu"), sgd, False) == "host"
    assert resolve_check("auto", torch.device("cuda"), sgd, False) == "host"
    with pytest.raises(ConfigError, match="train.nonfinite_check=device"):
        resolve_check("device", torch.device("cpu"), sgd, False)
    _, fused = _fresh()
    assert resolve_check("auto", torch.device("cpu"), fused, False) == "host"  # the CPU gains nothing from it
    with pytest.raises(ConfigError, match="FSDP"):
        resolve_check("device", torch.device("cpu"), fused, True)


@pytest.mark.parametrize("log_every", [1, 4])
def test_loop_skips_warns_and_stops_as_in_host_mode(tmp_path: Path, png_folder: Path, capsys, log_every: int) -> None:
    """Steps 3, 4, 5 non-finite, ``max_nonfinite_steps=3``: the same three warnings, the same checkpoints and
    metrics, and the stop; with ``log_every=4`` the host hears of steps 3 and 5 a step late (at 4 and 6)."""
    seen = {}
    for mode in ("host", "device"):
        with nan_dino_method("nan_device_test"):
            cfg = load_config(RECIPE, [*FAST, f"output_dir={tmp_path / mode}", f"data.root={png_folder}",
                                       "train.steps=10", "train.checkpoint_every=2", "train.max_nonfinite_steps=3",
                                       f"train.log_every={log_every}", f"train.nonfinite_check={mode}"])
            cfg.method = "nan_device_test"
            with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
                train(cfg)
        printed = capsys.readouterr().out + (tmp_path / mode / "error.log").read_text()
        seen[mode] = ([line.split("warning: ", 1)[1] for line in printed.splitlines() if "non-finite loss at" in line],
                      [p.name for p in list_checkpoints(tmp_path / mode)],
                      [r["step"] for r in read_metrics(tmp_path / mode)])
    assert seen["device"] == seen["host"]
    assert seen["host"][0][:3] == [f"non-finite loss at step {s}; step skipped ({s - 2} in a row)" for s in (3, 4, 5)]
    assert seen["host"][1] == ["step_00000002.pt"]


def test_a_stop_request_is_heard_at_most_a_step_later_and_resumes_exactly(tmp_path: Path, png_folder: Path) -> None:
    """SIGUSR1 during step 3's forward: ``host`` stops after step 4 (the next agreement), ``device`` after step 5
    (step 4's flags are read a step late, step 5 is no logging step); its checkpoint resumes to the same weights
    as a run that was never stopped."""
    base = METHODS["dino"]
    fire = {"at": 2}

    def build(cfg):
        method = base.build(cfg)
        forward = method.forward

        def signalling(batch, step):
            if step == fire["at"]:
                os.kill(os.getpid(), signal.SIGUSR1)
            return forward(batch, step)

        method.forward = signalling
        return method

    def run(out: Path, mode: str) -> int | None:
        stopped: list[int] = []
        cfg = load_config(RECIPE, [*FAST, f"output_dir={out}", f"data.root={png_folder}", "train.steps=8",
                                   "train.checkpoint_every=100", "train.log_every=10", f"train.nonfinite_check={mode}"])
        cfg.method = "signal_test"
        train(cfg, on_signal_stop=stopped.append)
        return stopped[0] if stopped else None

    METHODS["signal_test"] = dataclasses.replace(base, build=build)
    try:
        assert run(tmp_path / "host", "host") == 4
        assert run(tmp_path / "device", "device") == 5
        assert [p.name for p in list_checkpoints(tmp_path / "device")] == ["step_00000005.pt"]
        assert run(tmp_path / "device", "device") is None  # resumed at step 5: no signal any more, runs to 8
        fire["at"] = -1
        assert run(tmp_path / "whole", "device") is None
    finally:
        del METHODS["signal_test"]
    a = torch.load(list_checkpoints(tmp_path / "device")[-1], weights_only=False)
    b = torch.load(list_checkpoints(tmp_path / "whole")[-1], weights_only=False)
    assert a["step"] == b["step"] == 8
    assert a["method"].keys() == b["method"].keys()
    assert [k for k in a["method"] if not torch.equal(a["method"][k], b["method"][k])] == []
