"""One benchmark measurement, peak-memory readings and the table ``medfoundry bench`` prints."""

from __future__ import annotations

import json
import math
import platform
import resource
import sys
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class BenchResult:
    """A measured configuration. Rates are per *image* (a DINO image is all its crops; a CLIP image is one
    image-text pair); FLOP figures are per step; ``mfu`` is measured FLOP/s over ``peak_flops``."""

    mode: str  # model | aug | e2e | clip
    name: str  # what ran, e.g. "dino vit_base_patch16 2x224+8x96"
    device: str
    batch: int
    images_per_s: float
    step_s: float = float("nan")  # seconds per step (or per batch for augmentation)
    flops_counted: float | None = None  # FlopCounterMode count of one step
    flops_analytic: float | None = None  # analytic formula for the same step
    achieved_flops: float | None = None  # flops_counted / step_s
    peak_flops: float | None = None
    peak_source: str = ""
    mfu: float | None = None
    peak_mem_bytes: int | None = None
    peak_mem_source: str = ""
    max_batch: int | None = None
    data_wait_frac: float | None = None
    notes: list[str] = field(default_factory=list)

    def set_flops(self, counted: float | None, analytic: float | None, peak: float | None, peak_source: str) -> None:
        """Fill achieved FLOP/s and MFU from the step time and a peak (None: MFU not available)."""
        self.flops_counted, self.flops_analytic = counted, analytic
        self.peak_flops, self.peak_source = peak, peak_source
        if counted and self.step_s > 0 and math.isfinite(self.step_s):
            self.achieved_flops = counted / self.step_s
            self.mfu = self.achieved_flops / peak if peak else None

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def results_json(results: list[BenchResult], machine: str, **extra) -> str:
    """The results (NaN/inf as null), the machine line and ``extra`` keys as an indented JSON document."""
    payload = {"machine": machine, **extra, "results": [r.as_dict() for r in results]}
    return json.dumps(_json_safe(payload), indent=2)


def report_results(results: list[BenchResult], device: torch.device, json_path: str | None = None, **extra) -> None:
    """Print the results table and, when ``json_path`` is given, write them there as JSON (see :func:`results_json`)."""
    print(format_table(results))
    if json_path:
        from pathlib import Path

        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(results_json(results, describe_machine(device), **extra))
        print(f"wrote {json_path}")


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on CUDA (CPU peaks are process-lifetime and cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what it is): ``torch.cuda.max_memory_allocated`` since the last reset on CUDA, else the
    process's maximum resident set size (``getrusage``; the whole process lifetime, model and data)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(rss * scale), "process max RSS"


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_machine(device: torch.device) -> str:
    """One line naming the device and software the figures come from."""
    from medfoundry_cli.bench.flops import cpu_threads

    cpu = platform.processor() or platform.machine()
    n = torch.get_num_threads()
    line = f"torch {torch.__version__}, {cpu}, {cpu_threads()} CPU cores, {n} torch thread{'s' if n > 1 else ''}"
    if device.type == "cuda":
        line = f"{torch.cuda.get_device_name(device)}; " + line
    return line


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value / scale:.{digits}f}{suffix}"


def _fmt_rate(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def format_table(results: list[BenchResult]) -> str:
    """A fixed-width table of the results, then their notes."""
    head = ["mode", "what", "device", "batch", "images/s", "step ms", "TFLOP/step", "analytic/counted",
            "TFLOP/s", "MFU", "peak mem", "max batch", "data wait"]
    rows = []
    for r in results:
        ratio = (r.flops_analytic / r.flops_counted) if r.flops_analytic and r.flops_counted else None
        rows.append([
            r.mode, r.name, r.device, str(r.batch), _fmt_rate(r.images_per_s), _fmt(r.step_s, 1e-3, 1),
            _fmt(r.flops_counted, 1e12, 4), _fmt(ratio, 1, 3), _fmt(r.achieved_flops, 1e12, 3),
            _fmt(r.mfu, 0.01, 2, "%"), _fmt(r.peak_mem_bytes, 2**30, 2, " GiB"),
            "n/a" if r.max_batch is None else str(r.max_batch),
            _fmt(r.data_wait_frac, 0.01, 1, "%"),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    notes = []
    for r in results:
        extra = [f"MFU vs {r.peak_source}"] if r.peak_source and r.mfu is not None else []
        if r.peak_mem_source:
            extra.append(f"peak mem = {r.peak_mem_source}")
        for n in extra + r.notes:
            line = f"  [{r.mode} {r.name}] {n}"
            if line not in notes:
                notes.append(line)
    if notes:
        lines += ["notes:"] + notes
    return "\n".join(lines)
