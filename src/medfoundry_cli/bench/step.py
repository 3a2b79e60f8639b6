"""Timing full training steps: the DINOv2-style multi-crop step and the CLIP image-report step.

A step is what :func:`medfoundry.train.loop.train` does per iteration, minus data loading, logging and
checkpoints (:class:`TrainStep`): schedules, forward under autocast (bf16 on GPU by default), the loop's
finite-loss agreement, backward, ``before_optimizer_step``, gradient clipping with the norm read back,
the optimizer step (fused AdamW on CPU and CUDA), ``after_optimizer_step`` (the EMA teacher update for DINO)
and the loop's metric reduction, host syncs included. Inputs are synthetic tensors already on the
device ("model only").

The DINOv2-style configuration is DINO (class token, Sinkhorn-Knopp teacher targets) + iBOT
(masked patch tokens, shared head, half the global crops masked at 10-50 %) + KoLeo, with
DINOv2's head (65,536 prototypes, 2,048 hidden, 256 bottleneck) for full-size models and a small head
for the CPU-friendly ``vit_tiny_*`` backbones.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from medfoundry.config.schema import HeadConfig, RunConfig
from medfoundry.precision import resolve_device, resolve_precision
from medfoundry.train.optim import apply_schedules, build_optimizer
from medfoundry_cli.bench.flops import (
    ViTShape,
    count_flops,
    dino_step_flops,
    patch_embed_flops,
    peak_flops,
    text_transformer_forward_flops,
    vit_forward_flops,
)
from medfoundry_cli.bench.results import BenchResult, peak_memory, reset_peak_memory, synchronize


@dataclass
class StepSpec:
    """A DINO-family step to benchmark."""

    model: str = "vit_tiny_patch8"  # registered backbone
    batch: int = 8  # images per step (each gives n_global + n_local crops)
    n_global: int = 2
    global_size: int = 64
    n_local: int = 8
    local_size: int = 32
    in_chans: int = 3
    head_dim: int | None = None  # prototypes; None: 65536 (DINOv2) or 256 for cpu-friendly backbones
    ibot: bool = True  # iBOT masked-patch term (DINOv2)
    drop_path: float = 0.0
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    steps: int = 5  # timed steps
    warmup: int = 2  # untimed steps first (allocator, cuDNN/cuBLAS heuristics, compilation)
    compile: bool = False  # torch.compile each transformer block (dist.compile)
    seed: int = 0
    peak_tflops: float | None = None  # MFU reference instead of the device table / nominal CPU peak
    find_max_batch: bool = False  # binary-search the largest batch that fits (CUDA only)
    seconds: float | None = None  # time box of the timed steps (None: all ``steps``)
    max_batch_seconds: float | None = None  # time box of the largest-batch search (None: until it converges)
    extra: list[str] = field(default_factory=list)  # config overrides ``key=value`` applied last

    def label(self) -> str:
        """Short description for tables."""
        local = f"+{self.n_local}x{self.local_size}" if self.n_local else ""
        return f"dino {self.model} {self.n_global}x{self.global_size}{local}"


def dino_run_config(spec: StepSpec) -> RunConfig:
    """The run configuration of a benchmarked DINOv2-style step."""
    from medfoundry.config.loader import load_config
    from medfoundry.models.registry import get_spec

    tiny = get_spec(spec.model).cpu_friendly
    head = HeadConfig(out_dim=256, hidden_dim=128, bottleneck_dim=64) if tiny else HeadConfig()
    if spec.head_dim:
        head.out_dim = spec.head_dim
    overrides = [
        f"model.name={spec.model}", f"model.img_size={spec.global_size}", f"model.in_chans={spec.in_chans}",
        f"model.drop_path_rate={spec.drop_path}", f"crops.n_global={spec.n_global}",
        f"crops.global_size={spec.global_size}", f"crops.n_local={spec.n_local}", f"crops.local_size={spec.local_size}",
        "dino.centering=sinkhorn", f"dino.ibot_weight={1.0 if spec.ibot else 0.0}", "dino.koleo_weight=0.1",
        f"train.batch_size={spec.batch}", f"train.seed={spec.seed}", f"train.device={spec.device}",
        f"train.precision={spec.precision}",
        "optim.lr=1e-4", "optim.warmup_steps=0", "train.steps=100000",
    ]
    cfg = load_config(None, overrides + list(spec.extra))
    cfg.dino.head = head
    cfg.dino.ibot_head = copy.copy(head)
    if spec.in_chans == 1:
        cfg.crops.mean, cfg.crops.std = [0.5], [0.25]
    return cfg


class TrainStep:
    """One iteration of the training loop's body, minus data loading, logging and checkpoints; call with
    ``(batch, step)``, returns the detached loss (the per-step metrics are kept in ``last_metrics``).

    It runs the loop body's sequence for one micro-batch with the loop's own pieces: ``apply_schedules``,
    ``Method.start_step``, :meth:`medfoundry.train.accumulate.StepOutputs.forward_backward` (forward under
    autocast, the finite/stop flags, then backward) and :func:`medfoundry.train.step.update`
    (``before_optimizer_step``, clipping, the optimizer step, ``zero_grad``, ``after_optimizer_step``, the metric
    all-reduce, all on the device). The flags are checked as the loop's ``train.nonfinite_check=auto`` does
    (:func:`medfoundry.train.nonfinite.resolve_check`): on a CUDA device with the fused AdamW they stay on the
    device and the update is skipped there (no host sync in the step; the loop reads them a step late, without
    waiting), elsewhere ``agree_step`` reads them on the host (one sync). Like the loop on a step that is not a
    logging step (nor one a hook asks for) it reads no metric back; ``read_metrics=True`` reads them every step (one
    more sync, the loop's logging step). A non-finite loss skips the update, as the loop does.

    Args:
        method: the training method (its hooks are called, its parameters optimised).
        cfg: the run config (``optim``, ``train.steps``/``schedule_steps``).
        device, precision: where it runs and the autocast precision.
        model: the module the loop calls (a DDP wrapper of ``method``); default ``method``.
    """

    def __init__(self, method: torch.nn.Module, cfg: RunConfig, device: torch.device, precision: str,
                 model: torch.nn.Module | None = None, read_metrics: bool = False) -> None:
        self.method = method
        self.model = model if model is not None else method
        self.cfg = cfg
        self.device = device
        self.precision = precision
        depth = max((b.depth for b in method.backbones().values()), default=None)
        self.optimizer = build_optimizer(method, cfg.optim, depth)
        self.params = [p for p in method.parameters() if p.requires_grad]
        self.horizon = cfg.train.schedule_steps or cfg.train.steps
        self.read_metrics = read_metrics
        from medfoundry.distributed.parallelize import is_sharded
        from medfoundry.train.nonfinite import resolve_check

        self.deferred = resolve_check("auto", device, self.optimizer, is_sharded(method)) == "device"
        self.last_metrics: dict[str, float] = {}
        self.last_device_metrics: dict[str, Tensor] = {}

    def compile_blocks(self) -> None:
        """``torch.compile`` every transformer block of every backbone, as ``dist.compile=true`` does."""
        from medfoundry.models.backbone import Backbone

        for module in self.method.modules():
            if isinstance(module, Backbone):
                for block in module.blocks:
                    block.compile()

    def __call__(self, batch: dict, step: int) -> Tensor:
        from medfoundry.train.accumulate import StepOutputs

        sched = apply_schedules(self.optimizer, self.cfg.optim, step, self.horizon)
        self.method.start_step(step)
        acc = StepOutputs(1, defer=self.deferred)
        acc.forward_backward(self.model, batch, step, True, False, self.precision, self.device)
        if not acc.finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.last_metrics = {"loss": float("nan")}
            return torch.tensor(float("nan"))
        from medfoundry.train import step as train_step

        out = acc.mean()
        metrics = train_step.update(self.method, self.optimizer, self.params, out, step, self.cfg.optim.clip_grad,
                                    self.device, skip=acc.skip)
        self.last_device_metrics = metrics
        if self.read_metrics:
            host = train_step.read_metrics(metrics)
            host.update(sched)
            host.update(self.method.metrics_after_step(step))
            host["loss"] = host.pop("_local_loss")
            self.last_metrics = host
        return out["loss"].detach()


def synthetic_dino_batch(cfg: RunConfig, batch: int, patch_size: int, device: torch.device, seed: int = 0) -> dict:
    """Random view-major crops (and iBOT masks when the iBOT term is on) as the loader would deliver them."""
    from medfoundry.data.masking import MaskSampler
    from medfoundry.data.views import mask_index

    c = cfg.crops
    g = torch.Generator().manual_seed(seed)
    ch = cfg.model.in_chans
    out = {"global_crops": torch.randn(c.n_global, batch, ch, c.global_size, c.global_size, generator=g)}
    if c.n_local:
        out["local_crops"] = torch.randn(c.n_local, batch, ch, c.local_size, c.local_size, generator=g)
    if cfg.dino.ibot_weight > 0:
        sampler = MaskSampler(cfg.dino.mask_probability, cfg.dino.mask_ratio_min, cfg.dino.mask_ratio_max)
        grid = (c.global_size // patch_size, c.global_size // patch_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out["masks"] = torch.stack([torch.stack([sampler(grid) for _ in range(batch)]) for _ in range(c.n_global)])
        out["mask_index"] = mask_index(out["masks"])  # as the loader's collate: computed on the CPU
    return {k: v.to(device) for k, v in out.items()}


def analytic_dino_flops(cfg: RunConfig, shape: ViTShape, batch: int, masked_patches: int) -> float:
    """The analytic training-step FLOPs of :func:`medfoundry_cli.bench.flops.dino_step_flops` for ``cfg``."""
    c, d = cfg.crops, cfg.dino
    ibot_head = d.ibot_head if d.ibot_separate_head else None
    return dino_step_flops(shape, d.head, batch, c.n_global, c.global_size, c.n_local, c.local_size,
                           masked_patches, ibot_head)["train_step"]


def time_steps(step_fn: Callable[[int], object], device: torch.device, steps: int, warmup: int,
               first_step: int = 0, seconds: float | None = None) -> list[float]:
    """Seconds of each of ``steps`` calls ``step_fn(i)`` after ``warmup`` untimed ones (synchronised).

    ``seconds`` time-boxes the timed part: no new step starts once the timed steps have taken that long
    (at least one step is timed), so a slow configuration still returns within its budget.
    """
    i = first_step
    for _ in range(warmup):
        step_fn(i)
        i += 1
    synchronize(device)
    times: list[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn(i)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        i += 1
        if seconds is not None and sum(times) >= seconds:
            break
    return times


def largest_batch(try_batch: Callable[[int], None], start: int, limit: int = 16384,
                  deadline: float | None = None) -> int:
    """Largest batch for which ``try_batch(b)`` runs without CUDA out-of-memory (0 if none).

    Doubles from ``start`` until a batch fails (or ``limit``), then bisects to within 1/32 of the
    answer. ``try_batch`` must run at least two full steps (optimizer state exists from the second).
    ``deadline`` (a ``time.monotonic()`` value): no new try starts after it; the largest batch that fitted
    so far is returned (a lower bound).
    """

    def fits(b: int) -> bool:
        try:
            try_batch(b)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            if torch.cuda.is_initialized():  # drop what the failed try left behind before the next one
                gc.collect()
                torch.cuda.empty_cache()

    def late() -> bool:
        return deadline is not None and time.monotonic() > deadline

    lo, hi = 0, start
    while True:
        if hi > limit or (lo and late()):
            return lo
        if not fits(hi):
            break
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 32) and not late():
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class DinoStepSetup:
    """What a DINO step benchmark measures: the run config, device and precision, the seeded method, the loop's
    step around it and one synthetic multi-crop batch (shared by :func:`bench_dino_step` and the peer comparison)."""

    cfg: Any
    device: torch.device
    precision: Any
    method: Any
    step: TrainStep
    batch: dict


def build_dino_step(spec: StepSpec) -> DinoStepSetup:
    """The seeded DINO method for ``spec`` (``torch.manual_seed(spec.seed)`` before building), wrapped in the
    loop's step, with its synthetic batch on the device."""
    from medfoundry.methods.dino.method import DINOMethod

    cfg = dino_run_config(spec)
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    torch.manual_seed(spec.seed)
    method = DINOMethod(cfg.model, cfg.dino, cfg.train.steps).to(device)
    step = TrainStep(method, cfg, device, precision)
    batch = synthetic_dino_batch(cfg, spec.batch, method.student["backbone"].patch_size, device, spec.seed)
    return DinoStepSetup(cfg, device, precision, method, step, batch)


def bench_dino_step(spec: StepSpec) -> BenchResult:
    """Model-only benchmark of a DINOv2-style step: images/s, FLOPs (counted and analytic), MFU, memory."""
    setup = build_dino_step(spec)
    cfg, device, precision, method, step, batch = (setup.cfg, setup.device, setup.precision, setup.method,
                                                   setup.step, setup.batch)
    backbone = method.student["backbone"]
    counted, _ = count_flops(lambda: step(batch, 0))
    masked = int(batch["masks"].sum()) if "masks" in batch else 0
    analytic = analytic_dino_flops(cfg, ViTShape.from_backbone(backbone), spec.batch, masked)
    if spec.compile:  # after counting: FlopCounterMode needs the eager ops
        step.compile_blocks()
    reset_peak_memory(device)
    times = time_steps(lambda i: step(batch, i), device, spec.steps, spec.warmup, first_step=1, seconds=spec.seconds)
    mem, mem_source = peak_memory(device)
    step_s = sum(times) / len(times)
    result = BenchResult("model", spec.label(), str(device), spec.batch, spec.batch / step_s, step_s,
                         peak_mem_bytes=mem, peak_mem_source=mem_source)
    peak, source = peak_flops(device, precision, spec.peak_tflops)
    result.set_flops(counted, analytic, peak, source)
    result.notes.append(f"{precision}, drop-path {spec.drop_path}, DINO+iBOT+KoLeo (Sinkhorn), "
                        f"{cfg.dino.head.out_dim} prototypes, compile={spec.compile}; images/s counts images "
                        f"({spec.n_global + spec.n_local} crops each)")
    if spec.find_max_batch:
        if device.type == "cuda":
            del batch
            t0 = time.monotonic()
            result.max_batch = _largest_dino_batch(step, cfg, backbone.patch_size, device, spec)
            if spec.max_batch_seconds and time.monotonic() - t0 > spec.max_batch_seconds:
                result.notes.append(f"largest batch: search stopped at its {spec.max_batch_seconds:g} s time box; "
                                    f"{result.max_batch} fits (a lower bound)")
        else:
            result.notes.append("largest batch: searched on CUDA only (CPU memory is not the limit worth reporting)")
    return result


def _largest_dino_batch(step: TrainStep, cfg: RunConfig, patch: int, device: torch.device, spec: StepSpec) -> int:
    def try_batch(b: int) -> None:
        step.optimizer.zero_grad(set_to_none=True)  # a failed try may leave gradients behind
        batch = synthetic_dino_batch(cfg, b, patch, device, spec.seed)
        for i in range(2):
            step(batch, i)
        synchronize(device)

    deadline = time.monotonic() + spec.max_batch_seconds if spec.max_batch_seconds else None
    return largest_batch(try_batch, max(1, spec.batch), deadline=deadline)


# ---- CLIP ------------------------------------------------------------------------------------------------------


@dataclass
class ClipStepSpec:
    """A CLIP image-report step to benchmark: a recipe (e.g. the hybrid DINOv3 + CheXzero one) or a tiny tower."""

    recipe: str | None = None  # e.g. "hybrid_dinov3_chexzero"; pretrained weights are not loaded
    batch: int = 8
    text_len: int = 64  # tokens per report in the batch (per-batch padding: the longest report)
    device: str = "cpu"
    precision: str = "auto"
    steps: int = 5
    warmup: int = 2
    seed: int = 0
    peak_tflops: float | None = None
    find_max_batch: bool = False
    seconds: float | None = None  # time box of the timed steps (None: all ``steps``)
    extra: list[str] = field(default_factory=list)  # config overrides ``key=value`` applied last


TINY_CLIP = ["method=clip", "model.name=vit_tiny_patch8", "model.img_size=64", "model.in_chans=3",
             "clip.embed_dim=32", "clip.text.width=32", "clip.text.heads=2", "clip.text.layers=2",
             "clip.text.context_length=128", "clip.preprocess.size=64", "clip.preprocess.normalize=imagenet"]


def clip_run_config(spec: ClipStepSpec) -> RunConfig:
    """The run configuration of a benchmarked CLIP step (pretrained weights switched off)."""
    from medfoundry.config.loader import load_config
    from medfoundry.recipes import resolve_recipe

    base = ["model.pretrained=null", "clip.text.pretrained=null", f"train.batch_size={spec.batch}",
            f"train.device={spec.device}", f"train.precision={spec.precision}", f"train.seed={spec.seed}",
            "train.steps=100000"]
    if spec.recipe:
        return load_config(resolve_recipe(spec.recipe), base + list(spec.extra))
    return load_config(None, TINY_CLIP + base + list(spec.extra))


def synthetic_clip_batch(cfg: RunConfig, batch: int, text_len: int, device: torch.device, seed: int = 0) -> dict:
    """Random images in [0, 1] and token ids shaped like tokenised reports (SOT ... EOT, EOT the highest id)."""
    c = cfg.clip
    g = torch.Generator().manual_seed(seed)
    size = c.preprocess.size
    images = torch.rand(batch, cfg.model.in_chans, size, size, generator=g)
    if c.text.kind == "clip":
        vocab = c.text.vocab_size
        ids = torch.randint(1, vocab - 2, (batch, text_len), generator=g)
        ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1
    else:
        ids = torch.randint(1000, 2000, (batch, text_len), generator=g)
    mask = torch.ones_like(ids)
    return {"images": images.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


def analytic_clip_flops(method: torch.nn.Module, cfg: RunConfig, batch: int, text_len: int) -> float | None:
    """Analytic FLOPs of one CLIP training step (3x forward of both towers, less the image input gradient);
    None for HF text towers (their architecture is not modelled here)."""
    c = cfg.clip
    if c.text.kind != "clip":
        return None
    backbone = method.image.backbone
    shape = ViTShape.from_backbone(backbone)
    size = c.preprocess.size
    image = vit_forward_flops(shape, size, size) + _linear_flops(method.image.proj)
    text_mod = method.text
    tower = getattr(text_mod, "tower", text_mod)
    text = text_transformer_forward_flops(text_len, c.text.width, c.text.layers, c.text.mlp_ratio, tower.output_dim)
    if hasattr(text_mod, "proj"):
        text += _linear_flops(text_mod.proj)
    forward = batch * (image + text)
    return 3 * forward - batch * patch_embed_flops(shape, size, size)


def _linear_flops(module: torch.nn.Module) -> float:
    return 2.0 * sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def bench_clip_step(spec: ClipStepSpec) -> BenchResult:
    """Model-only benchmark of a CLIP step: image-text pairs/s, FLOPs, MFU, memory."""
    from medfoundry.methods.clip.method import ClipMethod

    cfg = clip_run_config(spec)
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    text_len = min(spec.text_len, cfg.clip.text.context_length)
    torch.manual_seed(spec.seed)
    method = ClipMethod(cfg.model, cfg.clip, cfg.adapt).to(device)
    step = TrainStep(method, cfg, device, precision)
    batch = synthetic_clip_batch(cfg, spec.batch, text_len, device, spec.seed)
    counted, _ = count_flops(lambda: step(batch, 0))
    analytic = analytic_clip_flops(method, cfg, spec.batch, text_len)
    reset_peak_memory(device)
    times = time_steps(lambda i: step(batch, i), device, spec.steps, spec.warmup, first_step=1, seconds=spec.seconds)
    mem, mem_source = peak_memory(device)
    step_s = sum(times) / len(times)
    name = f"clip {spec.recipe or 'tiny'} {cfg.model.name} {cfg.clip.preprocess.size}px text {text_len}"
    result = BenchResult("clip", name, str(device), spec.batch, spec.batch / step_s, step_s,
                         peak_mem_bytes=mem, peak_mem_source=mem_source)
    peak, source = peak_flops(device, precision, spec.peak_tflops)
    result.set_flops(counted, analytic, peak, source)
    result.notes.append(f"{precision}, {cfg.optim.name}; images/s counts image-report pairs")
    if spec.find_max_batch:
        if device.type == "cuda":
            del batch

            def try_batch(b: int) -> None:
                step.optimizer.zero_grad(set_to_none=True)
                data = synthetic_clip_batch(cfg, b, text_len, device, spec.seed)
                for i in range(2):
                    step(data, i)
                synchronize(device)

            result.max_batch = largest_batch(try_batch, max(1, spec.batch))
        else:
            result.notes.append("largest batch: searched on CUDA only")
    return result
