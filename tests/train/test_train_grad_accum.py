"""Gradient accumulation (``train.grad_accum_steps``): N micro-batches of B are the batch of N x B wherever the loss
is a mean over samples (DINO with centering, iBOT, Gram), on the same samples; KoLeo is per micro-batch; the data
position, non-finite skips, pre-emption and resume count optimizer steps; CLIP refuses it."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.config import load_config
from medfoundry.config.loader import ConfigError
from medfoundry.methods import get_method_entry
from medfoundry.methods.dino.method import DINOMethod
from medfoundry.methods.registry import METHODS
from medfoundry.recipes import recipes_dir
from medfoundry.train.accumulate import StepOutputs, scaled_loss
from medfoundry.train.loop import train
from medfoundry.train.run_logger import read_metrics

RECIPE = recipes_dir() / "tiny_dino_cpu.yaml"
# the configuration where accumulation must be exact: DINO with centering, no KoLeo, no Sinkhorn, no drop-path
EXACT = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "model.drop_path_rate=0",
         "dino.koleo_weight=0", "dino.ibot_weight=0", "dino.centering=center", "dino.head.out_dim=64",
         "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "train.progress=false",
         "train.tensorboard=false", "train.checkpoint_every=1000"]
SYNTH = ["model.name=vit_tiny_patch8", "model.img_size=32", "model.in_chans=1", "dino.head.out_dim=64",
         "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16"]


def _batch(b: int = 8) -> dict:
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(2, b, 16, generator=g) < 0.3
    masks[:, :, 0] = True
    return {"global_crops": torch.randn(2, b, 1, 32, 32, generator=g),
            "local_crops": torch.randn(2, b, 1, 16, 16, generator=g), "masks": masks}


def _method(*overrides: str) -> DINOMethod:
    cfg = load_config(None, [*SYNTH, *overrides])
    torch.manual_seed(0)
    return DINOMethod(cfg.model, cfg.dino, total_steps=10)


def _grads(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def _big_and_accumulated(n_micro: int, *overrides: str) -> tuple[dict, dict, DINOMethod, DINOMethod]:
    """Gradients (and the methods after their centre update) of one batch of 8 and of ``n_micro`` slices of it."""
    batch = _batch()
    big, acc = _method(*overrides), _method(*overrides)
    big.start_step(0)
    big(batch, 0)["loss"].backward()
    big.after_optimizer_step(0)
    acc.start_step(0)
    size = 8 // n_micro
    for m in range(n_micro):
        micro = {k: v[:, m * size:(m + 1) * size] for k, v in batch.items()}
        scaled_loss(acc(micro, 0)["loss"], n_micro).backward()
    acc.after_optimizer_step(0)
    return _grads(big), _grads(acc), big, acc


@pytest.mark.parametrize("terms", [["dino.ibot_weight=0"], ["dino.ibot_weight=1", "dino.gram_weight=0.5"]],
                         ids=["dino", "dino+ibot+gram"])
def test_accumulated_gradients_equal_the_big_batch(terms: list[str]) -> None:
    """DINO (and iBOT, Gram) with centering are means over samples: N micro-batches give the big batch's gradients
    and, updated once from all micro-batches' teacher outputs, its centres."""
    ref, got, big, acc = _big_and_accumulated(2, "dino.centering=center", *terms)
    assert set(got) == set(ref) and len(ref) > 10
    for name, g in got.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(acc.dino_loss.center, big.dino_loss.center, rtol=1e-5, atol=1e-7)
    assert big.dino_loss.center.abs().sum() > 0  # the centre moved
    if "dino.ibot_weight=1" in terms:
        torch.testing.assert_close(acc.ibot_loss.center, big.ibot_loss.center, rtol=1e-5, atol=1e-7)


def test_koleo_is_computed_per_micro_batch() -> None:
    """KoLeo's nearest neighbours are searched within a micro-batch (as DINOv2 does per GPU): not the big batch."""
    ref, got, _, _ = _big_and_accumulated(2, "dino.koleo_weight=1.0")
    name = "student.backbone.vit.blocks.0.attn.qkv.weight"
    assert not torch.allclose(got[name], ref[name], rtol=1e-3, atol=1e-6)


def test_start_step_forgets_the_teacher_outputs_of_a_skipped_step() -> None:
    method = _method()
    method.start_step(0)
    method(_batch(4), 0)
    method(_batch(4), 0)
    assert len(method._pending["dino"]) == 2  # gathered over the micro-batches ...
    method.start_step(1)
    assert method._pending == {}  # ... and dropped when a new step starts (the previous one was skipped)


def test_step_outputs_average_the_micro_batches() -> None:
    acc = StepOutputs(2)
    acc.add({"loss": torch.tensor(1.0), "x": torch.tensor(4.0), "vec": torch.ones(3)})
    acc.add({"loss": torch.tensor(3.0), "x": torch.tensor(6.0)})
    assert {k: float(v) for k, v in acc.mean().items()} == {"loss": 2.0, "x": 5.0}
    one = StepOutputs(1)
    loss = torch.tensor(0.25)
    one.add({"loss": loss})
    assert one.mean()["loss"] is not None and float(one.mean()["loss"]) == 0.25
    assert scaled_loss(loss, 1) is loss and float(scaled_loss(loss, 4)) == 0.0625


def test_micro_batches_of_a_step_are_the_samples_of_the_big_batch(png_folder: Path) -> None:
    """Sample k is a pure function of (seed, k): step s's micro-batches hold exactly the big batch of step s."""
    entry = get_method_entry("dino")
    views = []
    for batch, n_micro in ((8, 1), (4, 2)):
        cfg = load_config(RECIPE, [*EXACT, f"data.root={png_folder}", f"train.batch_size={batch}"])
        torch.manual_seed(0)
        method = entry.build(cfg)
        step = 1  # the loop positions the loader at step x N micro-batches
        it = iter(entry.build_loader(cfg, method, step * n_micro, 0, 1))
        views.append(torch.cat([next(it)["global_crops"] for _ in range(n_micro)], dim=1))
    assert torch.equal(views[0], views[1])


def _run(out: Path, root: Path, *extra: str) -> list[dict]:
    train(load_config(RECIPE, [*EXACT, f"output_dir={out}", f"data.root={root}", *extra]))
    return read_metrics(out)


def test_a_short_accumulated_run_equals_the_big_batch_run(tmp_path: Path, png_folder: Path) -> None:
    """grad_accum_steps=2 with batch 4 follows batch 8 step by step (same samples, exact decomposition)."""
    big = _run(tmp_path / "big", png_folder, "train.batch_size=8", "train.steps=4")
    acc = _run(tmp_path / "acc", png_folder, "train.batch_size=4", "train.grad_accum_steps=2", "train.steps=4")
    assert [r["step"] for r in acc] == [1, 2, 3, 4]
    for rb, ra in zip(big, acc):
        for key in ("loss", "dino_loss", "teacher_entropy", "grad_norm", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert [p.name for p in list_checkpoints(tmp_path / "acc")] == ["step_00000004.pt"]  # optimizer steps


@contextmanager
def _instrumented(name: str, on_call) -> Iterator[list[float]]:
    """Register ``name``: the real DINO method whose forward records a checksum of its input and calls
    ``on_call(index, out)`` (to poison a loss or send a signal at a given micro-batch)."""
    base = METHODS["dino"]
    seen: list[float] = []

    def build(cfg):
        method = base.build(cfg)
        forward = method.forward

        def wrapped(batch, step):
            seen.append(float(batch["global_crops"].double().sum()))
            out = forward(batch, step)
            on_call(len(seen) - 1, out)
            return out

        method.forward = wrapped
        return method

    METHODS[name] = dataclasses.replace(base, build=build)
    try:
        yield seen
    finally:
        del METHODS[name]


def _accum_cfg(out: Path, root: Path, *extra: str, method: str = "dino"):
    cfg = load_config(RECIPE, [*EXACT, f"output_dir={out}", f"data.root={root}", "train.batch_size=2",
                               "train.grad_accum_steps=2", *extra])
    cfg.method = method
    return cfg


@pytest.mark.parametrize("poisoned_call", [2, 3], ids=["first-micro-batch", "last-micro-batch"])
def test_a_non_finite_micro_batch_skips_its_step_and_keeps_the_data_position(
        tmp_path: Path, png_folder: Path, poisoned_call: int, capsys: pytest.CaptureFixture) -> None:
    """Step 2 (forward calls 2 and 3) gets one non-finite micro-batch: the whole step is skipped, its remaining
    micro-batch is still read, and step 3 sees the samples it sees in a clean run."""
    def poison(index: int, out: dict) -> None:
        if index == poisoned_call:
            out["loss"] = out["loss"] * float("nan")

    with _instrumented("accum_clean", lambda i, o: None) as clean:
        train(_accum_cfg(tmp_path / "clean", png_folder, "train.steps=3", method="accum_clean"))
    with _instrumented("accum_nan", poison) as poisoned:
        train(_accum_cfg(tmp_path / "nan", png_folder, "train.steps=3", method="accum_nan"))
    assert [r["step"] for r in read_metrics(tmp_path / "nan")] == [1, 3]
    # a non-finite first micro-batch: the second is read but not run
    assert len(poisoned) == (5 if poisoned_call == 2 else 6) and len(clean) == 6
    assert poisoned[-2:] == clean[-2:]  # step 3's micro-batches: the same samples as in the clean run
    assert "non-finite loss at step 2; step skipped" in capsys.readouterr().out


def test_preemption_mid_step_checkpoints_that_step_and_resumes_exactly(tmp_path: Path, png_folder: Path) -> None:
    """A SIGUSR1 during step 2's first micro-batch: the step finishes (both micro-batches), is checkpointed, the
    run stops; resuming continues at micro-batch 2 x 2 and matches an uninterrupted run."""
    def signal_at(index: int, out: dict) -> None:
        if index == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    stopped: list[int] = []
    with _instrumented("accum_sig", signal_at) as calls:
        train(_accum_cfg(tmp_path / "run", png_folder, "train.steps=4", method="accum_sig"), stopped.append)
    assert stopped == [2] and len(calls) == 4
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002.pt"]
    with _instrumented("accum_sig", lambda i, o: None) as calls:  # the same command again, without the signal
        train(_accum_cfg(tmp_path / "run", png_folder, "train.steps=4", method="accum_sig"))
    assert len(calls) == 4  # steps 3 and 4, two micro-batches each
    straight = _run(tmp_path / "straight", png_folder, "train.batch_size=2", "train.grad_accum_steps=2",
                    "train.steps=4")
    resumed = read_metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ra, rb in zip(resumed, straight):
        assert ra["loss"] == rb["loss"] and ra["dino_loss"] == rb["dino_loss"], ra["step"]


def test_clip_refuses_accumulation_and_names_the_alternative() -> None:
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps.*contrastive.*GradCache"):
        load_config(recipes_dir() / "tiny_clip_cpu.yaml", ["train.grad_accum_steps=2"])
    assert load_config(recipes_dir() / "tiny_clip_cpu.yaml", ["train.grad_accum_steps=1"]).train.grad_accum_steps == 1


def test_grad_accum_steps_must_be_at_least_one() -> None:
    with pytest.raises(ConfigError, match=r"'train.grad_accum_steps' = 0 must be >= 1"):
        load_config(RECIPE, ["train.grad_accum_steps=0"])
