"""List the bundled recipes, one line each."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--paths", action="store_true", help="print full paths")


def run(args: argparse.Namespace) -> int:
    from medfoundry.recipes import list_recipes, recipes_dir

    entries = list_recipes()
    width = max((len(n) for n, _ in entries), default=0)
    for name, desc in entries:
        shown = str(recipes_dir() / f"{name}.yaml") if args.paths else name
        print(f"{shown:<{width}}  {desc}")
    return 0
