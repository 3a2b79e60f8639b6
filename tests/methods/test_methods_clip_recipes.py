"""The CLIP recipes: the two design-note recipes validate with their exact values, and the tiny CPU recipe trains
on real report text with zero-shot evaluation at its interval, retrieval above chance, and no best checkpoint
(it has no validation pairs)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest

from medfoundry.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_hybrid_recipe_is_exactly_as_designed():
    cfg = load_config(ROOT / "recipes/hybrid_dinov3_chexzero.yaml")
    c = cfg.clip
    assert cfg.method == "clip" and cfg.model.name == "vit_base_patch16_dinov3"
    assert c.embed_dim == 512 and c.image.proj == "linear" and c.image.pool == "token"
    assert (c.text.kind, c.text.width, c.text.layers, c.text.vocab_size, c.text.context_length) == (
        "clip", 512, 12, 49408, 512)
    assert c.text.keep_positions == 20 and c.text.pretrained
    assert c.loss.kind == "infonce" and c.loss.temperature == 0.07 and c.loss.learn_temperature
    o = cfg.optim
    assert (o.name, o.lr, o.min_lr, o.momentum, o.weight_decay, o.weight_decay_end) == ("sgd", 1e-4, 1e-4, 0.9, 0, 0)
    assert cfg.train.batch_size == 64 and cfg.train.steps == 25000 and c.eval.every_steps == 500
    p = c.preprocess
    assert (p.stored_size, p.size, p.interpolation, p.normalize, p.hflip_prob) == (320, 224, "bicubic",
                                                                                 "openai_clip", 0.5)
    assert c.data.kind == "chexzero" and c.data.text_column == "impression"
    assert c.eval.zeroshot.kind == "hdf5" and c.eval.zeroshot.negative_template == "no {}"
    assert "laterality" in (ROOT / "recipes/hybrid_dinov3_chexzero.yaml").read_text()  # the flip caveat


def test_medclip_recipe_is_exactly_as_designed():
    cfg = load_config(ROOT / "recipes/medclip_vitl14_bert.yaml")
    c, o = cfg.clip, cfg.optim
    assert cfg.model.name == "vit_large_patch14_dinov2" and cfg.model.grad_checkpointing
    assert c.text.kind == "hf" and c.text.context_length == 77 and c.text.grad_checkpointing
    assert (o.name, o.lr, o.weight_decay, o.weight_decay_end, o.warmup_steps) == ("adamw", 5e-5, 0.1, 0.1, 2000)
    assert cfg.train.batch_size == 4096 and cfg.dist.strategy == "ddp"
    assert cfg.train.steps == 11000 == math.ceil(30 * 1.5e6 / 4096 / 1000) * 1000  # ~30 epochs of 1.5M pairs
    p = c.preprocess
    assert p.train_crop == "center" and p.color_jitter_prob > 0 and p.hflip_prob > 0  # centre crop, jitter, flip
    assert c.loss.local_loss and c.loss.gather_with_grad
    assert c.eval.zeroshot.kind != "none" and c.eval.retrieval.source == "data"
    assert c.eval.val_loss.every_steps > 0 and c.eval.val_loss.data.manifest.endswith("val_pairs.parquet")
    assert "laterality" in (ROOT / "recipes/medclip_vitl14_bert.yaml").read_text()  # the flip caveat


_MISSING = importlib.util.find_spec("torchxrayvision") is None or importlib.util.find_spec("data_store") is None


@pytest.mark.skipif(_MISSING, reason="the tiny recipe needs torchxrayvision (report text) and pydicom-data (images)")
def test_tiny_recipe_trains_on_real_reports_and_retrieval_beats_chance(tmp_path: Path, capsys):
    from medfoundry_cli.cli import main
    from medfoundry_cli.commands.eval_clip import run_task

    run = tmp_path / "run"
    demo = ROOT / ".cache" / "clip_demo"  # exported pydicom-data frames are reused between runs
    code = main(["train", str(ROOT / "recipes/tiny_clip_cpu.yaml"), f"output_dir={run}", f"clip.data.demo_dir={demo}",
                 "train.progress=false", "train.tensorboard=false", "train.log_every=10"])
    assert code == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in lines if "zeroshot/mean_auc" in r}
    cfg = load_config(ROOT / "recipes/tiny_clip_cpu.yaml")
    assert sorted(evals) == list(range(cfg.clip.eval.every_steps, cfg.train.steps + 1, cfg.clip.eval.every_steps))
    last = evals[max(evals)]
    assert last["retrieval/num_pairs"] == 19
    assert last["retrieval/i2t_recall_at_1"] > 2 * last["retrieval/chance_at_1"]
    assert last["retrieval/i2t_recall_at_5"] > last["retrieval/chance_at_5"] + 0.2
    assert lines[-1]["loss"] < lines[0]["loss"] and lines[-1]["text_truncated_frac"] == 0.0
    assert math.isfinite(last["zeroshot/accuracy"]) and "zeroshot/auc/computed tomography" in last
    assert not (run / "best.pt").exists()  # all offline pairs are training pairs: no validation set to choose on

    capsys.readouterr()
    # `medfoundry eval RUN --task zeroshot,retrieval` dispatches both tasks to commands/eval_clip.py
    code = main(["eval", str(run), "--task", "zeroshot,retrieval", "--n-bootstrap", "50",
                 "--json", str(tmp_path / "eval.json")])
    assert code == 0
    out = json.loads((tmp_path / "eval.json").read_text())
    assert out["zeroshot"]["step"] == cfg.train.steps and "zeroshot/mean_auc" in out["zeroshot"]["results"]
    assert math.isclose(out["retrieval"]["results"]["retrieval/i2t_recall_at_5"],
                        last["retrieval/i2t_recall_at_5"], rel_tol=1e-6)
    args = argparse.Namespace(checkpoint=str(run), best=False, device="cpu", json_out=None, data=None,
                              label_column=None, n_bootstrap=None, clip_overrides=["clip.eval.retrieval.source=none"])
    assert run_task("retrieval", args) == 2  # nothing to retrieve on: a clear error, exit code 2
