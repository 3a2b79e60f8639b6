"""The localisation benchmark's slice preparation: patient-separated pretraining and scored sets, masks aligned
with their slices, small tumours left out and counted. Small NRRD volumes laid out like the pyradiomics data (no
download: the fetcher finds them in the cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medfoundry.data.readers.slices import read_stored
from medfoundry_cli.bench.localisation import format_localisation, prepare_localisation_slices
from medfoundry_cli.bench.offline_data import CASES, PYRADIOMICS_VERSION

nrrd = pytest.importorskip("nrrd")


def _write_cases(cache: Path) -> None:
    """Every case as a (6, 40, 40) HU volume: lung-like -800 HU with a +40 HU 'tumour' square on slices 2-4 (a
    small one, 3x3 px, on slice 4) and its label volume."""
    data = cache / "downloads" / f"pyradiomics-{PYRADIOMICS_VERSION}" / "data"
    data.mkdir(parents=True)
    for case, _, _ in CASES:
        image = np.full((6, 40, 40), -800.0, dtype=np.float32)
        label = np.zeros((6, 40, 40), dtype=np.uint8)
        for z, (y, x, side) in {2: (8, 20, 10), 3: (10, 22, 8), 4: (30, 5, 3)}.items():
            image[z, y : y + side, x : x + side] = 40.0
            label[z, y : y + side, x : x + side] = 1
        header = {"space directions": np.diag([1.0, 1.0, 5.0]), "space": "left-posterior-superior"}
        nrrd.write(str(data / f"{case}_image.nrrd"), np.ascontiguousarray(image.transpose(2, 1, 0)), header)
        nrrd.write(str(data / f"{case}_label.nrrd"), np.ascontiguousarray(label.transpose(2, 1, 0)), header)


def test_slices_are_split_by_patient_and_masks_align_with_their_images(tmp_path: Path) -> None:
    _write_cases(tmp_path)
    info = prepare_localisation_slices(tmp_path, size=20, pretrain=("lung1",), score=("lung2",), min_area_px=4)
    root = Path(info["root"])
    assert info["n_pretrain_slices"] == 6 and sorted(p.name[:5] for p in (root / "pretrain").glob("*.png")) == [
        "lung1"] * 6
    manifest = pd.read_csv(root / "score" / "manifest.csv")
    assert list(manifest["patient"]) == ["lung2", "lung2"] and list(manifest["z"]) == [2, 3]
    assert info["n_tumour_slices_below_min_area"] == 1  # the 3x3 px square is 1.5x1.5 px at half size
    for row in manifest.to_dict("records"):
        image = read_stored(root / "score" / row["path"])[0].astype(np.float64) / 65535.0
        mask = np.asarray(Image.open(root / "score" / row["mask"])) > 0
        assert image.shape == mask.shape == (20, 20) and int(mask.sum()) == row["mask_px"]
        assert image[mask].mean() > 0.7 > 0.4 > image[~mask].mean()  # the bright square is the mask
    again = prepare_localisation_slices(tmp_path, size=20, pretrain=("lung1",), score=("lung2",), min_area_px=4)
    assert again == info  # cached
    with pytest.raises(ValueError, match="both pretrained on and scored"):
        prepare_localisation_slices(tmp_path, size=20, pretrain=("lung1", "lung2"), score=("lung2",))


def test_table_lists_every_map_and_the_paired_difference() -> None:
    cell = {k: 0.5 for k in ("pointing", "pointing_tol", "iou_top_area", "iou_t50", "auc")}
    summary = {**cell, **{f"{k}_ci_low": 0.4 for k in cell}, **{f"{k}_ci_high": 0.6 for k in cell},
               "n_images": 3.0, "mask_fraction": 0.01, "tolerance_px": 8.0}
    result = {"step": 300, "scores": {k: {"summary": summary} for k in ("pretrained", "random_init", "centre_prior",
                                                                        "uniform")},
              "pretrained_minus_random_init": summary, "patients_scored": ["lung2"], "grid": [12, 12],
              "data": {"n_pretrain_slices": 48}, "spec": {"pretrain": ["lung1"]}, "train_seconds": 1.0,
              "score_seconds": 1.0}
    table = format_localisation(result)
    for label in ("pretrained (300 steps)", "random init (step 0)", "centre Gaussian prior", "uniform map",
                  "pretrained - random init (paired)"):
        assert f"| {label} | 0.500 [0.400, 0.600] |" in table
    assert "3 tumour slices of lung2" in table
