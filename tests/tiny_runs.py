"""Tiny real training runs and 8-bit picture folders for the export tests (importable from any test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY = ["model.img_size=32", "crops.global_size=32", "crops.local_size=16", "dino.head.out_dim=64",
        "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "train.batch_size=4", "train.steps=2",
        "train.checkpoint_every=2", "train.progress=false", "train.tensorboard=false"]


def write_pictures(folder: Path, shapes: list[tuple[int, int]], channels: int = 1, seed: int = 0) -> list[Path]:
    """Seeded 8-bit PNGs (smooth gradient + noise + a disc) of the given (height, width) shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(shapes):
        yy, xx = np.mgrid[0:h, 0:w]
        img = 0.2 + 0.4 * xx / w + 0.2 * (((yy - h / 2) ** 2 + (xx - w / 3) ** 2) < (min(h, w) / 4) ** 2)
        img = np.clip(img[..., None] + 0.1 * rng.standard_normal((h, w, channels)), 0, 1)
        arr = (img * 255).round().astype(np.uint8)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(arr[..., 0] if channels == 1 else arr).save(path)
        paths.append(path)
    return paths


def train_tiny_run(run_dir: Path, data_root: Path, *overrides: str) -> Path:
    """A 2-step ``tiny_dino_cpu`` run at 32 px on ``data_root`` (``medfoundry train``); returns the run folder."""
    from medfoundry_cli.cli import main

    assert main(["train", "tiny_dino_cpu", f"output_dir={run_dir}", f"data.root={data_root}", *TINY,
                 *overrides]) == 0
    return run_dir
