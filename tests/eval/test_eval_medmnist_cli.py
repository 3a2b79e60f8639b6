"""MedMNIST-layout ``.npz`` files (2-D multi-label, RGB multi-class, 3-D) evaluate through ``medfoundry eval``.

A tiny DINO run is trained on the multi-label file itself (``data.kind=medmnist``), then evaluated on each file
with ``--data FILE.npz``: the file's own splits, the multi-label probe's per-label and mean AUC, the 3-D protocol
(the three central slices of a volume averaged into one feature) and one-line errors for malformed files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from medmnist_files import write_chest_like, write_rgb_multiclass, write_volumes, write_with
from tiny_runs import train_tiny_run

from medfoundry_cli.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("medmnist_cli")
    chest = write_chest_like(d / "chestmnist.npz", constant_test_label=13)
    run = train_tiny_run(d / "run", chest, "data.kind=medmnist", "data.split=train", "eval.n_bootstrap=20",
                         "eval.every_steps=2", f"eval.data={chest}", "eval.tasks=[multilabel]",
                         "eval.best_metric=val_multilabel_mean_auc")
    return {"dir": d, "run": run, "chest": chest, "rgb": write_rgb_multiclass(d / "dermamnist.npz"),
            "vol": write_volumes(d / "nodulemnist3d.npz")}


def _eval(setup: dict, data: Path, tasks: str, *extra: str) -> tuple[int, dict]:
    out = setup["dir"] / f"{data.stem}_{tasks.replace(',', '_')}.json"
    rc = main(["eval", str(setup["run"]), "--task", tasks, "--data", str(data), "--json", str(out), "--no-cache",
               *extra])
    return rc, (json.loads(out.read_text()) if rc == 0 else {})


def test_multi_label_2d_file(setup: dict, capsys: pytest.CaptureFixture) -> None:
    rc, res = _eval(setup, setup["chest"], "linear,multilabel")
    assert rc == 0
    captured = capsys.readouterr()
    assert "train: any=" in captured.out and "14 labels per image" in captured.out
    r = res["pretrained"]
    per_label = [r[f"multilabel_auc_{j}"] for j in range(14)]
    assert math.isnan(per_label[13])  # label 13 is 0 on every test image: undefined, and said so
    assert "label(s) '13' (always 0)" in captured.err
    assert any(w["rule"] == "single_class_label" and w["split"] == "test" for w in res["warnings"])
    assert all(0.0 <= a <= 1.0 for a in per_label[:13])
    assert r["multilabel_mean_auc"] == pytest.approx(np.mean(per_label[:13]))
    assert r["multilabel_mean_auc"] > 0.7  # labels are textures in the images: far above chance
    assert r["multilabel_mean_auc_ci_low"] <= r["multilabel_mean_auc"] <= r["multilabel_mean_auc_ci_high"]
    assert r["multilabel_labels_scored"] == 13 and r["multilabel_n_labels"] == 14
    assert 0.0 <= r["val_multilabel_mean_auc"] <= 1.0 and r["multilabel_best_C"] > 0
    assert "linear_auc" in r  # the single-label tasks see 'any label' against 'none'
    assert "multilabel_mean_auc" in captured.out and "multilabel_auc_0" in captured.out


def test_in_training_evaluation_reads_the_labels(setup: dict) -> None:
    from medfoundry.eval.in_training import read_eval_history

    (last,) = read_eval_history(setup["run"])
    assert last["step"] == 2 and last["multilabel_n_labels"] == 14 and math.isnan(last["multilabel_auc_13"])
    assert 0.5 < last["multilabel_mean_auc"] <= 1.0 and 0.5 < last["val_multilabel_mean_auc"] <= 1.0
    best = json.loads((setup["run"] / "best.json").read_text())
    assert best["metric"] == "val_multilabel_mean_auc" and best["value"] == pytest.approx(
        last["val_multilabel_mean_auc"])


def test_rgb_multi_class_file(setup: dict) -> None:
    rc, res = _eval(setup, setup["rgb"], "knn,linear,multilabel")
    assert rc == 0
    r = res["pretrained"]
    assert {"knn_top1_k20", "linear_accuracy", "linear_auc", "multilabel_auc_0", "multilabel_auc_2"} <= set(r)
    assert r["linear_balanced_accuracy"] > 0.6 and r["multilabel_mean_auc"] > 0.8
    assert r["multilabel_n_labels"] == 3  # one-vs-rest over the three classes


def test_3d_file_one_feature_per_volume(setup: dict, capsys: pytest.CaptureFixture) -> None:
    rc, res = _eval(setup, setup["vol"], "linear,multilabel", "--feature", "mean_patch")
    assert rc == 0
    assert "counts are volumes" in capsys.readouterr().out
    r = res["pretrained"]
    assert r["linear_auc"] > 0.8 and r["multilabel_mean_auc"] == pytest.approx(r["multilabel_auc_1"])

    # the same numbers as averaging the three central slices' features by hand
    from medfoundry.eval.eval_images import eval_transform_from_config
    from medfoundry.eval.features import compute_feature_set
    from medfoundry.eval.labelled_set import load_labelled_set
    from medfoundry.eval.tasks import evaluate_backbone, evaluate_features
    from medfoundry.methods.checkpoint_backbone import load_backbone

    loaded = load_backbone(setup["run"])
    lset = load_labelled_set(setup["vol"])
    fs = compute_feature_set(loaded.backbone, lset, eval_transform_from_config(loaded.sections), "mean_patch")
    volumes = fs.aggregate_series()
    assert len(fs.feats) == 3 * len(volumes.feats) == 3 * 80
    np.testing.assert_allclose(volumes.feats[0], fs.feats[:3].mean(axis=0), rtol=1e-6)
    tasks = ["multilabel", "health"]  # health's statistics depend on every feature row: they see the aggregation
    by_hand = evaluate_features(volumes, tasks, n_bootstrap=20)
    through, _, _ = evaluate_backbone(loaded, tasks, data=str(setup["vol"]), feature="mean_patch",
                                      n_bootstrap=20, use_cache=False)
    assert through == pytest.approx(by_hand, nan_ok=True)
    assert through != pytest.approx(evaluate_features(fs, tasks, n_bootstrap=20), nan_ok=True)


def test_malformed_file_is_a_one_line_error(setup: dict, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(setup["dir"])  # the CLI appends the traceback to ./medfoundry-error.log
    missing = write_with(setup["dir"] / "no_val_labels.npz", setup["chest"], drop="val_labels")
    rc, _ = _eval(setup, missing, "multilabel")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "no_val_labels.npz" in err[0] and "'val_labels'" in err[0]
    with np.load(setup["chest"]) as raw:
        short = write_with(setup["dir"] / "short.npz", setup["chest"], test_labels=raw["test_labels"][:-5])
    rc, _ = _eval(setup, short, "linear")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "short.npz" in err[0] and "'test_labels'" in err[0]
