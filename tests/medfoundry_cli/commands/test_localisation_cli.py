"""Localisation scores from the CLI: ``medfoundry attention --masks`` prints and writes them, ``medfoundry eval
--task localisation --data MANIFEST`` reports the same numbers; real PNGs, masks drawn by thresholding the images."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from labelled_images import make_labelled_pngs, write_disc_masks

from medfoundry_cli.cli import main

TINY = [
    "model.img_size=32", "crops.global_size=32", "crops.local_size=16", "crops.n_local=2",
    "dino.head.out_dim=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16",
    "train.batch_size=4", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-step tiny run on 8 PNGs (4 with a bright disc) and a manifest of the images with their disc masks
    (the 4 plain images get empty masks)."""
    tmp = tmp_path_factory.mktemp("localisation_cli")
    data = make_labelled_pngs(tmp / "labelled", n=8)
    run = tmp / "run"
    assert main(["train", "tiny_dino_cpu", f"output_dir={run}", f"data.root={data}", "train.steps=2",
                 "train.checkpoint_every=2", *TINY]) == 0
    manifest = write_disc_masks(data, tmp / "masks")
    df = pd.read_csv(manifest)
    return {"run": run, "manifest": manifest, "images": list(df["path"]),
            "masks": [str(manifest.parent / m) for m in df["mask"]], "tmp": tmp}


def test_attention_with_masks_prints_and_writes_the_scores(setup: dict, capsys: pytest.CaptureFixture) -> None:
    out = setup["tmp"] / "att"
    assert main(["attention", str(setup["run"]), *setup["images"], "--masks", *setup["masks"], "--out", str(out),
                 "--n-bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "localisation (class-token attention" in printed and "4 image(s) scored, 4 without mask" in printed
    assert "centre prior (baseline)" in printed and "uniform map (baseline)" in printed
    record = json.loads((out / "localisation.json").read_text())
    scores = record["scores"]
    assert scores["summary"]["n_images"] == 4 and len(scores["skipped_empty"]) == 4
    assert {r["name"] for r in scores["per_image"]} == {Path(p).stem for p in setup["images"] if "disc" in p}
    for key in ("pointing", "pointing_tol", "iou_top_area", "iou_t50", "auc"):
        s = scores["summary"]
        assert 0.0 <= s[f"{key}_ci_low"] <= s[key] <= s[f"{key}_ci_high"] <= 1.0, key
    for row in record["baselines"]["uniform"]["per_image"]:  # the floor: chance pointing, AUC 0.5
        assert row["pointing"] == pytest.approx(row["mask_fraction"]) and row["auc"] == 0.5
    assert (out / "img01_panel.png").is_file()  # the pictures are still written

    rand = setup["tmp"] / "att_random"
    assert main(["attention", str(setup["run"]), *setup["images"], "--masks", *setup["masks"], "--out", str(rand),
                 "--random-init", "--n-bootstrap", "0"]) == 0
    assert "random init" in json.loads((rand / "localisation.json").read_text())["backbone"]


def test_attention_without_masks_writes_no_scores(setup: dict, capsys: pytest.CaptureFixture) -> None:
    out = setup["tmp"] / "att_plain"
    assert main(["attention", str(setup["run"]), setup["images"][1], "--out", str(out)]) == 0
    assert "localisation (" not in capsys.readouterr().out and not (out / "localisation.json").exists()


def test_eval_task_localisation_reports_the_attention_commands_numbers(setup: dict,
                                                                       capsys: pytest.CaptureFixture) -> None:
    out_json = setup["tmp"] / "eval.json"
    assert main(["eval", str(setup["run"]), "--task", "localisation", "--data", str(setup["manifest"]),
                 "--n-bootstrap", "20", "--json", str(out_json)]) == 0
    assert "localisation_auc" in capsys.readouterr().out
    res = json.loads(out_json.read_text())["pretrained"]
    assert res["localisation_n_images"] == 4 and res["localisation_n_skipped_empty"] == 4
    att = setup["tmp"] / "att_same"
    assert main(["attention", str(setup["run"]), *setup["images"], "--masks", *setup["masks"], "--out", str(att),
                 "--n-bootstrap", "0"]) == 0
    summary = json.loads((att / "localisation.json").read_text())["scores"]["summary"]
    for key in ("pointing", "iou_top_area", "iou_t50", "auc"):  # same preprocessing, same maps: same point values
        assert res[f"localisation_{key}"] == pytest.approx(summary[key]), key


def test_eval_task_errors_name_the_fix(setup: dict, capsys: pytest.CaptureFixture) -> None:
    labels = setup["tmp"] / "labels.csv"
    pd.DataFrame({"path": setup["images"], "label": ["a"] * len(setup["images"])}).to_csv(labels, index=False)
    assert main(["eval", str(setup["run"]), "--task", "localisation", "--data", str(labels)]) == 2
    assert "needs a 'mask' column" in capsys.readouterr().err
    assert main(["attention", str(setup["run"]), *setup["images"][:2], "--masks", setup["masks"][0],
                 "--out", str(setup["tmp"] / "x")]) == 2
    assert "1 mask files for 2 images" in capsys.readouterr().err
