"""The pinned behaviour: 5-step traces of the tiny recipes and the resolved config of every recipe.

``python tests/golden/golden_runs.py --write`` records them into ``tests/golden/`` (only when a change of
behaviour is intended, and say so in the commit); ``test_golden.py`` compares against the records.
The runs use data the tests create (seeded 16-bit PNGs) or that installed packages ship (pydicom's
example frames and report text for CLIP), so the records are reproducible offline.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # tests/: the shared image writers, also when run as a script

from labelled_images import write_grey_pngs  # noqa: E402

STEPS = 5
COMMON = ["train.progress=false", "train.tensorboard=false", "train.log_every=1", f"train.steps={STEPS}",
          "train.device=cpu", "train.checkpoint_every=1000"]
#: metrics that measure time, not behaviour
UNTIMED = ("images_per_s", "seconds", "data_wait", "step_time")


def trace(run_dir: Path) -> list[dict[str, float]]:
    """Per logged step, every finite numeric metric except timings."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.append({k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and not any(t in k for t in UNTIMED) and (not isinstance(v, float) or math.isfinite(v))})
    return rows


def run_traces(work: Path) -> dict[str, list[dict[str, float]]]:
    """Train ``tiny_dino_cpu``, ``tiny_clip_cpu`` and ``distill_tiny_cpu`` for 5 steps each; their traces."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one intra-op thread: the reductions' order, hence the bits, do not depend on the host
    try:
        return _run_traces(work)
    finally:
        torch.set_num_threads(threads)


def _run_traces(work: Path) -> dict[str, list[dict[str, float]]]:
    from medfoundry.recipes import resolve_recipe
    from medfoundry_cli.cli import main

    pngs = write_grey_pngs(work / "pngs")
    small = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4"]
    out = {}
    dino = work / "dino"
    _check(main(["train", str(resolve_recipe("tiny_dino_cpu")), f"output_dir={dino}", f"data.root={pngs}",
                 *small, *COMMON]))
    out["tiny_dino_cpu"] = trace(dino)
    clip = work / "clip"
    _check(main(["train", str(resolve_recipe("tiny_clip_cpu")), f"output_dir={clip}",
                 f"clip.data.demo_dir={work / 'clip_demo'}", "clip.eval.every_steps=0",
                 "train.batch_size=8", *COMMON]))
    out["tiny_clip_cpu"] = trace(clip)
    distill = work / "distill"
    _check(main(["train", str(resolve_recipe("distill_tiny_cpu")), f"output_dir={distill}", f"data.root={pngs}",
                 f"distill.teacher_checkpoint={dino}", "train.batch_size=4", *COMMON]))
    out["distill_tiny_cpu"] = trace(distill)
    return out


def config_snapshots() -> dict[str, str]:
    """``{recipe name: resolved config YAML}`` for every bundled recipe."""
    from medfoundry.config import load_config
    from medfoundry.config.loader import to_yaml
    from medfoundry.recipes import recipes_dir

    return {p.stem: to_yaml(load_config(p)) for p in sorted(recipes_dir().glob("*.yaml"))}


def _check(code: int) -> None:
    if code != 0:
        raise SystemExit(f"a golden run failed with exit code {code}")


def main() -> int:
    """Write (``--write``) or print the records."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="overwrite the records in tests/golden/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        traces = run_traces(Path(tmp))
    configs = config_snapshots()
    if not args.write:
        print(json.dumps(traces, indent=1))
        return 0
    (HERE / "traces.json").write_text(json.dumps(traces, indent=1, sort_keys=True) + "\n")
    cdir = HERE / "configs"
    cdir.mkdir(exist_ok=True)
    for name, text in configs.items():
        (cdir / f"{name}.yaml").write_text(text)
    print(f"wrote {HERE / 'traces.json'} and {len(configs)} config snapshots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
