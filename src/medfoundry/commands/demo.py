"""Run the end-to-end demo on real bundled medical images (fetch, pretrain, evaluate vs random init, report).

Fetches (once, through pip, into .cache/demo_ct) the real CT/MR test volumes of the pyradiomics
3.0.1 source archive and the pydicom-data samples, pretrains a tiny ViT with the DINO-X-style
recipe ``demo_ct_cpu`` on the CPU, evaluates kNN / linear probe / retrieval / health of the
pretrained backbone beside the same backbone at random initialisation, renders attention and PCA
maps and writes the HTML report. See docs/demo.md.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo recipe, e.g. train.steps=300")
    parser.add_argument("--output", default="runs/demo_ct_cpu", help="run folder (replaced on every demo run)")
    parser.add_argument("--cache", default=".cache/demo_ct", help="where the demo data are prepared and cached")
    parser.add_argument("--steps", type=int, help="pretraining steps (default: the recipe's train.steps)")
    parser.add_argument("--keep", action="store_true", help="resume an existing run folder instead of replacing it")


def run(args: argparse.Namespace) -> int:
    from medfoundry.demo import run_demo

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    report = run_demo(args.output, args.cache, overrides, fresh=not args.keep)
    print(f"\nreport: {report.resolve()}")
    return 0
