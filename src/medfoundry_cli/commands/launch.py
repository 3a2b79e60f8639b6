"""Launch training on a cluster: medfoundry launch --slurm nodes=N gpus_per_node=G time=H:M:S RECIPE [overrides].

With ``--slurm`` the job is submitted through submitit (one task per GPU, ``srun python -m medfoundry_cli train``)
and the sbatch script is written to ``RUN_DIR/launch/submit.sbatch``; ``--dry-run`` only writes and prints it.
Without ``--slurm`` the run is started on this node with torchrun (``nodes``, ``gpus_per_node``, ``node_rank``,
``rdzv_endpoint`` settings); ``--dry-run`` prints the torchrun command. See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medfoundry_cli.slurm import SLURM_SETTINGS, TORCHRUN_SETTINGS

    parser.add_argument(
        "tokens", nargs="+", metavar="[SETTING=VALUE ...] RECIPE [OVERRIDE ...]",
        help="launcher settings, then the recipe (path or bundled name), then key.sub=value overrides. "
        "SLURM settings: " + "; ".join(f"{k}: {v}" for k, v in SLURM_SETTINGS.items())
        + ". torchrun settings: " + "; ".join(f"{k}: {v}" for k, v in TORCHRUN_SETTINGS.items()),
    )
    parser.add_argument("--slurm", action="store_true", help="submit to SLURM through submitit")
    parser.add_argument("--dry-run", action="store_true",
                        help="write and print the sbatch script (or the torchrun command) without launching")
    parser.add_argument("--slurm-opt", action="append", default=[], metavar="NAME[=VALUE]",
                        help="extra sbatch option, repeatable (e.g. --slurm-opt exclusive --slurm-opt gres=gpu:a100:4)")
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="shell line run in the job before srun, repeatable (e.g. 'source .venv/bin/activate')")
    parser.add_argument("--python", default=None,
                        help="python command in the job (default: this interpreter, which must exist on the nodes)")


def run(args: argparse.Namespace) -> int:
    from medfoundry.recipes import resolve_recipe
    from medfoundry_cli.slurm import LaunchError

    try:
        from medfoundry_cli.slurm import split_launch_tokens

        settings, recipe, overrides = split_launch_tokens(args.tokens)
        recipe_path = resolve_recipe(recipe)
        if args.slurm:
            return _run_slurm(args, settings, recipe_path, overrides)
        return _run_torchrun(args, settings, recipe_path, overrides)
    except LaunchError as err:
        print(f"medfoundry launch: {err}", file=sys.stderr)
        return 2


def _run_slurm(args: argparse.Namespace, settings: list[str], recipe: Path, overrides: list[str]) -> int:
    from medfoundry_cli.slurm import SLURM_SETTINGS, SlurmSpec, launch_slurm, parse_settings

    spec = SlurmSpec.from_settings(parse_settings(settings, SLURM_SETTINGS), args.slurm_opt, args.setup, args.python)
    result = launch_slurm(recipe, overrides, spec, dry_run=args.dry_run)
    if args.dry_run:
        print(result.script)
        print(f"sbatch script (not submitted): {result.script_path}")
    else:
        print(f"submitted SLURM job {result.job_id}: {spec.nodes} node(s) x {spec.ntasks_per_node} task(s)")
        print(f"sbatch script: {result.script_path}")
        print(f"run folder: {result.run_dir}")
    return 0


def _run_torchrun(args: argparse.Namespace, settings: list[str], recipe: Path, overrides: list[str]) -> int:
    import subprocess

    from medfoundry.config import load_config
    from medfoundry_cli.slurm import TORCHRUN_SETTINGS, LaunchError, parse_settings, torchrun_command

    if args.slurm_opt or args.setup:
        raise LaunchError("--slurm-opt and --setup apply to --slurm launches only")
    load_config(recipe, overrides)  # a config error exits with code 2 before any process starts
    opts = parse_settings(settings, TORCHRUN_SETTINGS)
    cmd = torchrun_command(recipe, overrides, python=args.python, **opts)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd)
