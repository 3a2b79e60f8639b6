"""Data-side benchmarks: augmentation-only throughput and the end-to-end step fed from disk.

* **Augmentation only**: the CPU multi-crop (:class:`~medfoundry.data.multicrop.MultiCropTransform`,
  one image at a time on one thread, so the figure is *per core*) and the batched device multi-crop
  (:class:`~medfoundry.data.gpu_multicrop.GPUMultiCrop` on a batch of canvases already on the device).
  Both start from decoded [0, 1] images of ``image_size`` pixels.
* **End to end**: a folder of 16-bit grey PNGs written to a temporary directory, read by the real
  training loader (``build_dino_loader`` with the CPU crops, or ``build_gpu_dino_loader`` with the
  crops on the device) and fed to the training step of :mod:`medfoundry_cli.bench.step`. Each step's wall
  time splits into *waiting* for ``next(loader)`` (plus the host-to-device copy), the device crops
  (GPU path) and the step itself (synchronised); the data-wait fraction is waiting / total.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from medfoundry.config.schema import CropsConfig
from medfoundry.precision import resolve_device, resolve_precision
from medfoundry_cli.bench.results import BenchResult, peak_memory, reset_peak_memory, synchronize
from medfoundry_cli.bench.step import StepSpec, TrainStep, dino_run_config


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _crops(spec: StepSpec) -> CropsConfig:
    cfg = dino_run_config(spec)
    return cfg.crops


def bench_cpu_multicrop(spec: StepSpec, image_size: int, seconds: float = 2.0, min_images: int = 3) -> BenchResult:
    """Images/s of the CPU multi-crop on one thread (per core) for ``image_size`` square inputs."""
    from medfoundry.data.multicrop import MultiCropTransform

    crops = _crops(spec)
    views = MultiCropTransform(crops, spec.in_chans)
    g = torch.Generator().manual_seed(spec.seed)
    images = [torch.rand(spec.in_chans, image_size, image_size, generator=g) for _ in range(4)]
    with _threads(1):
        views(images[0])
        done, t0 = 0, time.perf_counter()
        while done < min_images or time.perf_counter() - t0 < seconds:
            views(images[done % len(images)])
            done += 1
        elapsed = time.perf_counter() - t0
    result = BenchResult("aug", f"cpu multicrop {image_size}px -> {_views(crops)}", "cpu (1 thread)", 1,
                         done / elapsed, elapsed / done)
    result.notes.append(f"per core; {crops.interpolation} + antialias, as the training workers run it")
    return result


def bench_gpu_multicrop(spec: StepSpec, image_size: int, backend: str = "grid_sample") -> BenchResult:
    """Images/s of the batched device multi-crop on ``spec.batch`` canvases already on ``spec.device``."""
    from medfoundry.data.gpu_multicrop import GPUMultiCrop

    crops = _crops(spec)
    device = resolve_device(spec.device)
    gpu = GPUMultiCrop(crops, spec.in_chans, backend=backend, seed=spec.seed)
    g = torch.Generator().manual_seed(spec.seed)
    images = torch.rand(spec.batch, spec.in_chans, image_size, image_size, generator=g).to(device)
    times = _time(lambda i: gpu(images, step=i), device, spec.steps, spec.warmup)
    step_s = sum(times) / len(times)
    n = torch.get_num_threads()
    threads = f" ({n} thread{'s' if n > 1 else ''})" if device.type == "cpu" else ""
    result = BenchResult("aug", f"batched multicrop [{backend}] {image_size}px -> {_views(crops)}",
                         f"{device}{threads}", spec.batch, spec.batch / step_s, step_s)
    mode = "bilinear" if backend == "roi_align" else gpu.mode
    result.notes.append(f"{mode}, per-step device generator; boxes, resampling, flips, normalisation included")
    return result


def _views(crops: CropsConfig) -> str:
    local = f"+{crops.n_local}x{crops.local_size}" if crops.n_local else ""
    return f"{crops.n_global}x{crops.global_size}{local}"


def _time(fn, device: torch.device, steps: int, warmup: int) -> list[float]:
    for i in range(warmup):
        fn(i)
    synchronize(device)
    out = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        fn(i)
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def write_png_folder(root: Path, n_images: int, size: int, seed: int = 0) -> Path:
    """``n_images`` 16-bit grey PNGs of ``size`` x ``size`` (smooth structure + noise) under ``root``, each recording
    its value mapping (a [0, 1] picture over 0..65535), as 16-bit pictures must to be read."""
    from medfoundry.data.readers.slices import FULL_RANGE_UINT16, write_stored

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n_images):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        img = 0.3 * xx + 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2) + 0.05 * rng.standard_normal((size, size))
        write_stored(root / f"img_{i:05d}.png", (np.clip(img, 0, 1) * 65535).astype(np.uint16), FULL_RANGE_UINT16)
    return root


def bench_end_to_end(spec: StepSpec, crops_on: Literal["cpu", "gpu"] = "cpu", workers: int = 1,
                     n_images: int = 64, image_size: int = 96, storage_size: int | None = None) -> BenchResult:
    """Training steps fed by the real loader from PNG files on disk; reports the data-wait fraction.

    Args:
        spec: the step (model, crops, batch, device, timed/warm-up steps).
        crops_on: ``cpu``: crops made by the DataLoader workers (``build_dino_loader``); ``gpu``: the
            workers decode and place images on a canvas, the device crops (``build_gpu_dino_loader``).
        workers: DataLoader worker processes.
        n_images: PNG files written (read in a seeded order, repeating as needed).
        image_size: side of the PNG files.
        storage_size: canvas side for ``crops_on=gpu`` (default ``image_size``).
    """
    from medfoundry.methods.dino.loader import build_dino_loader
    from medfoundry.methods.dino.method import DINOMethod

    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    with tempfile.TemporaryDirectory(prefix="medfoundry_bench_") as tmp:
        root = write_png_folder(Path(tmp) / "images", n_images, image_size, spec.seed)
        cfg = dino_run_config(spec)
        cfg.data = replace(cfg.data, kind="image_folder", root=str(root), channels=spec.in_chans, num_workers=workers)
        torch.manual_seed(spec.seed)
        method = DINOMethod(cfg.model, cfg.dino, cfg.train.steps).to(device)
        step = TrainStep(method, cfg, device, precision)
        if spec.compile:
            step.compile_blocks()
        patch = method.student["backbone"].patch_size
        transform = None
        if crops_on == "gpu":
            from medfoundry.methods.dino.loader import build_gpu_dino_loader

            gpu_loader = build_gpu_dino_loader(cfg, patch, 0, 0, 1, storage_size or image_size, device=device)
            loader, transform = gpu_loader.loader, gpu_loader.transform
        else:
            loader = build_dino_loader(cfg, patch, 0, 0, 1)
        waits, augs, computes = [], [], []
        it = iter(loader)
        for i in range(spec.warmup + spec.steps):
            t0 = time.perf_counter()
            batch = next(it)
            if transform is None:
                batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            synchronize(device)
            t1 = time.perf_counter()
            if transform is not None:
                batch = transform(batch)
                synchronize(device)
            batch.pop("bad", None)
            t2 = time.perf_counter()
            if i == spec.warmup:
                reset_peak_memory(device)
            step(batch, i)
            synchronize(device)
            t3 = time.perf_counter()
            if i >= spec.warmup:
                waits.append(t1 - t0)
                augs.append(t2 - t1)
                computes.append(t3 - t2)
        del it, loader
    total = sum(waits) + sum(augs) + sum(computes)
    mem, mem_source = peak_memory(device)
    name = f"{spec.label()} from {image_size}px PNGs, crops on {crops_on}"
    result = BenchResult("e2e", name, str(device), spec.batch, spec.batch * spec.steps / total, total / spec.steps,
                         peak_mem_bytes=mem, peak_mem_source=mem_source, data_wait_frac=sum(waits) / total)
    parts = (f"per step: wait {1e3 * sum(waits) / spec.steps:.1f} ms, device crops {1e3 * sum(augs) / spec.steps:.1f}"
             f" ms, step {1e3 * sum(computes) / spec.steps:.1f} ms")
    result.notes.append(f"{workers} loader workers, {n_images} files; {parts}")
    return result
