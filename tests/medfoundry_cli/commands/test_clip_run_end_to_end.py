"""A CLIP run is a first-class run: a tiny ``tiny_clip_cpu`` run is exported with ``--which image``, its image
tower evaluated with kNN and drawn with ``attention`` (both through the tower's own preprocessing: 1 channel,
``clip.preprocess.size``, the pixel statistics it trained with), and reported with its zero-shot numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from labelled_images import make_labelled_pngs

from medfoundry.methods.checkpoint_backbone import load_backbone
from medfoundry_cli.cli import main

ROOT = Path(__file__).resolve().parents[3]
_MISSING = importlib.util.find_spec("torchxrayvision") is None or importlib.util.find_spec("data_store") is None


@pytest.mark.skipif(_MISSING, reason="the tiny recipe needs torchxrayvision (report text) and pydicom-data (images)")
def test_tiny_clip_run_exports_evaluates_draws_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["train", "tiny_clip_cpu", f"output_dir={run}", f"clip.data.demo_dir={ROOT / '.cache' / 'clip_demo'}",
                 "train.steps=10", "clip.eval.every_steps=5", "train.checkpoint_every=10", "train.progress=false",
                 "train.tensorboard=false"]) == 0

    loaded = load_backbone(run)
    assert loaded.method == "clip"
    crops = loaded.sections.crops
    assert crops.global_size == 64 and len(crops.mean) == 1 and crops.mean != [0.5]  # measured statistics

    hf = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", "--which", "image", "--out", str(hf)]) == 0
    record = json.loads((hf / "medfoundry_export.json").read_text())
    assert record["mean"] == pytest.approx(crops.mean) and record["method"] == "clip"

    labelled = make_labelled_pngs(tmp_path / "labelled", n=16)
    out = tmp_path / "knn.json"
    assert main(["eval", str(run), "--task", "knn", "--data", str(labelled), "--n-bootstrap", "10", "--no-cache",
                 "--json", str(out)]) == 0
    assert 0.0 <= json.loads(out.read_text())["pretrained"]["knn_top1_k10"] <= 1.0

    image = labelled / "disc" / "img01.png"
    assert main(["attention", str(run), str(image), "--out", str(run / "attention" / "x")]) == 0
    assert (run / "attention" / "x" / "img01_panel.png").is_file()

    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "Image-text evaluation" in page and "zeroshot/mean_auc" in page and "Zero-shot AUC per finding" in page
    assert "Health monitors" not in page  # the DINO family's monitors never watched this run
    assert "<th>split</th>" in page and "(clip.eval.zeroshot)" in page  # each table row names its images
    assert (run / "report" / "eval_clip.png").is_file()
