"""List the registered backbones."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default=None, help="only this family (dinov2, dinov3, vit)")


def run(args: argparse.Namespace) -> int:
    from medfoundry.models import list_backbones

    specs = [s for s in list_backbones() if args.family in (None, s.family)]
    width = max(len(s.name) for s in specs)
    for s in specs:
        print(f"{s.name:<{width}}  {s.family:<7} {s.description}")
    return 0
