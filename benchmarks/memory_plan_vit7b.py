"""ViT-7B/16 memory plan: per-GPU bytes of DINO + iBOT pretraining under FSDP2, with and without activation
checkpointing, bf16 and fp8 linears, and the largest per-GPU batch that fits (analytic; nothing is allocated).

The formulas and their sources are in :mod:`medfoundry_cli.bench.memory_plan`; the parameter counts are the
method's own, built on the meta device. Defaults: DINOv3's ViT-7B/16 pretraining recipe (2 x 256 px + 8 x 112 px
crops) on 8 x H100 80 GB.

Usage: ``python benchmarks/memory_plan_vit7b.py [--gpus 8] [--global-size 256] [--local-size 112]
[--master fp32|bf16] [--batch 16 32] [--override KEY=VALUE ...]``.
"""

from __future__ import annotations

import argparse
import sys

from medfoundry_cli.bench.memory_plan import DINOV3_7B_BATCH_PER_GPU, format_plan, inputs_from_config, plan


def main(argv: list[str] | None = None) -> int:
    """Parse the options, compute the plan and print it; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs FSDP2 shards over (default 8)")
    parser.add_argument("--global-size", type=int, default=256, help="global crop side in pixels (DINOv3: 256)")
    parser.add_argument("--local-size", type=int, default=112, help="local crop side in pixels (DINOv3: 112)")
    parser.add_argument("--master", choices=("fp32", "bf16"), default="fp32",
                        help="master weight dtype (medfoundry keeps fp32)")
    parser.add_argument("--batch", type=int, nargs="*", default=[DINOV3_7B_BATCH_PER_GPU],
                        help="per-GPU batches to print the peak for (DINOv3: 16)")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides, e.g. model.name=...")
    args = parser.parse_args(argv)
    overrides = [f"crops.global_size={args.global_size}", f"crops.local_size={args.local_size}",
                 f"model.img_size={args.global_size}", *args.override]
    result = plan(inputs_from_config(overrides), n_gpus=args.gpus, master_bytes=4 if args.master == "fp32" else 2,
                  batches=tuple(args.batch))
    print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
