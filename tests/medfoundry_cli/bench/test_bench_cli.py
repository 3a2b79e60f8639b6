"""Benchmarks: the analytic ViT FLOPs agree with torch's FlopCounterMode, the largest-batch search, and
``medfoundry bench`` in tiny configuration on CPU printing images/s and MFU for every mode."""

from __future__ import annotations

import json

import pytest
import torch

from medfoundry.config.schema import ModelConfig
from medfoundry.methods.dino.method import DINOMethod
from medfoundry.models.registry import create_backbone
from medfoundry_cli.bench.flops import ViTShape, count_flops, nominal_cpu_peak_flops, peak_flops, vit_forward_flops
from medfoundry_cli.bench.step import (
    StepSpec,
    TrainStep,
    analytic_dino_flops,
    dino_run_config,
    largest_batch,
    synthetic_dino_batch,
)
from medfoundry_cli.cli import main


@pytest.mark.parametrize("name,size,chans", [("vit_tiny_patch8", 64, 3), ("vit_tiny_patch8_reg2", 32, 1),
                                             ("vit_tiny_patch8_rope", 48, 3)])
def test_analytic_vit_forward_flops_match_flop_counter(name: str, size: int, chans: int) -> None:
    backbone = create_backbone(ModelConfig(name=name, img_size=size, in_chans=chans)).eval()
    x = torch.randn(2, chans, size, size)
    with torch.no_grad():
        counted, _ = count_flops(lambda: backbone.forward_features(x))
    analytic = 2 * vit_forward_flops(ViTShape.from_backbone(backbone), size, size)
    assert counted > 0 and abs(analytic / counted - 1) < 0.01


def test_analytic_dino_step_flops_within_a_few_percent_of_flop_counter() -> None:
    spec = StepSpec(batch=2, n_local=2)
    cfg = dino_run_config(spec)
    torch.manual_seed(0)
    method = DINOMethod(cfg.model, cfg.dino, cfg.train.steps)
    step = TrainStep(method, cfg, torch.device("cpu"), "fp32")
    batch = synthetic_dino_batch(cfg, 2, 8, torch.device("cpu"))
    counted, loss = count_flops(lambda: step(batch, 0))
    analytic = analytic_dino_flops(cfg, ViTShape.from_backbone(method.student["backbone"]), 2,
                                   int(batch["masks"].sum()))
    assert torch.isfinite(loss) and abs(analytic / counted - 1) < 0.05


def test_largest_batch_search_finds_the_oom_boundary() -> None:
    tried = []

    def try_batch(b: int) -> None:
        tried.append(b)
        if b > 300:
            raise torch.OutOfMemoryError("fake")

    found = largest_batch(try_batch, 8)
    assert 300 - 300 // 32 <= found <= 300 and len(tried) < 20
    assert largest_batch(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), 4) == 0


def test_peaks() -> None:
    assert peak_flops(torch.device("cpu"), "fp32", 2.0) == (2e12, "given 2 TFLOP/s")
    nominal, text = nominal_cpu_peak_flops(threads=2)
    assert nominal > 1e9 and "nominal CPU" in text


def test_bench_cli_tiny_on_cpu_prints_images_per_s_and_mfu(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "--mode", "all", "--threads", "1", "--batch", "2", "--n-local", "2", "--steps", "1",
                 "--warmup", "1", "--images", "4", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "images/s" in text and "MFU" in text and "nominal CPU" in text
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["model", "aug", "aug", "e2e", "e2e", "clip"]
    assert all(r["images_per_s"] > 0 for r in results)
    for r in (results[0], results[-1]):
        assert 0 < r["mfu"] < 1 and r["flops_counted"] > 0 and 0.9 < r["flops_analytic"] / r["flops_counted"] < 1.1
        assert r["peak_mem_bytes"] > 0
    assert all(0 <= r["data_wait_frac"] <= 1 for r in results if r["mode"] == "e2e")
