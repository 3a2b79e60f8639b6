"""Print the resolved configuration of a recipe with overrides."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (path or bundled name)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def run(args: argparse.Namespace) -> int:
    from medfoundry.config import load_config, to_yaml
    from medfoundry.recipes import resolve_recipe

    cfg = load_config(resolve_recipe(args.recipe), args.overrides)
    print(to_yaml(cfg), end="")
    return 0
