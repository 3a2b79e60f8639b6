"""The tiny CPU recipe trains on a folder of DICOM series prepared by `medfoundry prepare`."""

from __future__ import annotations

import math
from pathlib import Path

from medical_testdata import ct_phantom, write_ct_series

from medfoundry.config import load_config
from medfoundry.data.prepare import PrepareOptions, prepare
from medfoundry.recipes import resolve_recipe
from medfoundry.train.loop import train
from medfoundry.train.run_logger import read_metrics


def test_tiny_recipe_runs_on_prepared_dicom(tmp_path: Path) -> None:
    for i in range(3):
        write_ct_series(tmp_path / "raw" / f"p{i}", stored=ct_phantom(depth=5, rows=48, cols=48, seed=i),
                        patient_id=f"P{i}", seed=i)
    report = prepare(tmp_path / "raw", tmp_path / "prepared", PrepareOptions(progress=False))
    assert len(report.written) == 3 and not report.failed

    cfg = load_config(
        resolve_recipe("tiny_dino_cpu"),
        [
            f"output_dir={tmp_path / 'run'}",
            "data.kind=prepared",
            f"data.root={tmp_path / 'prepared'}",
            "data.slices=3",
            "data.intensity=window",
            "data.windows=[lung]",
            "data.random_window_prob=0.5",
            "data.channels=3",
            "model.in_chans=3",
            "crops.mean=[0.5]",
            "crops.std=[0.25]",
            "train.steps=3",
            "train.batch_size=4",
            "train.checkpoint_every=3",
            "train.progress=false",
            "train.tensorboard=false",
        ],
    )
    run_dir = train(cfg)
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
