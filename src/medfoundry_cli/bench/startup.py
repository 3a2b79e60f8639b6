"""Time to first step: how long a user waits between typing ``medfoundry train`` and the first training step.

A fresh process runs ``python -m medfoundry_cli train RECIPE`` (the tiny CPU recipe by default) on a small folder
of 16-bit PNGs written for the purpose, and the clock stops when the run's ``metrics.jsonl`` holds its first
record, which the loop writes right after step 1. The figure therefore holds interpreter start-up, the imports
(the part lazy imports shrink: a command pays only for the modules it uses), loading and validating the config,
building the model and the data loader, and the first step itself. The median over ``repeats`` fresh processes
is reported with the min and max; each run writes its own run folder, so nothing is resumed.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medfoundry_cli.bench.data import write_png_folder


def _first_record_written(metrics: Path) -> bool:
    return metrics.is_file() and "\n" in metrics.read_text()


def time_to_first_step(recipe: str = "tiny_dino_cpu", overrides: tuple[str, ...] = (), repeats: int = 3,
                       timeout_s: float = 300.0) -> dict[str, object]:
    """``{"recipe", "seconds": [...], "median_s", "min_s", "max_s"}``: seconds from process start to the first
    ``metrics.jsonl`` record of a one-step run, for ``repeats`` fresh processes (see the module docstring)."""
    seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="medfoundry_startup_") as tmp:
        images = write_png_folder(Path(tmp) / "images", n_images=16, size=64)
        for i in range(repeats):
            run = Path(tmp) / f"run_{i}"
            cmd = [sys.executable, "-m", "medfoundry_cli", "train", recipe, f"output_dir={run}",
                   f"data.root={images}", "train.steps=1", *overrides]
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            first = None
            while first is None:
                if _first_record_written(run / "metrics.jsonl"):
                    first = time.perf_counter() - start
                elif proc.poll() is not None:
                    err = (proc.stderr.read() if proc.stderr else "")[-2000:]
                    raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode} before its first step:\n{err}")
                elif time.perf_counter() - start > timeout_s:
                    proc.kill()
                    raise RuntimeError(f"no first step within {timeout_s:.0f} s: {' '.join(cmd)}")
                else:
                    time.sleep(0.01)
            proc.communicate(timeout=timeout_s)
            seconds.append(first)
    return {"recipe": recipe, "seconds": [round(s, 3) for s in seconds], "median_s": statistics.median(seconds),
            "min_s": min(seconds), "max_s": max(seconds)}


def format_startup(result: dict[str, object]) -> str:
    """One printed line: the median time to first step with its spread and the runs it came from."""
    return (f"time to first step ({result['recipe']}, fresh process, {len(result['seconds'])} runs): "
            f"median {result['median_s']:.2f} s (min {result['min_s']:.2f}, max {result['max_s']:.2f})")
