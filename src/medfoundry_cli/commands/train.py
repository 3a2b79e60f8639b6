"""Train (or resume) a run from a recipe: medfoundry train RECIPE [key.sub=value ...].

Exit codes: 0 finished, 2 user error (config, files), 3 the run stopped itself as unhealthy (non-finite
losses, too many unreadable files, collapse), 75 stopped by a pre-emption signal after checkpointing on every
rank (run the same command again to resume; ``medfoundry launch --slurm`` requeues on it).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (path or bundled name, see `medfoundry recipes`)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=60")


def run(args: argparse.Namespace) -> int:
    from medfoundry.config import load_config
    from medfoundry.eval.monitors import RepresentationHealthError
    from medfoundry.methods.input_paths import check_paths
    from medfoundry.recipes import resolve_recipe
    from medfoundry.train.loop import BadDataError, NonFiniteLossError, train
    from medfoundry.train.preemption import PREEMPTED_EXIT_CODE

    cfg = load_config(resolve_recipe(args.recipe), args.overrides)
    args.error_log_dir = cfg.output_dir  # where the CLI logs the traceback of a user error, if the folder exists
    check_paths(cfg)  # missing data, weights or teacher: exit 2 before the run folder is written
    stopped: list[int] = []
    try:
        run_dir = train(cfg, on_signal_stop=stopped.append)
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
        if stopped:
            print(f"stopped by a signal (pre-emption or Ctrl-C) after step {stopped[-1]}; checkpoint written; "
                  f"exit code {PREEMPTED_EXIT_CODE}: run the same command again to resume")
    return PREEMPTED_EXIT_CODE if stopped else 0
