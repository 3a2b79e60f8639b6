"""DINOv2-style training-step benchmark: images/s, MFU, peak memory, largest batch, augmentation and end to end.

Presets (the library does the work: :mod:`medfoundry_cli.bench`):

* ``--quick``: tiny ViT (patch 8) at 2x64 + 8x32 on CPU, one torch thread; every mode in well under a minute.
* ``--full``: ViT-S/16, ViT-B/16 and ViT-L/16 at 2x224 + 8x96, bf16 autocast, drop-path 0, on CUDA: model-only
  step (with the largest batch that fits), augmentation (CPU per core and batched on the GPU, from 512 px
  images), and ViT-B end to end from 512 px PNGs with crops on the CPU workers and on the GPU.

Usage: ``python benchmarks/bench_train_step.py --quick`` or ``--full [--models vit_base_patch16] [--json OUT]``.
Targets (one H100 SXM, ViT-B/16, bf16): >= 40 % MFU (about 890 images/s), data wait < 5 % end to end.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

FULL_BATCH = {"vit_small_patch16": 256, "vit_base_patch16": 128, "vit_large_patch16": 64}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="tiny configuration on CPU (default)")
    preset.add_argument("--full", action="store_true", help="ViT-S/B/L /16 at 2x224 + 8x96 on CUDA")
    parser.add_argument("--models", nargs="*", default=None, help="--full: subset of " + ", ".join(FULL_BATCH))
    parser.add_argument("--batch", type=int, default=0, help="override the preset batch")
    parser.add_argument("--steps", type=int, default=0, help="override the timed steps")
    parser.add_argument("--workers", type=int, default=0, help="e2e loader workers (default: cores - 2, at least 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--no-max-batch", action="store_true", help="--full: skip the largest-batch search")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    import torch

    from medfoundry_cli.bench.data import bench_cpu_multicrop, bench_end_to_end, bench_gpu_multicrop
    from medfoundry_cli.bench.flops import cpu_threads
    from medfoundry_cli.bench.results import describe_machine, format_table, report_results
    from medfoundry_cli.bench.step import StepSpec, bench_dino_step

    workers = args.workers or max(1, cpu_threads() - 2)
    results = []
    if args.full:
        if not torch.cuda.is_available():
            print("--full needs a CUDA device; run --quick on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        print(describe_machine(device), flush=True)
        for model in args.models or list(FULL_BATCH):
            spec = StepSpec(model=model, batch=args.batch or FULL_BATCH[model], global_size=224, local_size=96,
                            n_local=8, device="cuda", precision="bf16", steps=args.steps or 20, warmup=5,
                            compile=args.compile, find_max_batch=not args.no_max_batch)
            results.append(bench_dino_step(spec))
            print(format_table(results[-1:]), flush=True)
        base = StepSpec(model="vit_base_patch16", batch=args.batch or FULL_BATCH["vit_base_patch16"], global_size=224,
                        local_size=96, n_local=8, device="cuda", precision="bf16", steps=args.steps or 20, warmup=5,
                        compile=args.compile)
        results.append(bench_cpu_multicrop(base, 512, seconds=5.0))
        results += [bench_gpu_multicrop(base, 512, backend) for backend in ("grid_sample", "roi_align")]
        for where in ("cpu", "gpu"):
            results.append(bench_end_to_end(replace(base, steps=args.steps or 30), where, workers, n_images=512,
                                            image_size=512))
            print(format_table(results[-1:]), flush=True)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        print(describe_machine(device), flush=True)
        spec = StepSpec(batch=args.batch or 8, steps=args.steps or 5, warmup=2, compile=args.compile)
        results.append(bench_dino_step(spec))
        results.append(bench_cpu_multicrop(spec, 128, seconds=1.0))
        results.append(bench_gpu_multicrop(spec, 128))
        for where in ("cpu", "gpu"):
            results.append(bench_end_to_end(spec, where, workers=1, n_images=32, image_size=128))
    report_results(results, device, args.json, preset="full" if args.full else "quick")
    return 0


if __name__ == "__main__":
    sys.exit(main())
