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
* **Side by side with dinov2** (:func:`compare_augmentation_with_dinov2`): the CPU multi-crop and dinov2's own
  ``DataAugmentationDINO`` on the same real CT frames, per core, with DINOv2's colour/blur augmentations and
  geometric only (``benchmarks/bench_data_pipeline.py --peer dinov2``).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
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


# --- the CPU multi-crop side by side with dinov2's DataAugmentationDINO on real CT frames -------------------------

#: Real CT files by explicit name (a wildcard lookup in pydicom's test data would try to download): pydicom's own
#: ``CT_small.dcm`` (128 x 128) and pydicom-data's ``693_UNCI.dcm`` (512 x 512) and ``eCT_Supplemental.dcm``
#: (two 512 x 512 frames).
CT_FRAME_FILES = ("CT_small.dcm", "693_UNCI.dcm", "eCT_Supplemental.dcm")
#: DINOv2's photometric settings (``dinov2/data/augmentations.py``) as medfoundry's ``crops`` keys.
DINOV2_PHOTOMETRIC = dict(color_jitter_prob=0.8, color_jitter=[0.4, 0.4, 0.2, 0.1], grayscale_prob=0.2,
                          global1_blur_prob=1.0, global2_blur_prob=0.1, local_blur_prob=0.5, solarize_prob=0.2)


def real_ct_frames(window: str = "lung") -> list[tuple[str, torch.Tensor]]:
    """``[(name, (1, H, W) float32 in [0, 1])]``: every frame of :data:`CT_FRAME_FILES` read by medfoundry's DICOM
    reader (Hounsfield units) and mapped through the HU ``window``. Without pydicom-data only ``CT_small.dcm``."""
    import importlib.util

    from pydicom.data import get_testdata_file

    from medfoundry.data.readers import read_volume
    from medfoundry.data.transforms.hu import apply_window, parse_window

    names = CT_FRAME_FILES if importlib.util.find_spec("data_store") is not None else CT_FRAME_FILES[:1]
    center, width = parse_window(window)
    frames = []
    for name in names:
        vol = read_volume(get_testdata_file(name))
        for z in range(vol.array.shape[0]):
            hu = torch.from_numpy(np.ascontiguousarray(vol.array[z])).float()[None]
            frames.append((f"{name}[{z}]", apply_window(hu, center, width)))
    return frames


@dataclass
class AugSide:
    """One side of the augmentation comparison: images per CPU second and per wall second, one value per block."""

    name: str
    cpu_rates: list[float] = field(default_factory=list)
    wall_rates: list[float] = field(default_factory=list)

    @property
    def cpu_rate(self) -> float:
        """Median images per CPU second over the blocks (one thread: images/s per core)."""
        return statistics.median(self.cpu_rates)


@dataclass
class AugComparison:
    """medfoundry's CPU multi-crop and dinov2's ``DataAugmentationDINO`` timed in alternating blocks."""

    sides: dict[str, AugSide]
    frames: list[str]
    views: str
    peer: str
    block_images: int
    repeats: int

    def ratios(self, side: str, peer: str) -> list[float]:
        """Per block: images/s (CPU time) of ``side`` / images/s of ``peer``, from the same repeat."""
        a, b = self.sides[side].cpu_rates, self.sides[peer].cpu_rates
        return [x / y for x, y in zip(a, b)]

    def ratio(self, side: str, peer: str) -> tuple[float, float, float]:
        """(median, min, max) of :meth:`ratios`."""
        r = self.ratios(side, peer)
        return statistics.median(r), min(r), max(r)

    def _medfoundry_sides(self) -> list[tuple[str, str]]:
        """(side prefix, label) of the medfoundry variants that ran."""
        known = (("medfoundry", "medfoundry"), ("medfoundry_3ch_path", "three-channel path"),
                 ("medfoundry_uint8", "medfoundry + uint8_resize"))
        return [(k, label) for k, label in known if f"{k}_geometric" in self.sides]

    def as_dict(self) -> dict:
        """The comparison as plain data (for ``--json``)."""
        out = {"frames": self.frames, "views": self.views, "peer": self.peer, "block_images": self.block_images,
               "repeats": self.repeats, "sides": {k: asdict(v) for k, v in self.sides.items()}, "ratios": {}}
        for kind in ("photometric", "geometric"):
            for mf, _ in self._medfoundry_sides():
                key = f"{mf}_{kind}"
                med, lo, hi = self.ratio(key, f"dinov2_{kind}")
                out["ratios"][f"{key}/dinov2_{kind}"] = {"median": med, "min": lo, "max": hi,
                                                          "blocks": self.ratios(key, f"dinov2_{kind}")}
        return out

    def format(self) -> str:
        """The table and the two ratios the issue asks for, one line each."""
        lines = [f"CPU multi-crop per core (1 torch thread) on {len(self.frames)} real CT frames "
                 f"({', '.join(self.frames)}), {self.views}; {self.repeats} alternating blocks of "
                 f"{self.block_images} images per side; peer {self.peer}",
                 f"{'side':34s} {'images/s (CPU time)':>20s} {'block range':>16s} {'images/s (wall)':>16s}"]
        for s in self.sides.values():
            lines.append(f"{s.name:34s} {s.cpu_rate:20.1f} {min(s.cpu_rates):7.1f}-{max(s.cpu_rates):<8.1f} "
                         f"{statistics.median(s.wall_rates):16.1f}")
        labels = {"photometric": "with DINOv2's colour/blur augmentations", "geometric": "geometric only"}
        for kind, label in labels.items():
            for mf, what in self._medfoundry_sides():
                med, lo, hi = self.ratio(f"{mf}_{kind}", f"dinov2_{kind}")
                lines.append(f"ratio {what} / DataAugmentationDINO, {label}: {med:.2f} (blocks {lo:.2f}-{hi:.2f})")
        return "\n".join(lines)


def compare_augmentation_with_dinov2(frames: list[tuple[str, torch.Tensor]] | None = None, repeats: int = 7,
                                     block_images: int = 24, global_size: int = 224, local_size: int = 96,
                                     n_local: int = 8, peer_path: str | None = None, fetch: bool = True,
                                     uint8_resize: bool = False) -> AugComparison:
    """Images/s per core of medfoundry's multi-crop and of dinov2's ``DataAugmentationDINO`` on the same CT frames.

    Six sides, each a function of one image returning all its views as normalised float tensors: medfoundry's
    :class:`~medfoundry.data.multicrop.MultiCropTransform` with DINOv2's photometric settings
    (:data:`DINOV2_PHOTOMETRIC`) and geometric only, each with the grey-RGB fast path (``medfoundry_*``) and without
    it (``medfoundry_3ch_path_*``, the path before it); ``DataAugmentationDINO`` itself (``dinov2_photometric``) and
    its geometric part (``geometric_augmentation_global/local`` + ``ToTensor`` + ``Normalize``, ``dinov2_geometric``).
    Both use the same crop scales, sizes, bicubic interpolation, flips and ImageNet normalisation, and give the
    model three channels: medfoundry gets the windowed frame repeated to three channels (what ``data.channels=3``
    makes of a CT slice), dinov2 the same frame as an 8-bit RGB PIL image (what its loader makes of a picture
    file). Preparing the inputs is not timed. One torch thread; ``repeats`` blocks of ``block_images`` images
    per side, the sides' order reversed every other block, each block seeded alike; the figure is images per
    second of process CPU time (one thread: per core; less sensitive than wall time to other jobs of a busy
    machine), the ratios are taken block by block. ``uint8_resize`` adds two sides, ``medfoundry_uint8_*``: the
    grey-RGB path with the (inexact, opt-in) 8-bit resize.
    """
    from PIL import Image

    from medfoundry.data.multicrop import MultiCropTransform
    from medfoundry_cli.bench.peer_code import locate_dinov2

    code = locate_dinov2(peer_path, fetch=fetch)
    if str(code.root) not in sys.path:
        sys.path.insert(0, str(code.root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dinov2 warns about its optional xFormers
        from dinov2.data.augmentations import DataAugmentationDINO

    frames = frames if frames is not None else real_ct_frames()
    rgb = [f.expand(3, -1, -1).contiguous() for _, f in frames]
    pil = [Image.fromarray((f[0].numpy() * 255).round().astype(np.uint8)).convert("RGB") for _, f in frames]
    geo = CropsConfig(global_size=global_size, global_scale=[0.32, 1.0], n_local=n_local, local_size=local_size,
                      local_scale=[0.05, 0.32], interpolation="bicubic")
    photo = replace(geo, **DINOV2_PHOTOMETRIC)
    peer = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), n_local, global_size, local_size)

    def peer_geometric(image):
        g = [peer.normalize(peer.geometric_augmentation_global(image)) for _ in range(2)]
        return g + [peer.normalize(peer.geometric_augmentation_local(image)) for _ in range(n_local)]

    sides = {
        "medfoundry_photometric": (MultiCropTransform(photo, 3), rgb),
        "medfoundry_3ch_path_photometric": (MultiCropTransform(photo, 3, grey_fast_path=False), rgb),
        "dinov2_photometric": (peer, pil),
        "medfoundry_geometric": (MultiCropTransform(geo, 3), rgb),
        "medfoundry_3ch_path_geometric": (MultiCropTransform(geo, 3, grey_fast_path=False), rgb),
        "dinov2_geometric": (peer_geometric, pil),
    }
    if uint8_resize:
        sides["medfoundry_uint8_photometric"] = (MultiCropTransform(photo, 3, uint8_resize=True), rgb)
        sides["medfoundry_uint8_geometric"] = (MultiCropTransform(geo, 3, uint8_resize=True), rgb)
    out = {name: AugSide(name) for name in sides}
    with _threads(1):
        for fn, images in sides.values():  # warm-up
            fn(images[0])
        order = list(sides)
        for block in range(repeats):
            for name in order if block % 2 == 0 else order[::-1]:
                fn, images = sides[name]
                torch.manual_seed(block)
                c0, w0 = time.process_time(), time.perf_counter()
                for i in range(block_images):
                    fn(images[i % len(images)])
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                out[name].cpu_rates.append(block_images / max(cpu, 1e-9))
                out[name].wall_rates.append(block_images / max(wall, 1e-9))
    views = f"2x{global_size} + {n_local}x{local_size}, bicubic + flips, 3 channels"
    return AugComparison(out, [n for n, _ in frames], views, code.describe(), block_images, repeats)
