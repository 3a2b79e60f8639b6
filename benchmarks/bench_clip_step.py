"""CLIP image-report training-step benchmark: pairs/s, MFU, peak memory and the largest batch that fits.

Presets (the library does the work: :func:`medfoundry_cli.bench.step.bench_clip_step`):

* ``--quick``: tiny towers (patch-8 ViT at 64 px, 2-layer 32-wide text transformer) on CPU, one torch thread.
* ``--full``: the hybrid recipe (``recipes/hybrid_dinov3_chexzero.yaml``: DINOv3 ViT-B/16 at 224 px + the
  CheXzero 12-layer 512-wide text transformer with a 512-token context, SGD) at batch 64, bf16, on CUDA;
  pretrained weights are not loaded (random weights time the same).

Usage: ``python benchmarks/bench_clip_step.py --quick`` or ``--full [--batch 64] [--text-len 128] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="tiny towers on CPU (default)")
    preset.add_argument("--full", action="store_true", help="the hybrid DINOv3 + CheXzero recipe on CUDA")
    parser.add_argument("--batch", type=int, default=0, help="pairs per step (default 64 full, 8 quick)")
    parser.add_argument("--text-len", type=int, default=0, help="tokens per report (default 128 full, 64 quick)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps")
    parser.add_argument("--no-max-batch", action="store_true", help="--full: skip the largest-batch search")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    import torch

    from medfoundry_cli.bench.results import describe_machine, report_results
    from medfoundry_cli.bench.step import ClipStepSpec, bench_clip_step

    if args.full:
        if not torch.cuda.is_available():
            print("--full needs a CUDA device; run --quick on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        spec = ClipStepSpec(recipe="hybrid_dinov3_chexzero", batch=args.batch or 64, text_len=args.text_len or 128,
                            device="cuda", precision="bf16", steps=args.steps or 20, warmup=5,
                            find_max_batch=not args.no_max_batch)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        spec = ClipStepSpec(batch=args.batch or 8, text_len=args.text_len or 64, steps=args.steps or 5, warmup=2)
    print(describe_machine(device), flush=True)
    results = [bench_clip_step(spec)]
    report_results(results, device, args.json, preset="full" if args.full else "quick")
    return 0


if __name__ == "__main__":
    sys.exit(main())
