"""Run a grid of overrides and tabulate it: medfoundry sweep RECIPE key=a,b other=x,y [fixed=z ...].

Each combination (arm) trains into SWEEP_DIR/arm_XX_key-value...; locally the arms run one after another in this
process, with ``--submitit`` as a SLURM job array (put SLURM settings such as ``nodes=1 gpus_per_node=4
time=2:00:00`` before the recipe). Then SWEEP_DIR/results.csv and results.md list each arm's overrides, final
and best loss and evaluation metrics, wall-clock hours of the training loop (one-time setup such as imports is
kept apart, as setup_s in each arm's sweep_arm.json), GPU-hours and cost. Exit code 1 if an arm failed or was
interrupted by a signal (run the same command again to resume it).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medfoundry_cli.sweep import SweepPlan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "tokens", nargs="*", metavar="[SLURM_SETTING=VALUE ...] RECIPE [OVERRIDE ...]",
        help="with --submitit, SLURM settings per arm (nodes, gpus_per_node, time, partition, account, "
        "cpus_per_task, mem, ...); then the recipe; then overrides, a comma list (key=a,b) making a grid axis. "
        "Commas inside [...] do not split: crops.global_scale=[0.3,1.0],[0.5,1.0] is two values",
    )
    parser.add_argument("--sweep-dir", default=None,
                        help="folder of the sweep (default: output_dir=... if given, else <recipe output_dir>_sweep)")
    parser.add_argument("--price-per-gpu-hour", type=float, default=2.0,
                        help="price of one GPU-hour for the cost column (default 2.0)")
    parser.add_argument("--currency", default="USD", help="currency of the price (default USD)")
    parser.add_argument("--submitit", action="store_true", help="submit the arms as a SLURM job array via submitit")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan only: list the arms (and with --submitit write SWEEP_DIR/launch/array.sbatch)")
    parser.add_argument("--no-wait", action="store_true",
                        help="with --submitit, return after submitting; write the table later with --collect")
    parser.add_argument("--collect", action="store_true",
                        help="only (re)write the results table of an existing sweep (needs --sweep-dir)")
    parser.add_argument("--rerun", action="store_true", help="run arms again even if they already finished")
    parser.add_argument("--slurm-opt", action="append", default=[], metavar="NAME[=VALUE]",
                        help="extra sbatch option for --submitit, repeatable")
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="shell line run in each job before srun (--submitit), repeatable")
    parser.add_argument("--python", default=None, help="python command in the jobs (default: this interpreter)")


def run(args: argparse.Namespace) -> int:
    from medfoundry_cli.slurm import LaunchError

    try:
        return _run(args)
    except LaunchError as err:
        print(f"medfoundry sweep: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from medfoundry.recipes import resolve_recipe
    from medfoundry_cli.slurm import (
        SLURM_SETTINGS,
        LaunchError,
        SlurmSpec,
        parse_settings,
        split_launch_tokens,
    )
    from medfoundry_cli.sweep import SweepPlan, plan_sweep, run_local, submit_array

    if args.collect:
        if not args.sweep_dir:
            raise LaunchError("--collect needs --sweep-dir SWEEP_DIR")
        plan = SweepPlan.load(args.sweep_dir)
        return _write(plan, args)
    if not args.tokens:
        raise LaunchError("no recipe given: medfoundry sweep RECIPE key=a,b ...")
    settings, recipe, overrides = split_launch_tokens(args.tokens)
    if settings and not args.submitit:
        raise LaunchError(f"{settings} come before the recipe: only SLURM settings go there, and only with --submitit")
    plan = plan_sweep(resolve_recipe(recipe), overrides, args.sweep_dir)
    plan.save()
    print(f"sweep of {len(plan.arms)} arm(s) in {plan.sweep_dir}")
    for arm in plan.arms:
        print(f"  {arm.name}: {arm.label or '(no grid values)'}")

    if args.submitit:
        spec = SlurmSpec.from_settings(parse_settings(settings, SLURM_SETTINGS), args.slurm_opt, args.setup,
                                       args.python)
        submit_array(plan, spec, dry_run=args.dry_run, wait=not args.no_wait)
        if args.dry_run:
            print(f"job array script (not submitted): {plan.sweep_dir / 'launch' / 'array.sbatch'}")
            return 0
        if args.no_wait:
            print(f"submitted; when the jobs end: medfoundry sweep --collect --sweep-dir {plan.sweep_dir}")
            return 0
    else:
        if args.dry_run:
            return 0
        records = run_local(plan, rerun=args.rerun)
        if any(r.get("status") == "interrupted" for r in records):
            from medfoundry.train.preemption import PREEMPTED_EXIT_CODE

            _write(plan, args)
            return PREEMPTED_EXIT_CODE  # pre-empted: the same command resumes the interrupted arm
    return _write(plan, args)


def _write(plan: SweepPlan, args: argparse.Namespace) -> int:
    from medfoundry_cli.sweep_results import collect, write_table

    rows, columns = collect(plan, args.price_per_gpu_hour)
    csv_path, md_path = write_table(plan, rows, columns, args.price_per_gpu_hour, args.currency)
    print(md_path.read_text())
    print(f"results: {csv_path} and {md_path}")
    failed = [r["arm"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"medfoundry sweep: {len(failed)} arm(s) not ok: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
