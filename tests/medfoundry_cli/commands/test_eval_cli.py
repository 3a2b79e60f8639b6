"""The eval / attention / report commands on a tiny checkpoint trained with in-training evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from labelled_images import make_labelled_pngs
from PIL import Image

from medfoundry_cli.cli import main

TINY = [
    "model.img_size=32", "crops.global_size=32", "crops.local_size=16", "crops.n_local=2",
    "dino.head.out_dim=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16",
    "train.batch_size=4", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
    "eval.n_bootstrap=20", "eval.retrieval_images=6", "eval.split_fractions=[0.5,0.25,0.25]",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("evalx_cli")
    data = make_labelled_pngs(tmp / "labelled")
    run = tmp / "run"
    rc = main(["train", "tiny_dino_cpu", f"output_dir={run}", f"data.root={data}", "train.steps=4",
               "train.checkpoint_every=2", "eval.every_steps=2", f"eval.data={data}",
               "eval.best_metric=val_knn_top1_k10", "eval.tasks=[knn,linear,health,retrieval]", *TINY])
    assert rc == 0
    return {"run": run, "data": data, "tmp": tmp}


@pytest.mark.parametrize("task", ["knn", "linear", "retrieval", "health"])
def test_evalx_cli_tasks(trained: dict, task: str, capsys: pytest.CaptureFixture) -> None:
    out_json = trained["tmp"] / f"{task}.json"
    rc = main(["eval", str(trained["run"]), "--task", task, "--data", str(trained["data"]), "--json", str(out_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads(out_json.read_text())["pretrained"]
    expected = {"knn": "knn_top1_k20", "linear": "linear_auc", "retrieval": "view_retrieval_ratio",
                "health": "health_effective_rank"}[task]
    assert expected in results and expected in printed
    if task == "retrieval":
        assert 0.0 <= results["view_top1"] <= 1.0
        assert results["view_chance"] == pytest.approx(1 / results["num_images"])  # DINO-X: chance 1/N
    if task == "linear":
        assert results["linear_auc_ci_low"] <= results["linear_auc"] <= results["linear_auc_ci_high"]


def test_evalx_cli_view_retrieval_is_label_free(trained: dict, capsys: pytest.CaptureFixture) -> None:
    """No labelled set: the view retrieval reads the run's training images, or any folder given."""
    out_json = trained["tmp"] / "label_free.json"
    assert main(["eval", str(trained["run"]), "--task", "retrieval", "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())["pretrained"]
    assert res["num_images"] == 6  # eval.retrieval_images of the run, capped by nothing (16 images)
    other = trained["tmp"] / "unlabelled"
    make_labelled_pngs(other, n=9)
    assert main(["eval", str(trained["run"]), "--task", "retrieval", "--retrieval-data", str(other),
                 "--retrieval-images", "100", "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())["pretrained"]
    assert res["num_images"] == 9  # capped at the images available
    assert res["view_retrieval_ratio"] == pytest.approx(res["view_top1"] * 9)
    assert "label-free" in capsys.readouterr().out


def test_evalx_cli_cache_random_init_and_compare(trained: dict, capsys: pytest.CaptureFixture) -> None:
    run, data = trained["run"], str(trained["data"])
    assert main(["eval", str(run), "--task", "knn", "--data", data]) == 0
    assert main(["eval", str(run), "--task", "knn,health", "--data", data]) == 0
    assert "features from cache" in capsys.readouterr().out
    assert list((run / "eval" / "feature_cache").glob("*.npz"))
    out = trained["tmp"] / "cmp.json"
    assert main(["eval", str(run), "--task", "knn,health", "--data", data, "--compare-random", "--json", str(out)]) == 0
    both = json.loads(out.read_text())
    assert set(both) >= {"pretrained", "random_init"}
    key = "health_mean_pairwise_cosine"
    assert both["pretrained"][key] != both["random_init"][key]
    comparison = json.loads((run / "eval" / "comparison.json").read_text())
    entry = next(iter(comparison["labels"].values()))
    assert entry["majority_class"]["knn_top1_k20"] == pytest.approx(entry["majority"]["by_split"]["test"]["accuracy"])
    assert entry["query_split"] == "test" and sum(entry["split_sizes"].values()) == 16 and entry["warnings"] == []
    ckpt = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    assert main(["eval", str(ckpt), "--task", "health", "--data", data, "--random-init", "--feature", "both"]) == 0
    assert "random_init" in capsys.readouterr().out


def test_evalx_cli_warns_about_a_single_class_test_split(trained: dict, capsys: pytest.CaptureFixture) -> None:
    """Accuracy on a one-class test split means nothing and its AUC is undefined: said on stderr and in --json."""
    rows = []
    for label in ("disc", "plain"):  # 8 images each: 4 train, 2 val, 2 test (test: disc only)
        for i, p in enumerate(sorted((trained["data"] / label).glob("*.png"))):
            split = "train" if i < 4 else "val" if i < 6 else "test"
            if split != "test" or label == "disc":
                rows.append((p, label, split))
    manifest = trained["tmp"] / "one_class_test.csv"
    manifest.write_text("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))
    out_json = trained["tmp"] / "one_class.json"
    capsys.readouterr()
    assert main(["eval", str(trained["run"]), "--task", "knn", "--data", str(manifest), "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "warning: the test split holds a single class ('disc'" in captured.err and "nan" in captured.err
    assert "[majority class: always" in captured.out
    saved = json.loads(out_json.read_text())
    assert [w["rule"] for w in saved["warnings"]] == ["single_class"]
    assert np.isnan(saved["pretrained"]["knn_auc_k20"])  # undefined, and reported so
    assert saved["majority_class"]["knn_top1_k20"] in (0.0, 1.0)


def test_evalx_cli_errors(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(tmp_path / "missing"), "--task", "knn"]) == 2
    assert main(["eval", str(trained["run"]), "--task", "nonsense", "--data", str(trained["data"])]) == 2
    assert main(["eval", str(trained["run"]), "--task", "knn", "--data", str(tmp_path / "nothing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # image-text task names go to commands/eval_clip (when present), which refuses a DINO checkpoint
    assert main(["eval", str(trained["run"]), "--task", "zeroshot"]) != 0


def test_evalx_attention_pngs(trained: dict) -> None:
    images = sorted(trained["data"].rglob("*.png"))[:2]
    out = trained["tmp"] / "att"
    assert main(["attention", str(trained["run"]), *map(str, images), "--out", str(out), "--img-size", "48"]) == 0
    stem = images[0].stem
    for suffix in ("head0", "head3", "mean", "pca", "panel"):
        png = out / f"{stem}_{suffix}.png"
        assert png.is_file()
        with Image.open(png) as im:
            assert im.mode in ("RGB", "RGBA") and im.size[0] >= 48
    maps = np.load(out / f"{stem}_maps.npz")
    assert maps["heads"].shape == (4, 6, 6) and maps["pca"].shape == (6, 6, 3)
    assert np.all(maps["heads"] >= 0) and maps["heads"].sum(axis=(1, 2)).max() <= 1.0 + 1e-5


def test_evalx_report_html(trained: dict, capsys: pytest.CaptureFixture) -> None:
    run = trained["run"]
    images = sorted(trained["data"].rglob("*.png"))[:1]
    assert main(["attention", str(run), *map(str, images), "--out", str(run / "attention" / "pretrained")]) == 0
    assert main(["report", str(run)]) == 0
    assert "report:" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    for needle in ("Loss terms", "Teacher entropy", "kNN", "Linear probe",
                   "Representation health", "attention", "Config", "best.pt"):
        assert needle in page, needle
    for png in ("losses.png", "schedules.png", "teacher.png", "eval_knn.png", "eval_linear_probe.png"):
        assert (run / "report" / png).is_file(), png
    assert "_panel.png" in page
    assert main(["report", str(run / "missing")]) == 2
