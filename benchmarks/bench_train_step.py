"""DINOv2-style training-step benchmark: images/s, MFU, peak memory, largest batch, augmentation and end to end.

Presets (the library does the work: :mod:`medfoundry_cli.bench`):

* ``--quick``: tiny ViT (patch 8) at 2x64 + 8x32 on CPU, one torch thread; every mode in well under a minute.
* ``--full``: ViT-S/16, ViT-B/16 and ViT-L/16 at 2x224 + 8x96, bf16 autocast, drop-path 0, on CUDA: model-only
  step (with the largest batch that fits), augmentation (CPU per core and batched on the GPU, from 512 px
  images), and ViT-B end to end from 512 px PNGs with crops on the CPU workers and on the GPU.
* ``--peer dinov2``: medfoundry's step and the same step built from facebookresearch/dinov2's own modules, side
  by side in one process (alternating A/B blocks): CPU time and wall time per step, their ratio, and the FLOPs
  of both (FlopCounterMode). Default configuration (issue 16): ViT-S/16, 2x112 + 4x48 crops, batch 8, 65,536
  prototypes, DINO + iBOT + KoLeo, CPU, one torch thread. The dinov2 code is looked up in ``.cache/peers/dinov2``
  (``--peer-path`` / ``MEDFOUNDRY_PEER_DINOV2``) and cloned there only when absent.

Usage: ``python benchmarks/bench_train_step.py --quick``, ``--full [--models vit_base_patch16] [--json OUT]`` or
``--peer dinov2 [--model vit_small_patch16] [--threads 1] [--repeats 4] [--isolate] [--json OUT]``.
Targets (one H100 SXM, ViT-B/16, bf16): >= 40 % MFU (about 890 images/s), data wait < 5 % end to end;
``--peer dinov2`` on CPU: CPU time medfoundry / dinov2 <= 1.00 with the FLOPs equal.
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
    peer = parser.add_argument_group("--peer: side by side with a step built from another code base's modules")
    peer.add_argument("--peer", choices=["dinov2"], default=None, help="compare with facebookresearch/dinov2's modules")
    peer.add_argument("--peer-path", default=None, help="folder holding dinov2's code (default .cache/peers/dinov2, "
                      "or $MEDFOUNDRY_PEER_DINOV2); cloned there when absent")
    peer.add_argument("--no-fetch", action="store_true", help="never clone: fail if the peer code is not there")
    peer.add_argument("--model", default="vit_small_patch16", help="--peer: registered backbone (a plain ViT)")
    peer.add_argument("--global-size", type=int, default=112, help="--peer: global crop side")
    peer.add_argument("--local-size", type=int, default=48, help="--peer: local crop side")
    peer.add_argument("--n-local", type=int, default=4, help="--peer: local crops per image")
    peer.add_argument("--prototypes", type=int, default=65536, help="--peer: DINO/iBOT head prototypes")
    peer.add_argument("--threads", type=int, default=1, help="--peer: torch threads (CPU)")
    peer.add_argument("--device", default="cpu", help="--peer: cpu | cuda")
    peer.add_argument("--repeats", type=int, default=4, help="--peer: alternating A/B timed blocks")
    peer.add_argument("--warmup", type=int, default=1, help="--peer: untimed steps per side before timing")
    peer.add_argument("--isolate", action="store_true", help="--peer: run each timed block in a fresh process holding "
                      "one side only (no allocator heap shared between the sides; the CPU figure)")
    args = parser.parse_args(argv)
    if args.peer:
        return _peer(args)

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


def _peer(args: argparse.Namespace) -> int:
    """``--peer dinov2``: the side-by-side comparison, :func:`medfoundry_cli.bench.peer_compare.compare_with_dinov2`."""
    import json
    from pathlib import Path

    import torch

    from medfoundry.errors import UserError
    from medfoundry_cli.bench.peer_compare import compare_with_dinov2
    from medfoundry_cli.bench.results import describe_machine
    from medfoundry_cli.bench.step import StepSpec

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(describe_machine(device), flush=True)
    spec = StepSpec(model=args.model, batch=args.batch or 8, global_size=args.global_size, local_size=args.local_size,
                    n_local=args.n_local, head_dim=args.prototypes, device=args.device)
    try:
        result = compare_with_dinov2(spec, args.peer_path, fetch=not args.no_fetch, repeats=args.repeats,
                                     steps=args.steps or 1, warmup=args.warmup, isolate=args.isolate)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.format())
    if args.json:
        from medfoundry_cli.bench.results import _json_safe

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": describe_machine(device), "preset": "peer", **result.as_dict()}
        Path(args.json).write_text(json.dumps(_json_safe(payload), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
