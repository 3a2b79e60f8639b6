"""The GPU protocol (issue 16): ViT-S/B/L /16 DINOv2-style steps, the dinov2-module peer, DDP vs FSDP2, data wait
and the hybrid CLIP step, in one time-boxed run on one GPU; the library does the work
(:mod:`medfoundry_cli.bench.gpu_protocol`).

On a GPU machine (about 8 minutes on one H200; carry ``.cache/peers/dinov2`` for the peer part):

    python benchmarks/gpu_protocol.py --out runs/gpu_protocol

Without a GPU (or with ``--tiny``) it is the CPU dry run: every part end to end at a tiny size, in well under a
minute, titled "CPU dry run". It writes ``gpu_protocol.json`` (after every part) and ``gpu_protocol.md`` under
``--out`` and prints each row as its part ends.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the protocol, print the table; exit code 0 when no part failed, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_protocol", help="output folder (JSON + Markdown)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="the CPU dry run (automatic without CUDA)")
    mode.add_argument("--full", action="store_true", help="the full sizes even without CUDA (not useful on CPU)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--models", nargs="*", default=None, help="backbones (default ViT-S/B/L /16; tiny: vit_tiny)")
    parser.add_argument("--parts", nargs="*", default=None,
                        help="subset of step compile peer ddp fsdp2 e2e clip (default: all)")
    parser.add_argument("--batch", type=int, default=0, help="batch of every DINO part (default per model)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per part at most")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed steps before timing")
    parser.add_argument("--seconds-per-part", type=float, default=8.0, help="time box of each part's timed steps")
    parser.add_argument("--max-batch-seconds", type=float, default=30.0, help="time box of each largest-batch search")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole run; later parts are skipped")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU reference instead of the chip's table")
    parser.add_argument("--peer-path", default=None, help="folder holding dinov2's code (default .cache/peers/dinov2)")
    parser.add_argument("--no-fetch", action="store_true", help="never clone the peer code")
    parser.add_argument("--workers", type=int, default=0, help="e2e loader workers (default cores - 2)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="also run torch.compile on CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (CPU; default: torch's)")
    args = parser.parse_args(argv)

    import torch

    from medfoundry_cli.bench.gpu_protocol import PART_ORDER, ProtocolConfig, run_protocol

    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts or list(PART_ORDER)
    unknown = sorted(set(parts) - set(PART_ORDER))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PART_ORDER}")
    command = "python benchmarks/gpu_protocol.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                        else sys.argv[1:]))
    cfg = ProtocolConfig(out=Path(args.out), tiny=True if args.tiny else (False if args.full else None),
                         device=args.device, models=args.models, batch=args.batch, steps=args.steps,
                         warmup=args.warmup, seconds_per_part=args.seconds_per_part,
                         max_batch_seconds=args.max_batch_seconds, budget_s=args.budget_s,
                         peak_tflops=args.peak_tflops, peer_path=args.peer_path, fetch_peer=not args.no_fetch,
                         workers=args.workers, parts=parts, compile_on_cpu=args.compile_on_cpu,
                         command=command.strip())
    protocol = run_protocol(cfg)
    return 1 if any(p.status == "failed" for p in protocol.parts) else 0


if __name__ == "__main__":
    sys.exit(main())
