"""Benchmark training steps (images/s, MFU, peak memory), augmentation and the end-to-end data pipeline.

Modes (see docs/performance.md): ``model`` times a DINOv2-style step on synthetic crops already on the
device; ``aug`` times the CPU multi-crop per core and the batched device multi-crop; ``e2e`` feeds the
step from PNG files through the real loader and reports the share of time spent waiting for data;
``clip`` times a CLIP image-report step (tiny towers, or ``--clip-recipe``); ``all`` runs each of those.
``startup`` prints the time to first step of ``medfoundry train`` on the tiny recipe in fresh processes.
Tiny configurations run on CPU in seconds; full ones need ``--device cuda``. ``quality`` is different: it
pretrains on a real benchmark set (``--dataset brain|fashion|ct``) and prints kNN / linear-probe numbers
beside random init, raw pixels and the majority class (see docs/quality.md); it takes minutes per seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["model", "aug", "e2e", "clip", "all", "startup", "quality"],
                        default="all", help="what to measure (default: all speed modes; startup: time to first "
                        "step of `medfoundry train` on the tiny recipe; quality: pretraining quality, minutes)")
    parser.add_argument("--dataset", choices=["brain", "fashion", "ct"], default="brain",
                        help="quality: benchmark set (brain patches split by hemisphere, Fashion-MNIST, CT by patient)")
    parser.add_argument("--recipe", default="",
                        help="quality: recipe to pretrain (default: quality_<dataset>_cpu); startup: recipe started "
                        "(default: tiny_dino_cpu)")
    parser.add_argument("--seeds", default="0,1,2", help="quality: comma-separated training seeds")
    parser.add_argument("--train-steps", type=int, default=0, help="quality: pretraining steps (0: the recipe's)")
    parser.add_argument("--cache", default=".cache/quality", help="quality: where the real data is fetched to")
    parser.add_argument("--output-dir", default="runs/quality", help="quality: where the runs are written")
    parser.add_argument("--resume", action="store_true",
                        help="quality: resume existing run folders (after an interruption) instead of replacing them")
    parser.add_argument("--model", default="vit_tiny_patch8", help="registered backbone (see `medfoundry models`)")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--n-global", type=int, default=2, help="global crops per image")
    parser.add_argument("--global-size", type=int, default=64, help="global crop side in pixels")
    parser.add_argument("--n-local", type=int, default=8, help="local crops per image")
    parser.add_argument("--local-size", type=int, default=32, help="local crop side in pixels")
    parser.add_argument("--in-chans", type=int, default=3, help="image channels")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (startup: fresh processes timed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto = bf16 autocast on GPU, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--drop-path", type=float, default=0.0, help="student stochastic-depth rate")
    parser.add_argument("--head-dim", type=int, default=0,
                        help="DINO prototypes (0: 65536, or 256 for the cpu-friendly vit_tiny_* backbones)")
    parser.add_argument("--no-ibot", action="store_true", help="leave out the iBOT masked-patch term")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s for MFU (default: the GPU's bf16/tf32 dense peak, or a nominal CPU peak)")
    parser.add_argument("--max-batch", action="store_true", help="search the largest batch that fits (CUDA only)")
    parser.add_argument("--image-size", type=int, default=0,
                        help="side of the decoded/PNG source images for aug and e2e (0: 2 x global size)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for e2e")
    parser.add_argument("--images", type=int, default=32, help="PNG files written for e2e")
    parser.add_argument("--crops-on", choices=["cpu", "gpu", "both"], default="both",
                        help="e2e: crops made by the CPU workers, on the device, or both")
    parser.add_argument("--gpu-backend", choices=["grid_sample", "roi_align", "both"], default="grid_sample",
                        help="aug: resampling of the batched device multi-crop")
    parser.add_argument("--clip-recipe", default=None,
                        help="clip: recipe whose towers are timed (e.g. hybrid_dinov3_chexzero); default tiny towers")
    parser.add_argument("--clip-batch", type=int, default=0, help="clip: pairs per step (0: --batch)")
    parser.add_argument("--text-len", type=int, default=64, help="clip: tokens per report")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for the DINO step (repeatable)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    import torch

    from medfoundry.precision import resolve_device
    from medfoundry_cli.bench.results import describe_machine, report_results
    from medfoundry_cli.bench.step import ClipStepSpec, StepSpec

    if args.mode == "quality":
        return _run_quality(args)
    if args.mode == "startup":
        return _run_startup(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    spec = StepSpec(
        model=args.model, batch=args.batch, n_global=args.n_global, global_size=args.global_size,
        n_local=args.n_local, local_size=args.local_size, in_chans=args.in_chans, head_dim=args.head_dim or None,
        ibot=not args.no_ibot, drop_path=args.drop_path, device=str(device), precision=args.precision,
        steps=args.steps, warmup=args.warmup, compile=args.compile, peak_tflops=args.peak_tflops,
        find_max_batch=args.max_batch, extra=list(args.overrides),
    )
    image_size = args.image_size or 2 * args.global_size
    modes = ["model", "aug", "e2e", "clip"] if args.mode == "all" else [args.mode]
    print(f"medfoundry bench on {device}: {describe_machine(device)}", flush=True)
    results = []
    for mode in modes:
        if mode == "model":
            from medfoundry_cli.bench.step import bench_dino_step

            results.append(bench_dino_step(spec))
        elif mode == "aug":
            from medfoundry_cli.bench.data import bench_cpu_multicrop, bench_gpu_multicrop

            results.append(bench_cpu_multicrop(spec, image_size, seconds=1.0 if device.type == "cpu" else 3.0))
            backends = ["grid_sample", "roi_align"] if args.gpu_backend == "both" else [args.gpu_backend]
            results += [bench_gpu_multicrop(spec, image_size, backend) for backend in backends]
        elif mode == "e2e":
            from medfoundry_cli.bench.data import bench_end_to_end

            where = ["cpu", "gpu"] if args.crops_on == "both" else [args.crops_on]
            results += [bench_end_to_end(spec, w, args.workers, args.images, image_size) for w in where]
        elif mode == "clip":
            from medfoundry_cli.bench.step import bench_clip_step

            clip = ClipStepSpec(recipe=args.clip_recipe, batch=args.clip_batch or args.batch, text_len=args.text_len,
                                device=str(device), precision=args.precision, steps=args.steps, warmup=args.warmup,
                                peak_tflops=args.peak_tflops, find_max_batch=args.max_batch)
            results.append(bench_clip_step(clip))
        print(f"done: {mode}", flush=True)
    args_dict = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    report_results(results, device, args.json, args=args_dict)
    return 0


def _run_quality(args: argparse.Namespace) -> int:
    from medfoundry_cli.bench.quality import QualitySpec, report_quality

    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    spec = QualitySpec(dataset=args.dataset, recipe=args.recipe, overrides=list(args.overrides), seeds=seeds,
                       steps=args.train_steps, cache=args.cache, output_dir=args.output_dir, resume=args.resume)
    report_quality(spec, args.json)
    return 0


def _run_startup(args: argparse.Namespace) -> int:
    import json

    from medfoundry_cli.bench.startup import format_startup, time_to_first_step

    result = time_to_first_step(args.recipe or "tiny_dino_cpu", tuple(args.overrides), repeats=args.steps)
    print(format_startup(result), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
