"""Localisation benchmark on the real pyradiomics CT tumour masks: attention of pretrained vs random init vs priors.

The library does the work (:mod:`medfoundry_cli.bench.localisation`; data fetched through pip into ``--cache`` on
first use). It pretrains a tiny ViT on the CT slices of one patient (``--pretrain``, default lung1), then scores the
last-block class-token attention (mean over heads) on the tumour slices of the other (``--score``, default lung2)
with the pointing game, IoU and pixel AUC (:mod:`medfoundry.eval.localisation`), against the same backbone at random
initialisation, a centre Gaussian prior and a uniform map. Results: ``OUTPUT_DIR/localisation.json``, the attention
pictures under ``OUTPUT_DIR/attention/``, the table printed (docs/evaluation.md, "Localisation").

Usage: ``python benchmarks/bench_localisation.py [--steps 300] [--size 96] [--set KEY=VALUE] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps")
    parser.add_argument("--size", type=int, default=96, help="model input side in pixels")
    parser.add_argument("--pretrain", default="lung1", help="comma-separated pyradiomics cases to pretrain on")
    parser.add_argument("--score", default="lung2", help="comma-separated cases whose tumour slices are scored")
    parser.add_argument("--min-area", type=int, default=20, help="smallest tumour area (px at --size) scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.add_argument("--cache", default=".cache/quality")
    parser.add_argument("--output-dir", default="runs/localisation")
    parser.add_argument("--resume", action="store_true", help="resume the run folder instead of replacing it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from medfoundry_cli.bench.localisation import LocalisationSpec, report_localisation

    spec = LocalisationSpec(cache=args.cache, output_dir=args.output_dir, size=args.size,
                            pretrain=tuple(c for c in args.pretrain.split(",") if c),
                            score=tuple(c for c in args.score.split(",") if c), min_area_px=args.min_area,
                            steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                            n_bootstrap=args.n_bootstrap, overrides=args.overrides, resume=args.resume)
    report_localisation(spec, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
