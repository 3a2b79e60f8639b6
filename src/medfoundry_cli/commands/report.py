"""Write a run's HTML report (losses, lr, teacher entropy, eval metrics, attention): medfoundry report RUN_DIR."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder (holds metrics.jsonl, config.yaml ...)")
    parser.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html; plots go beside it)")


def run(args: argparse.Namespace) -> int:
    from medfoundry.eval.report import write_report

    if not Path(args.run_dir).is_dir():
        print(f"medfoundry report: run folder '{args.run_dir}' does not exist", file=sys.stderr)
        return 2
    path = write_report(args.run_dir, args.out)
    print(f"report: {path.resolve()}")
    return 0
