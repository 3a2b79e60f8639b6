"""The command line on the intensity traps: unmapped 16-bit PNGs stop ``train`` at once (exit 2, one line naming
the file and the fixes); ``attention --masks`` draws label outlines (a file per image or a folder of same-named
masks)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from labelled_images import make_labelled_pngs
from PIL import Image

from medfoundry_cli.cli import main

TINY = ["train.steps=2", "train.checkpoint_every=2", "train.progress=false", "train.tensorboard=false",
        "dino.head.out_dim=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "train.batch_size=4"]


def test_train_refuses_unmapped_16bit_pngs_within_seconds(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ct_pngs"
    folder.mkdir()
    hu = np.random.default_rng(0).integers(-1000, 1500, (48, 48))
    for i in range(4):
        Image.fromarray((hu + 1024).astype(np.uint16)).save(folder / f"slice_{i}.png")  # HU + 1024, unrecorded
    t0 = time.perf_counter()
    code = main(["train", "tiny_dino_cpu", f"output_dir={tmp_path / 'run'}", f"data.root={folder}", *TINY])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and seconds < 5.0, (code, seconds, err)
    line = err.splitlines()[-1]
    for needle in ("ct_pngs/slice_", "16-bit", "data.slice_slope", "data.unmapped_16bit=full_range", "write_stored"):
        assert needle in line, needle
    assert not (tmp_path / "run").exists()  # refused before the run folder is written


def test_train_refuses_an_unmapped_evaluation_set_at_start_too(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = make_labelled_pngs(tmp_path / "train", n=4)  # mapped: fine
    for label in ("a", "b"):
        (tmp_path / "eval" / label).mkdir(parents=True)
        Image.fromarray(np.full((48, 48), 30000, np.uint16)).save(tmp_path / "eval" / label / "x.png")
    t0 = time.perf_counter()
    code = main(["train", "tiny_dino_cpu", f"output_dir={tmp_path / 'run'}", f"data.root={data}",
                 f"eval.data={tmp_path / 'eval'}", "eval.every_steps=1", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and time.perf_counter() - t0 < 5.0, err
    assert "eval/a/x.png" in err.splitlines()[-1] and "16-bit" in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("honesty")
    data = make_labelled_pngs(root / "images", n=8)
    assert main(["train", "tiny_dino_cpu", f"output_dir={root / 'run'}", f"data.root={data}", *TINY]) == 0
    return root / "run", data


def test_attention_masks_from_a_folder_and_per_image(tiny_run: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run, data = tiny_run
    images = sorted(data.rglob("*.png"))[:2]
    masks = tmp_path / "masks"
    masks.mkdir()
    box = np.zeros((48, 48), np.uint8)
    box[10:30, 12:36] = 1
    Image.fromarray(box).save(masks / images[0].name)  # only the first image has a mask
    out = tmp_path / "att"
    assert main(["attention", str(run), *map(str, images), "--out", str(out), "--img-size", "48", "--masks",
                 str(masks)]) == 0
    assert f"no mask {masks / images[1].name}" in capsys.readouterr().err
    with_mask = np.load(out / f"{images[0].stem}_maps.npz")["mask"]
    assert with_mask.shape == (48, 48) and with_mask.sum() == 20 * 24
    assert np.load(out / f"{images[1].stem}_maps.npz")["mask"].size == 0
    assert main(["attention", str(run), *map(str, images), "--out", str(out), "--masks",
                 str(masks / images[0].name)]) == 2  # one file for two images
    assert "1 mask files for 2 images" in capsys.readouterr().err
    assert main(["attention", str(run), str(images[0]), "--out", str(out / "one"), "--img-size", "48", "--masks",
                 str(masks / images[0].name)]) == 0
    assert np.load(out / "one" / f"{images[0].stem}_maps.npz")["mask"].sum() == 20 * 24
