"""The README's Quick-start block, run literally: each line as written, from a folder laid out like the repository
root after ``make demo`` (``recipes/`` and ``.cache/quality/brain``).

The demo's data are the real MNI152 brain patches (``medfoundry_cli.bench.quality_data.prepare_brain_patches``,
minutes to fetch and cut); here a small stand-in in the same layout takes their place: 16-bit PNG patches in
``images/{train,val,test}`` with the demo's file names and a ``manifest.csv`` with its columns (``lobe`` label,
``split``), including the file the block's ``attention`` line names.
"""

from __future__ import annotations

import csv
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest

from medfoundry.data.readers.slices import FULL_RANGE_UINT16, write_stored
from medfoundry_cli.cli import main

ROOT = Path(__file__).resolve().parents[2]


def quickstart_lines(readme: Path = ROOT / "README.md") -> list[str]:
    """The commands of the first ``bash`` block under ``## Quick start`` (comments stripped, one per line)."""
    text = readme.read_text()
    section = text[text.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md: no ```bash block under '## Quick start'"
    lines = []
    for raw in block.group(1).splitlines():
        line = re.sub(r"\s+#.*$", "", raw).strip()
        if line:
            lines.append(line)
    return lines


def _patch(rng: np.random.Generator, bright: bool, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    img = 0.2 + 0.2 * (xx / size) + 0.05 * rng.standard_normal((size, size))
    if bright:
        cy, cx, r = rng.integers(14, 34), rng.integers(14, 34), rng.integers(6, 12)
        img += 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2)
    return (np.clip(img, 0, 1) * 65535).round().astype(np.uint16)


def write_demo_layout(cache: Path, names: list[str]) -> None:
    """``cache/quality/brain``: patches per split + manifest, in the demo's layout; ``names`` must exist in test."""
    brain = cache / "quality" / "brain"
    rng = np.random.default_rng(0)
    rows = []
    counts = {"train": 24, "val": 10, "test": 10}
    for split, n in counts.items():
        folder = brain / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        files = [f"x{'-' if split != 'test' else '+'}{10 + i:03d}_y050_z060.png" for i in range(n)]
        if split == "test":
            files[: len(names)] = names
        for i, name in enumerate(files):
            lobe = "frontal" if i % 2 else "temporal"
            write_stored(folder / name, _patch(rng, lobe == "frontal"), FULL_RANGE_UINT16)
            rows.append({"path": f"images/{split}/{name}", "lobe": lobe, "region": lobe, "x_mm": 0.0,
                         "hemisphere": "right" if split == "test" else "left", "split": split})
    with open(brain / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_the_block_is_the_one_the_readme_promises() -> None:
    lines = quickstart_lines()
    assert lines[0] == ". .venv/bin/activate"
    assert all(line.startswith("medfoundry ") for line in lines[1:]), lines
    assert any(" train " in f" {line} " for line in lines) and any(line.startswith("medfoundry eval") for line in lines)


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    """Each line's words after ``medfoundry`` go to the command's ``main`` (what the console script calls), in
    one process from the stand-in root, so the block costs its work and not twelve interpreter start-ups."""
    lines = quickstart_lines()
    attention_images = [w for line in lines if line.startswith("medfoundry attention")
                        for w in shlex.split(line) if w.startswith(".cache/quality/brain/images/test/")]
    write_demo_layout(tmp_path / ".cache", [Path(w).name for w in attention_images])
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    seconds = {}
    for line in lines[1:]:  # the first activates the venv this test already runs in
        t0 = time.perf_counter()
        try:
            code = main(shlex.split(line)[1:])
        except SystemExit as stop:  # --version exits through argparse
            code = stop.code
        seconds[line] = time.perf_counter() - t0
        out = capsys.readouterr()
        assert code in (0, None), f"README line failed (exit {code}): {line}\n{out.err[-3000:]}"
    print({k[:40]: round(v, 1) for k, v in seconds.items()})
    assert (tmp_path / "runs" / "tiny" / "report.html").is_file()
    assert (tmp_path / "runs" / "tiny" / "hf" / "config.json").is_file()
    assert any((tmp_path / "runs" / "tiny" / "maps").glob("*_panel.png"))
