"""Bad inputs a newcomer hits in the first hour: one line on stderr naming the file/key/column and the fix, exit
code 2, no traceback on the terminal, and within 5 s of the command starting (measured in-process, after the
interpreter's imports; no model or data is built before the check)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from labelled_images import make_labelled_pngs

from medfoundry_cli.cli import main

TINY = ["train.steps=2", "train.checkpoint_every=2", "train.progress=false", "train.tensorboard=false",
        "dino.head.out_dim=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "train.batch_size=4"]


def _fails_fast(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    t0 = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err and seconds < 5.0, (seconds, err)
    line = err.splitlines()[-1]
    assert all(n in line for n in needles), line
    return line


def test_pair_table_without_the_text_column(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.csv").write_text("image,text\na.png,no effusion\n")
    _fails_fast(["train", "tiny_clip_cpu", f"output_dir={tmp_path / 'run'}", "clip.data.kind=manifest",
                 "clip.data.manifest=pairs.csv"], capsys, "clip.data.manifest", "'report'", "['image', 'text']",
                "clip.data.text_column")
    assert not (tmp_path / "run").exists()


def test_missing_pretrained_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_labelled_pngs(tmp_path / "images", n=4)
    _fails_fast(["train", "tiny_dino_cpu", f"output_dir={tmp_path / 'run'}", f"data.root={data}",
                 f"model.pretrained={tmp_path / 'weights' / 'dinov2.pth'}", *TINY], capsys,
                "'model.pretrained'", "does not exist")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("first_hour")
    data = make_labelled_pngs(root / "images", n=8)
    assert main(["train", "tiny_dino_cpu", f"output_dir={root / 'run'}", f"data.root={data}", *TINY]) == 0
    return root / "run"


def test_attention_on_a_slide_says_to_cut_tiles(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the traceback log goes to ./medfoundry-error.log
    slide = tmp_path / "slide.svs"
    tifffile.imwrite(slide, np.zeros((256, 256, 3), np.uint8), tile=(128, 128))
    capsys.readouterr()
    _fails_fast(["attention", str(tiny_run), str(slide), "--out", str(tmp_path / "maps")], capsys,
                str(slide), "medfoundry prepare", "tile")


def test_attention_overrides_reach_the_preprocessing(tiny_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    image = next((tiny_run.parent / "images").rglob("*.png"))
    capsys.readouterr()
    _fails_fast(["attention", str(tiny_run), str(image), "--out", str(tmp_path / "m"), "--override",
                 "crops.meen=[0.4]"], capsys, "crops.meen", "nearest valid key: 'crops.mean'")
    assert main(["attention", str(tiny_run), str(image), "--out", str(tmp_path / "m"), "--override",
                 "crops.mean=[0.4]"]) == 0
    assert any((tmp_path / "m").glob("*_panel.png"))
