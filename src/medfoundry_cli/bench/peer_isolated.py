"""The peer comparison's timed blocks, each in a fresh process that runs one side only.

In one process the two steps share the C allocator's heap: what one side leaves freed (and what glibc hands back to
the operating system) decides how many of the other side's large temporaries fault in fresh pages, so each side's
kernel time depends on the other. Measured on the 2-core CPU machine (ViT-S/16, 2 x 112 + 4 x 48, batch 8, 65,536
prototypes): dinov2's step faulted 132-161 k pages per step alone and 40-148 k beside medfoundry's. A user runs one
training per process, so for the CPU figure each block here starts ``python -m medfoundry_cli.bench.peer_isolated``,
which builds both steps exactly as :func:`~medfoundry_cli.bench.peer_compare.build_peer_setup` does in the parent
(same seed, same weights, same batch; the process holds the same objects), runs one untimed step (the parent's
FLOP-counted one), ``warmup`` more, then ``steps`` timed steps of its side only, and prints their per-step figures
as one JSON line. The parent alternates the sides' processes (A B, B A, ...) so drifts of the machine fall on both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

from medfoundry_cli.bench.step import StepSpec

RESULT_PREFIX = "PEER_BLOCK "  # the child's result line


def child_command(side: str, spec: StepSpec, peer_root: Path, steps: int, warmup: int, threads: int) -> list[str]:
    """The command line of one timed block of ``side`` in a fresh interpreter."""
    return [sys.executable, "-m", "medfoundry_cli.bench.peer_isolated", "--side", side,
            "--spec", json.dumps(dataclasses.asdict(spec)), "--peer-path", str(peer_root), "--steps", str(steps),
            "--warmup", str(warmup), "--threads", str(threads)]


def run_block(side: str, spec: StepSpec, peer_root: Path, steps: int, warmup: int, threads: int) -> dict[str, float]:
    """Run one isolated block and return its per-step figures (``cpu_s``, ``wall_s``, ``user_s``, ``sys_s``,
    ``minflt``); a failed child raises ``RuntimeError`` with the end of its error output."""
    proc = subprocess.run(child_command(side, spec, peer_root, steps, warmup, threads), capture_output=True,
                          text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"the isolated {side} block failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def time_in_processes(sides: list, spec: StepSpec, peer_root: Path, repeats: int, steps: int, warmup: int) -> None:
    """Fill each :class:`~medfoundry_cli.bench.peer_compare.Side` (named ``medfoundry`` / ``dinov2``) with
    ``repeats`` blocks, each block a fresh process of that side; the order alternates (A B, B A, ...)."""
    threads = torch.get_num_threads()
    for r in range(repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            side.add_block(run_block(side.name, spec, peer_root, steps, warmup, threads))


def main(argv: list[str] | None = None) -> int:
    """The child: build both steps, run ``--side``'s step only, print one ``PEER_BLOCK {json}`` line."""
    parser = argparse.ArgumentParser(description="one isolated timed block of the peer comparison")
    parser.add_argument("--side", choices=["medfoundry", "dinov2"], required=True)
    parser.add_argument("--spec", required=True, help="the StepSpec as JSON")
    parser.add_argument("--peer-path", required=True, help="folder holding dinov2's code")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from medfoundry.errors import UserError
    from medfoundry_cli.bench.peer_compare import build_peer_setup, time_block

    torch.set_num_threads(args.threads)
    spec = StepSpec(**json.loads(args.spec))
    try:
        built = build_peer_setup(spec, args.peer_path, fetch=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fn = built.step_fn(args.side)
    for i in range(1 + args.warmup):  # step 0 is the parent's FLOP-counted step
        fn(i)
    index = iter(range(1 + args.warmup, 1 + args.warmup + args.steps))
    block = time_block(lambda: fn(next(index)), args.steps, built.setup.device)
    print(RESULT_PREFIX + json.dumps(block), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
