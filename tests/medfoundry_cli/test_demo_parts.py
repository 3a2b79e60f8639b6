"""Pieces of the demo that run offline: data preparation plumbing, splits, the comparison table.

The demo itself (real data, minutes of training) is run by hand; see docs/demo.md.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medfoundry_cli import demo
from medfoundry_cli.bench import offline_data


def test_evalx_demo_slice_splits_cover_every_split() -> None:
    positive = np.zeros(48, dtype=bool)
    positive[30:33] = True  # like lung1: 3 tumour slices
    splits = demo._slice_splits(48, positive, seed=0)
    assert {splits[i] for i in range(30, 33)} == {"train", "val", "test"}
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert counts["train"] > counts["test"] > counts["val"] > 0
    assert splits == demo._slice_splits(48, positive, seed=0)


def test_evalx_demo_intensity_and_resize() -> None:
    ct = np.array([[-2000.0, -1150.0], [-400.0, 350.0]])
    np.testing.assert_allclose(demo.scale_intensity(ct, "CT"), [[0.0, 0.0], [0.5, 1.0]])
    mr = np.linspace(0, 100, 1000).reshape(10, 100)
    scaled = demo.scale_intensity(mr, "MR")
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    out = demo.square_resize(np.ones((120, 45), dtype=np.float32), 32)
    assert out.shape == (32, 32) and out[:, 0].max() < 0.1 and out[16, 16] > 0.99  # zero-padded sides


def test_evalx_demo_prepare_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nrrd = pytest.importorskip("nrrd")
    data = tmp_path / "cache" / "downloads" / f"pyradiomics-{offline_data.PYRADIOMICS_VERSION}" / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.7, 0.7, 5.0]),
              "space origin": np.zeros(3)}
    for case, _, modality in offline_data.CASES:  # stand-ins with the archive's layout (x, y, z), for plumbing only
        image = (rng.normal(-500 if modality == "CT" else 300, 200, (24, 20, 6))).astype(np.int16)
        label = np.zeros(image.shape, np.int16)
        label[8:12, 8:12, 2:4] = 1
        nrrd.write(str(data / f"{case}_image.nrrd"), image, header)
        nrrd.write(str(data / f"{case}_label.nrrd"), label, header)
    monkeypatch.setattr("medfoundry.data.bundled.export_pydicom_samples", lambda out, max_side: [])
    prepared = demo.prepare_demo_data(tmp_path / "cache", size=16)
    assert prepared.n_slices == 5 * 6
    with open(prepared.manifest) as fh:
        rows = list(csv.DictReader(fh))
    assert {r["tumour"] for r in rows} == {"tumour", "no_tumour"}
    assert sum(r["tumour"] == "tumour" for r in rows) == 10
    assert {r["region"] for r in rows} == {"chest_ct", "brain_mr", "breast_mr"}
    assert all((prepared.root / r["path"]).is_file() for r in rows)
    again = demo.prepare_demo_data(tmp_path / "cache", size=16)  # idempotent: read back, nothing rewritten
    assert again.manifest == prepared.manifest and again.n_slices == prepared.n_slices


def test_evalx_demo_comparison_table() -> None:
    comparison = {"labels": {"tumour": {"summary": "test: a=1", "pretrained": {"knn_top1_k20": 0.9, "linear_auc": 0.8},
                                        "random_init": {"knn_top1_k20": 0.7, "linear_auc": 0.6}}}}
    text = demo.format_comparison(comparison)
    assert "knn_top1_k20" in text and "0.9000" in text and "0.6000" in text


def test_evalx_demo_headline_says_whether_the_intervals_overlap() -> None:
    def entry(pre: tuple[float, float, float], rnd: tuple[float, float, float]) -> dict:
        def metrics(v: tuple[float, float, float]) -> dict:
            return {"knn_top1_k20": v[0], "knn_top1_k20_ci_low": v[1], "knn_top1_k20_ci_high": v[2]}

        return {"labels": {"lobe": {"summary": "", "pretrained": metrics(pre), "random_init": metrics(rnd),
                                    "raw_pixels": metrics(rnd)}}}

    ahead = demo.headline(entry((0.85, 0.84, 0.86), (0.65, 0.64, 0.66)))
    assert "pretrained ahead, intervals do not overlap" in ahead and "0.8500 [0.840, 0.860]" in ahead
    assert "intervals overlap" in demo.headline(entry((0.70, 0.66, 0.74), (0.68, 0.64, 0.72)))
    assert "RANDOM INIT ahead" in demo.headline(entry((0.60, 0.59, 0.61), (0.70, 0.69, 0.71)))
    table = demo.format_comparison(entry((0.85, 0.84, 0.86), (0.65, 0.64, 0.66)))
    assert "raw pixels" in table and "0.6500 [0.640, 0.660]" in table


def test_evalx_demo_attention_picks_one_test_image_per_class_first(tmp_path: Path) -> None:
    rows = [("a.png", "frontal", "train"), ("b.png", "frontal", "test"), ("c.png", "frontal", "test"),
            ("d.png", "temporal", "test"), ("e.png", "occipital", "val")]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,lobe,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))
    picks = demo._pick_attention_images(manifest, "lobe", n=3)
    assert [p.name for p in picks][:2] == ["b.png", "d.png"]
    assert all(p.parent == tmp_path for p in picks) and len(picks) == 3


def test_demo_comparison_table_has_splits_majority_class_and_marks_only_separated_intervals(tmp_path: Path) -> None:
    from medfoundry.eval.labelled_set import load_labelled_set
    from medfoundry.eval.report_context import comparison_context

    rows = [("frontal", "train")] * 3 + [("temporal", "train")] + [("frontal", "val"), ("temporal", "val")] + \
        [("frontal", "test")] * 2 + [("temporal", "test")] * 2
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,lobe,split\n" + "".join(f"p{i}.png,{lab},{s}\n" for i, (lab, s) in enumerate(rows)))
    lset = load_labelled_set(manifest, "lobe")
    pre = {"knn_top1_k20": 0.85, "knn_top1_k20_ci_low": 0.84, "knn_top1_k20_ci_high": 0.86,
           "linear_accuracy": 0.70, "linear_accuracy_ci_low": 0.60, "linear_accuracy_ci_high": 0.80}
    rnd = {"knn_top1_k20": 0.65, "knn_top1_k20_ci_low": 0.64, "knn_top1_k20_ci_high": 0.66,
           "linear_accuracy": 0.68, "linear_accuracy_ci_low": 0.58, "linear_accuracy_ci_high": 0.78}
    entry = {"summary": lset.summary(), "pretrained": pre, "random_init": rnd,
             **comparison_context(lset, pre, "test", ["the linear probe's choice of C"])}
    assert entry["majority_class"] == {"knn_top1_k20": 0.5, "linear_accuracy": 0.5}  # 'frontal' on test: 2 of 4
    lines = demo.format_comparison({"labels": {"lobe": entry}}).splitlines()
    knn = next(line for line in lines if line.strip().startswith("knn_top1_k20"))
    linear = next(line for line in lines if line.strip().startswith("linear_accuracy"))
    assert "test" in knn and "0.8500 [0.840, 0.860] *" in knn and knn.rstrip().endswith("0.5000")
    assert "*" not in linear  # the intervals overlap: no mark
    assert any("always 'frontal'" in line for line in lines) and any("* better" in line for line in lines)
    assert "(majority class 0.5000)" in demo.headline({"labels": {"lobe": entry}})
    assert entry["warnings"] == []
    one_class = dict(entry, warnings=[{"rule": "single_class", "split": "test", "message": "the test split holds"}])
    assert "WARNING: the test split holds" in demo.format_comparison({"labels": {"lobe": one_class}})
