"""Run the end-to-end demo on real medical images (fetch, pretrain, evaluate vs random init and raw pixels, report).

Fetches (once, through pip and apt-get download, into .cache/quality) the MNI152 brain template (nilearn)
and the Harvard-Oxford cortical atlas (Debian mricron-data), cuts lobe-labelled patches split by
hemisphere, pretrains a tiny ViT with the recipe ``quality_brain_cpu`` on the CPU, evaluates kNN (with
bootstrap intervals) / linear probe / retrieval / health of the pretrained backbone beside the same
backbone at random initialisation and raw pixels on the held-out hemisphere, renders attention and PCA
maps and writes the HTML report. See docs/demo.md.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo recipe, e.g. train.steps=300")
    parser.add_argument("--output", default="runs/demo_brain_cpu", help="run folder (replaced on every demo run)")
    parser.add_argument("--cache", default=".cache/quality", help="where the demo data are prepared and cached")
    parser.add_argument("--steps", type=int, help="pretraining steps (default: the recipe's train.steps)")
    parser.add_argument("--keep", action="store_true", help="resume an existing run folder instead of replacing it")


def _passive_openmp(args: argparse.Namespace) -> int | None:
    """Make OpenMP threads sleep instead of spin while waiting (``OMP_WAIT_POLICY=PASSIVE``).

    On a 2-core machine shared with anything else, spinning OpenMP workers slow PyTorch's CPU
    kernels down by an order of magnitude (measured: 2.5 s instead of 0.2 s per demo step with two
    other busy processes); passive waiting costs nothing measurable when the machine is idle. The
    policy is read when the OpenMP runtime loads (``import torch``), so it is set before that, or
    the demo re-runs itself in a child process when torch is already loaded. Returns the child's
    exit code in that case, else None. A policy the user set is respected.
    """
    import os
    import subprocess
    import sys

    if "OMP_WAIT_POLICY" in os.environ:
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" not in sys.modules:
        return None
    argv = [*args.overrides, "--output", args.output, "--cache", args.cache]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    if args.keep:
        argv.append("--keep")
    return subprocess.call([sys.executable, "-m", "medfoundry_cli", "demo", *argv], env=os.environ.copy())


def run(args: argparse.Namespace) -> int:
    child = _passive_openmp(args)
    if child is not None:
        return child
    from medfoundry_cli.demo import run_demo

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    report = run_demo(args.output, args.cache, overrides, fresh=not args.keep)
    print(f"\nreport: {report.resolve()}")
    return 0
