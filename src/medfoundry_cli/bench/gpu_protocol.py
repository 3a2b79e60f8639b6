"""The GPU protocol (issue 16, item 5): every speed figure of the DINOv2-style recipes in one prepared run.

On one GPU, in one process, time-boxed part by part (``seconds_per_part`` for the timed steps of a part,
``max_batch_seconds`` for each largest-batch search, ``budget_s`` for the whole run: a part that would
start after the budget is recorded as skipped), and in this order so that a run cut short still leaves
the most wanted numbers:

1. ``step``: the DINOv2-style step (2 x 224 + 8 x 96, bf16, DINO + iBOT + KoLeo, 65,536 prototypes) of
   ViT-S/16, ViT-B/16 and ViT-L/16, eager: images/s, counted TFLOP per step, MFU against the chip's
   dense bf16 peak (:data:`medfoundry_cli.bench.flops.GPU_PEAKS`, or ``peak_tflops``), peak memory, and
   the largest batch that fits (doubling, then bisection on out-of-memory);
2. ``peer``: ViT-B/16 as medfoundry's step and as the same step built from facebookresearch/dinov2's
   modules, alternating (:mod:`medfoundry_cli.bench.peer_compare`);
3. ``ddp`` / ``fsdp2``: ViT-B/16 wrapped by DistributedDataParallel or sharded by FSDP2
   (``medfoundry.distributed.parallelize.apply_fsdp``) in a one-process process group (world size 1):
   the wrappers' own cost on one GPU;
4. ``e2e``: ViT-B/16 fed by the real loader from PNG files, crops on the CPU workers vs
   ``crops.device=gpu``: images/s and the share of the time spent waiting for data;
5. ``clip``: the hybrid CLIP recipe's step (DINOv3 ViT-B/16 + CheXzero text tower): pairs/s, MFU;
6. ``compile``: the same steps as 1 with every transformer block under ``torch.compile``.

Everything is written under ``out``: ``gpu_protocol.json`` (rewritten after every part) and
``gpu_protocol.md`` (the Markdown table with the chip, date and command); each row is printed as its part
ends. Nothing is downloaded except the dinov2 code when it is not already cached.

``tiny=True`` (automatic without CUDA) is the CPU dry run: every part end to end at a tiny size (the
``vit_tiny_patch8`` backbone, 2 x 32 + 2 x 16 crops, batch 2, one timed step each, the tiny CLIP towers, gloo
for the process group), titled "CPU dry run"; ``torch.compile`` is skipped on CPU unless ``compile_on_cpu``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from medfoundry_cli.bench.results import BenchResult, _json_safe, describe_machine, peak_memory, reset_peak_memory
from medfoundry_cli.bench.step import StepSpec

FULL_MODELS = ["vit_small_patch16", "vit_base_patch16", "vit_large_patch16"]
FULL_BATCH = {"vit_small_patch16": 256, "vit_base_patch16": 128, "vit_large_patch16": 64}
TINY_MODEL = "vit_tiny_patch8"
REFERENCE_MODEL = "vit_base_patch16"  # the model of the peer, DDP/FSDP2 and data-wait parts
PART_ORDER = ["step", "compile", "peer", "ddp", "fsdp2", "e2e", "clip"]
COLUMNS = ["part", "model", "batch", "images/s", "TFLOP/step", "MFU", "peak mem", "largest batch", "data wait",
           "comparison", "status"]


@dataclass
class ProtocolConfig:
    """What the protocol runs; :meth:`resolved` fills the defaults of the GPU run or of the CPU dry run."""

    out: Path = Path("runs/gpu_protocol")
    tiny: bool | None = None  # None: tiny exactly when no CUDA device is present
    device: str = "auto"
    models: list[str] | None = None  # default ViT-S/B/L /16 (tiny: vit_tiny_patch8)
    batch: int = 0  # 0: per-model default (256 / 128 / 64; tiny 2)
    global_size: int = 0  # 0: 224 (tiny 32)
    local_size: int = 0  # 0: 96 (tiny 16)
    n_local: int = -1  # -1: 8 (tiny 2)
    precision: str = "auto"
    steps: int = 0  # timed steps per part at most (0: 30; tiny 1)
    warmup: int = -1  # untimed steps first (-1: 5; tiny 1)
    seconds_per_part: float = 8.0  # time box of each part's timed steps
    max_batch_seconds: float = 30.0  # time box of each largest-batch search
    budget_s: float = 450.0  # the whole run: parts that would start later are skipped
    peak_tflops: float | None = None
    peer_path: str | None = None
    fetch_peer: bool = True
    workers: int = 0  # e2e loader workers (0: CPU cores - 2, at least 1)
    e2e_images: int = 0  # PNG files for e2e (0: 256; tiny 8)
    e2e_image_size: int = 0  # their side (0: 512; tiny 64)
    clip_recipe: str | None = "hybrid_dinov3_chexzero"  # tiny: the tiny towers
    clip_batch: int = 0  # 0: 64 (tiny 2)
    text_len: int = 0  # 0: 128 (tiny 16)
    parts: list[str] = field(default_factory=lambda: list(PART_ORDER))
    compile_on_cpu: bool = False
    command: str = ""  # the command line, for the table

    def resolved(self) -> ProtocolConfig:
        """A copy with the defaults of the chosen mode filled in (``tiny`` decided from the device)."""
        tiny = (not torch.cuda.is_available()) if self.tiny is None else self.tiny
        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() and not tiny
                                                              else "cpu")
        cores = _cpu_cores()
        return replace(
            self, tiny=tiny, device=device,
            models=self.models or ([TINY_MODEL] if tiny else list(FULL_MODELS)),
            global_size=self.global_size or (32 if tiny else 224), local_size=self.local_size or (16 if tiny else 96),
            n_local=self.n_local if self.n_local >= 0 else (2 if tiny else 8),
            steps=self.steps or (1 if tiny else 30), warmup=self.warmup if self.warmup >= 0 else (1 if tiny else 5),
            workers=self.workers or (1 if tiny else max(1, cores - 2)),
            e2e_images=self.e2e_images or (8 if tiny else 256), e2e_image_size=self.e2e_image_size or (64 if tiny
                                                                                                     else 512),
            clip_recipe=None if tiny else self.clip_recipe, clip_batch=self.clip_batch or (2 if tiny else 64),
            text_len=self.text_len or (16 if tiny else 128), out=Path(self.out))

    def batch_for(self, model: str) -> int:
        """The batch of ``model`` (``batch`` when given, else 2 in the dry run, else the per-model default)."""
        return self.batch or (2 if self.tiny else FULL_BATCH.get(model, 64))

    def spec(self, model: str, **changes: Any) -> StepSpec:
        """The :class:`StepSpec` of ``model`` under this configuration."""
        spec = StepSpec(model=model, batch=self.batch_for(model), global_size=self.global_size,
                        local_size=self.local_size, n_local=self.n_local, device=self.device,
                        precision=self.precision, steps=self.steps, warmup=self.warmup,
                        peak_tflops=self.peak_tflops, seconds=self.seconds_per_part,
                        max_batch_seconds=self.max_batch_seconds)
        return replace(spec, **changes)


@dataclass
class PartResult:
    """One measured (or skipped, or failed) part: a table row and its details."""

    part: str  # step | compile | peer | ddp | fsdp2 | e2e | clip
    model: str
    status: str = "ok"  # ok | failed | skipped
    seconds: float = 0.0  # wall time the part took, set-up included
    batch: int | None = None
    images_per_s: float | None = None
    flops_per_step: float | None = None
    mfu: float | None = None
    peak_mem_bytes: int | None = None
    max_batch: int | None = None
    data_wait_frac: float | None = None
    comparison: str = ""  # against the row it is compared with (eager, DDP, CPU crops, dinov2)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    result: dict | None = None  # the underlying BenchResult / PeerComparison as a dict

    @classmethod
    def from_bench(cls, part: str, model: str, r: BenchResult) -> PartResult:
        """The row of a :class:`~medfoundry_cli.bench.results.BenchResult`."""
        notes = list(r.notes)
        if r.peak_source and r.mfu is not None:
            notes.insert(0, f"MFU vs {r.peak_source}")
        return cls(part, model, batch=r.batch, images_per_s=r.images_per_s, flops_per_step=r.flops_counted,
                   mfu=r.mfu, peak_mem_bytes=r.peak_mem_bytes, max_batch=r.max_batch, data_wait_frac=r.data_wait_frac,
                   notes=notes, result=r.as_dict())

    def cells(self) -> list[str]:
        """The row's cells in :data:`COLUMNS` order."""
        return [self.part, self.model, _cell(self.batch), _rate(self.images_per_s), _sig(self.flops_per_step, 1e12),
                _cell(self.mfu, 0.01, 1, " %"), _cell(self.peak_mem_bytes, 2**30, 2, " GiB"), _cell(self.max_batch),
                _cell(self.data_wait_frac, 0.01, 1, " %"), self.comparison or "",
                self.status if self.status == "ok" else f"{self.status}: {self.error or ''}".strip()]


def _cell(value: float | int | None, scale: float = 1.0, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if digits == 0 and scale == 1.0:
        return f"{int(value)}{suffix}"
    return f"{value / scale:.{digits}f}{suffix}"


def _sig(value: float | None, scale: float, digits: int = 4) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value / scale:.{digits}g}"


def _rate(value: float | None) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def _cpu_cores() -> int:
    from medfoundry_cli.bench.flops import cpu_threads

    return cpu_threads()


def title(cfg: ProtocolConfig, device: torch.device, date: str) -> str:
    """The table's title: the chip (or "CPU dry run") and the date."""
    if cfg.tiny:
        return f"GPU protocol, CPU dry run (tiny sizes, not a measurement of a GPU), {date}"
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"GPU protocol on {chip}, {date}"


def ordered(parts: list[PartResult], models: list[str]) -> list[PartResult]:
    """Rows in table order: step and compile per model, then peer, DDP, FSDP2, data wait, CLIP (run order kept
    within a group)."""
    def key(p: PartResult) -> tuple[int, int]:
        group = PART_ORDER.index(p.part) if p.part in PART_ORDER else len(PART_ORDER)
        if p.part in ("step", "compile"):
            return (0, models.index(p.model) * 2 + group if p.model in models else 10**6)
        return (1, group)

    return sorted(parts, key=key)


def markdown_table(parts: list[PartResult], heading: str, command: str, machine: str, models: list[str]) -> str:
    """The Markdown document: title, command, machine, the table, then each row's notes."""
    rows = ordered(parts, models)
    lines = [f"### {heading}", "", f"Command: `{command}`" if command else "", "", f"Machine: {machine}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in p.cells()) + " |" for p in rows]
    notes = [f"- {p.part} {p.model}: {n}" for p in rows for n in p.notes]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(line for line in lines if line is not None) + "\n"


def document(parts: list[PartResult], cfg: ProtocolConfig, heading: str, machine: str, date: str,
             peer: dict | None, finished: bool) -> dict:
    """The JSON document of a (possibly unfinished) run."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return _json_safe({"title": heading, "date": date, "command": cfg.command, "machine": machine,
                       "torch": torch.__version__, "tiny": cfg.tiny, "finished": finished, "config": config,
                       "peer": peer, "columns": COLUMNS, "parts": [asdict(p) for p in parts]})


def echo_flushed(line: str) -> None:
    """Print ``line`` and flush, so a run killed at its time limit has shown every finished row."""
    print(line, flush=True)


class Protocol:
    """Runs the parts of :class:`ProtocolConfig` in order under the time budget, writing as it goes."""

    def __init__(self, cfg: ProtocolConfig, echo: Callable[[str], None] = echo_flushed) -> None:
        self.cfg = cfg.resolved()
        self.device = torch.device(self.cfg.device)
        self.echo = echo
        self.start = time.monotonic()
        self.date = _dt.date.today().isoformat()
        self.parts: list[PartResult] = []
        self.peer: dict | None = None
        self.machine = describe_machine(self.device)
        self.heading = title(self.cfg, self.device, self.date)
        self.eager: dict[str, PartResult] = {}

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def remaining(self) -> float:
        """Seconds left of the run's budget."""
        return self.cfg.budget_s - (time.monotonic() - self.start)

    def write(self, finished: bool = False) -> None:
        """(Re)write ``gpu_protocol.json`` and ``gpu_protocol.md`` under ``out``."""
        out = self.cfg.out
        out.mkdir(parents=True, exist_ok=True)
        doc = document(self.parts, self.cfg, self.heading, self.machine, self.date, self.peer, finished)
        (out / "gpu_protocol.json").write_text(json.dumps(doc, indent=2))
        (out / "gpu_protocol.md").write_text(markdown_table(self.parts, self.heading, self.cfg.command, self.machine,
                                                            self.cfg.models or []))

    def run_part(self, part: str, model: str, fn: Callable[[], list[PartResult]], min_s: float = 5.0) -> None:
        """Run ``fn`` (returning its rows) unless the budget is spent; a failure becomes a failed row."""
        t0 = time.monotonic()
        if self.remaining() < min_s:
            rows = [PartResult(part, model, status="skipped", error=f"time budget ({self.cfg.budget_s:g} s) spent")]
        else:
            try:
                rows = fn()
            except Exception as err:  # a part that fails leaves the others running
                rows = [PartResult(part, model, status="failed", error=f"{type(err).__name__}: {err}".splitlines()[0])]
                (self.cfg.out / f"error_{part}_{model}.txt").parent.mkdir(parents=True, exist_ok=True)
                (self.cfg.out / f"error_{part}_{model}.txt").write_text(traceback.format_exc())
            finally:
                _free(self.device)
        for r in rows:
            r.seconds = time.monotonic() - t0
            self.parts.append(r)
            left = max(0.0, self.remaining())
            self.echo("| " + " | ".join(r.cells()) + f" |  ({r.seconds:.0f} s, {left:.0f} s left)")
        self.write()

    # -- the parts --------------------------------------------------------------------------------------------

    def run(self) -> list[PartResult]:
        """All selected parts, in the order of the module docstring; returns the rows."""
        cfg = self.cfg
        self.echo(f"{self.heading}\nmachine: {self.machine}\nout: {cfg.out}")
        self.echo("| " + " | ".join(COLUMNS) + " |")
        self.write()
        if "step" in cfg.parts:
            for model in cfg.models or []:
                self.run_part("step", model, lambda m=model: self.step(m, compile=False), min_s=20)
        if "peer" in cfg.parts:
            self.run_part("peer", self.reference, self.peer_part, min_s=20)
        for strategy in ("ddp", "fsdp2"):
            if strategy in cfg.parts:
                self.run_part(strategy, self.reference, lambda s=strategy: self.wrapped(s), min_s=15)
        if "e2e" in cfg.parts:
            for where in ("cpu", "gpu"):
                self.run_part("e2e", self.reference, lambda w=where: self.end_to_end(w), min_s=20)
        if "clip" in cfg.parts:
            self.run_part("clip", cfg.clip_recipe or "tiny towers", self.clip, min_s=15)
        if "compile" in cfg.parts:
            for model in cfg.models or []:
                if self.device.type == "cpu" and not cfg.compile_on_cpu:
                    self.parts.append(PartResult("compile", model, status="skipped",
                                                 error="torch.compile not run on CPU: its compilation alone takes "
                                                       "minutes there (compile_on_cpu=True runs it)"))
                    self.write()
                    continue
                self.run_part("compile", model, lambda m=model: self.step(m, compile=True), min_s=45)
        self.write(finished=True)
        return self.parts

    @property
    def reference(self) -> str:
        """The model of the peer, DDP/FSDP2 and data-wait parts: ViT-B/16 (the dry run's tiny model)."""
        return TINY_MODEL if self.cfg.tiny else REFERENCE_MODEL

    def step(self, model: str, compile: bool) -> list[PartResult]:
        """Part ``step`` (eager, with the largest batch on CUDA) or ``compile`` for ``model``."""
        from medfoundry_cli.bench.step import bench_dino_step

        spec = self.cfg.spec(model, compile=compile, find_max_batch=not compile and self.device.type == "cuda")
        if compile:
            spec = replace(spec, warmup=max(spec.warmup, 3 if self.device.type == "cuda" else 1))
        row = PartResult.from_bench("compile" if compile else "step", model, bench_dino_step(spec))
        if compile:
            eager = self.eager.get(model)
            if eager and eager.images_per_s and row.images_per_s:
                row.comparison = f"{row.images_per_s / eager.images_per_s:.2f}x eager"
        else:
            self.eager[model] = row
        return [row]

    def peer_part(self) -> list[PartResult]:
        """Part ``peer``: the reference model as medfoundry's step and as dinov2's modules' step, alternating."""
        from medfoundry_cli.bench.flops import peak_flops
        from medfoundry_cli.bench.peer_code import locate_dinov2
        from medfoundry_cli.bench.peer_compare import compare_with_dinov2

        cfg = self.cfg
        locate_dinov2(cfg.peer_path, fetch=cfg.fetch_peer)  # a missing peer fails here, before building
        spec = cfg.spec(self.reference)
        repeats, steps = (2, 1) if cfg.tiny else (3, 3)
        cmp = compare_with_dinov2(spec, cfg.peer_path, fetch=cfg.fetch_peer, repeats=repeats, steps=steps,
                                  warmup=max(1, cfg.warmup))
        self.peer = cmp.as_dict()
        self.echo(cmp.format())
        from medfoundry.precision import resolve_precision

        peak, source = peak_flops(self.device, resolve_precision(cfg.precision, self.device), cfg.peak_tflops)
        timing = "wall" if self.device.type == "cuda" else "CPU"
        ratio = cmp.wall_ratio() if self.device.type == "cuda" else cmp.cpu_ratio()
        flops = f"FLOPs {100 * (cmp.flops_ratio() - 1):+.3f} %"
        rows = []
        for side, label in ((cmp.medfoundry, "medfoundry"), (cmp.dinov2, "dinov2 modules")):
            step_s = side.wall_median
            r = PartResult("peer", f"{self.reference} ({label})", batch=spec.batch, images_per_s=spec.batch / step_s,
                           flops_per_step=side.flops, peak_mem_bytes=side.peak_mem_bytes,
                           mfu=(side.flops / step_s / peak) if peak else None)
            r.notes.append(f"{side.name}: wall {step_s:.4g} s/step, CPU {side.cpu_median:.4g} s/step (medians)")
            rows.append(r)
        rows[0].comparison = f"{timing} time / dinov2 {ratio:.3f}; {flops}"
        rows[1].comparison = f"peer {cmp.peer_commit[:12]}"
        rows[0].notes.append(f"MFU vs {source}")
        rows[1].notes += cmp.notes[:1] + [cmp.peer]
        return rows

    def wrapped(self, strategy: str) -> list[PartResult]:
        """Part ``ddp`` / ``fsdp2``: the reference step under that wrapper in a one-process process group."""
        row = PartResult.from_bench(strategy, self.reference, bench_wrapped_step(self.cfg.spec(self.reference),
                                                                                 strategy))
        if strategy == "fsdp2":
            ddp = next((p for p in self.parts if p.part == "ddp" and p.status == "ok"), None)
            if ddp and ddp.images_per_s and row.images_per_s:
                row.comparison = f"{row.images_per_s / ddp.images_per_s:.2f}x DDP"
        return [row]

    def end_to_end(self, where: str) -> list[PartResult]:
        """Part ``e2e``: the reference step fed by the real loader, crops on the CPU workers or on the device."""
        from medfoundry_cli.bench.data import bench_end_to_end

        cfg = self.cfg
        spec = cfg.spec(self.reference, steps=cfg.steps if cfg.tiny else 20)
        r = bench_end_to_end(spec, where, cfg.workers, n_images=cfg.e2e_images, image_size=cfg.e2e_image_size)
        row = PartResult.from_bench("e2e", self.reference, r)
        row.comparison = "crops on the CPU workers" if where == "cpu" else "crops.device=gpu"
        if where == "gpu":
            cpu = next((p for p in self.parts if p.part == "e2e" and p.status == "ok"), None)
            if cpu and cpu.images_per_s and row.images_per_s:
                row.comparison += f", {row.images_per_s / cpu.images_per_s:.2f}x CPU crops"
        return [row]

    def clip(self) -> list[PartResult]:
        """Part ``clip``: the hybrid CLIP step (the dry run: the tiny towers); images/s are pairs/s."""
        from medfoundry_cli.bench.step import ClipStepSpec, bench_clip_step

        cfg = self.cfg
        spec = ClipStepSpec(recipe=cfg.clip_recipe, batch=cfg.clip_batch, text_len=cfg.text_len, device=cfg.device,
                            precision=cfg.precision, steps=cfg.steps, warmup=cfg.warmup, peak_tflops=cfg.peak_tflops,
                            seconds=cfg.seconds_per_part)
        row = PartResult.from_bench("clip", cfg.clip_recipe or "tiny towers", bench_clip_step(spec))
        row.comparison = "images/s = image-report pairs/s"
        return [row]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_wrapped_step(spec: StepSpec, strategy: str) -> BenchResult:
    """The DINOv2-style step of ``spec`` wrapped by DDP (``strategy="ddp"``) or sharded by FSDP2 (``"fsdp2"``, the
    loop's :func:`~medfoundry.distributed.parallelize.apply_fsdp`) in a one-process process group (NCCL on CUDA,
    gloo on CPU), created here and destroyed after; the loop's step (:class:`TrainStep`) calls the wrapper."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from medfoundry.distributed.parallelize import apply_fsdp
    from medfoundry.methods.dino.method import DINOMethod
    from medfoundry.precision import resolve_device, resolve_precision
    from medfoundry_cli.bench.flops import count_flops, peak_flops
    from medfoundry_cli.bench.step import TrainStep, dino_run_config, synthetic_dino_batch, time_steps

    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    if dist.is_initialized():
        raise RuntimeError("a process group already exists; the one-process wrapper benchmark makes its own")
    with tempfile.TemporaryDirectory(prefix="medfoundry_pg_") as tmp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/store",
                                rank=0, world_size=1)
        try:
            cfg = dino_run_config(spec)
            torch.manual_seed(spec.seed)
            method = DINOMethod(cfg.model, cfg.dino, cfg.train.steps).to(device)
            if strategy == "ddp":
                ids = [device.index if device.index is not None else torch.cuda.current_device()] \
                    if device.type == "cuda" else None
                model: torch.nn.Module = DistributedDataParallel(method, device_ids=ids, broadcast_buffers=False)
            elif strategy == "fsdp2":
                apply_fsdp(method, precision)
                model = method
            else:
                raise ValueError(f"strategy must be ddp or fsdp2, got {strategy!r}")
            step = TrainStep(method, cfg, device, precision, model=model)
            batch = synthetic_dino_batch(cfg, spec.batch, method.student["backbone"].patch_size, device, spec.seed)
            counted, _ = count_flops(lambda: step(batch, 0))
            reset_peak_memory(device)
            times = time_steps(lambda i: step(batch, i), device, spec.steps, spec.warmup, first_step=1,
                               seconds=spec.seconds)
            mem, mem_source = peak_memory(device)
        finally:
            dist.destroy_process_group()
    step_s = sum(times) / len(times)
    result = BenchResult("model", f"{spec.label()} {strategy}", str(device), spec.batch, spec.batch / step_s, step_s,
                         peak_mem_bytes=mem, peak_mem_source=mem_source)
    peak, source = peak_flops(device, precision, spec.peak_tflops)
    result.set_flops(counted, None, peak, source)
    what = ("DistributedDataParallel over the method (student gradients all-reduced)" if strategy == "ddp" else
            "FSDP2 fully_shard per block, per backbone and the method" +
            (" (bf16 parameters, fp32 reduction)" if precision == "bf16" else ""))
    result.notes.append(f"{precision}; one process, world size 1; {what}")
    return result


def run_protocol(cfg: ProtocolConfig, echo: Callable[[str], None] = echo_flushed) -> Protocol:
    """Run the protocol of ``cfg`` (see the module docstring) and print the Markdown table; returns the runner."""
    protocol = Protocol(cfg, echo)
    protocol.run()
    echo("")
    echo((protocol.cfg.out / "gpu_protocol.md").read_text())
    echo(f"wrote {protocol.cfg.out / 'gpu_protocol.json'} and {protocol.cfg.out / 'gpu_protocol.md'}")
    return protocol
