"""Train (or resume) a run from a recipe: medfoundry train RECIPE [key.sub=value ...]."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (path or bundled name, see `medfoundry recipes`)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=60")


def run(args: argparse.Namespace) -> int:
    from medfoundry.config import load_config
    from medfoundry.eval.monitors import RepresentationHealthError
    from medfoundry.recipes import resolve_recipe
    from medfoundry.train.loop import BadDataError, NonFiniteLossError, train

    cfg = load_config(resolve_recipe(args.recipe), args.overrides)
    try:
        run_dir = train(cfg)
    except (NonFiniteLossError, BadDataError, RepresentationHealthError) as err:
        import sys

        print(f"medfoundry train: {err}", file=sys.stderr)
        return 3
    finally:
        from medfoundry.distributed.setup import cleanup_distributed

        cleanup_distributed()
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {run_dir}")
    return 0
