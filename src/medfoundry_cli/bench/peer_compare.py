"""medfoundry's training step side by side with the same step built from dinov2's own modules, in one process.

Both steps get the same configuration (backbone architecture, crops, batch, prototypes, iBOT/KoLeo
weights, centering, optimizer settings), the same weights (the peer is loaded from medfoundry's student)
and the same input tensors (the peer's batch is medfoundry's, in dinov2's collate layout). Per side:

* **FLOPs per step**, counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the first step
  (with the CPU flash-attention formulas of :func:`medfoundry_cli.bench.flops.count_flops`), broken down
  by operator so a difference can be named;
* **CPU time per step** (``time.process_time()``: all threads of this process, so a busy machine's other
  jobs do not count) and **wall time per step**, over ``repeats`` alternating A/B blocks of ``steps`` steps
  each, after ``warmup`` untimed steps per side; the median over the blocks is reported, and the ratio
  medfoundry / dinov2 of the medians together with the range of the per-block ratios.

medfoundry's side is :class:`medfoundry_cli.bench.step.TrainStep` (the training loop's body with its host
syncs) around the real :class:`~medfoundry.methods.dino.method.DINOMethod`; the peer's is
:class:`medfoundry_cli.bench.peer_dinov2.Dinov2PeerStep` (dinov2's ``do_train`` body, with its own
``.item()`` syncs). On CPU the CPU-time ratio is the figure; on CUDA the wall-time ratio is.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from medfoundry_cli.bench.results import peak_memory, reset_peak_memory, synchronize
from medfoundry_cli.bench.step import StepSpec, build_dino_step

FLOPS_TOLERANCE = 1e-3  # "equal": within 0.1 %


@dataclass
class Side:
    """One side of the comparison: its per-block timings and counted FLOPs."""

    name: str
    cpu_s: list[float] = field(default_factory=list)  # CPU seconds per step, one value per timed block
    wall_s: list[float] = field(default_factory=list)  # wall seconds per step, one value per timed block
    flops: int = 0  # FlopCounterMode count of one step
    flops_by_op: dict[str, int] = field(default_factory=dict)
    params: int = 0  # trainable (student) parameters
    first_loss: float = float("nan")  # the loss of the counted first step
    peak_mem_bytes: int | None = None  # CUDA: max allocated over this side's timed blocks

    @property
    def cpu_median(self) -> float:
        """Median CPU seconds per step over the timed blocks."""
        return statistics.median(self.cpu_s) if self.cpu_s else float("nan")

    @property
    def wall_median(self) -> float:
        """Median wall seconds per step over the timed blocks."""
        return statistics.median(self.wall_s) if self.wall_s else float("nan")


@dataclass
class PeerComparison:
    """The result of :func:`compare_with_dinov2`: both sides, what ran, and notes explaining any difference."""

    label: str
    device: str
    precision: str
    threads: int
    batch: int
    peer: str  # the peer code line (commit, folder, whether fetched)
    peer_commit: str
    medfoundry: Side
    dinov2: Side
    flops_known_terms: dict[str, int] = field(default_factory=dict)  # op -> FLOPs explained by a named term
    notes: list[str] = field(default_factory=list)

    def cpu_ratio(self) -> float:
        """Median CPU time per step, medfoundry / dinov2."""
        return self.medfoundry.cpu_median / self.dinov2.cpu_median

    def wall_ratio(self) -> float:
        """Median wall time per step, medfoundry / dinov2."""
        return self.medfoundry.wall_median / self.dinov2.wall_median

    def block_ratios(self, kind: str = "cpu") -> list[float]:
        """Per-block ratios medfoundry / dinov2 (blocks paired in the order they ran)."""
        a = self.medfoundry.cpu_s if kind == "cpu" else self.medfoundry.wall_s
        b = self.dinov2.cpu_s if kind == "cpu" else self.dinov2.wall_s
        return [x / y for x, y in zip(a, b)]

    def flops_ratio(self) -> float:
        """Counted FLOPs per step, medfoundry / dinov2."""
        return self.medfoundry.flops / self.dinov2.flops if self.dinov2.flops else float("nan")

    def flops_equal(self, tolerance: float = FLOPS_TOLERANCE) -> bool:
        """Whether the counted FLOPs agree within ``tolerance`` (relative)."""
        return abs(self.flops_ratio() - 1) <= tolerance

    def flops_differences(self) -> list[str]:
        """One line per operator whose FLOPs differ between the sides, with the named term when it is known."""
        lines = []
        ops = sorted(set(self.medfoundry.flops_by_op) | set(self.dinov2.flops_by_op))
        for op in ops:
            diff = self.medfoundry.flops_by_op.get(op, 0) - self.dinov2.flops_by_op.get(op, 0)
            if diff:
                known = self.flops_known_terms.get(op)
                why = (f" = {known:,} FLOPs of medfoundry's DINO loss einsum over (teacher view, student view) "
                       "pairs, a matmul the counter counts; dinov2 loops over the pairs with an elementwise product "
                       "and sum, which it does not" if known == diff else "")
                lines.append(f"{op}: medfoundry {diff:+,}{why}")
        return lines

    def as_dict(self) -> dict:
        """JSON-ready dict, with the ratios."""
        out = asdict(self)
        out.update(cpu_ratio=self.cpu_ratio(), wall_ratio=self.wall_ratio(), flops_ratio=self.flops_ratio(),
                   flops_equal=self.flops_equal(), cpu_block_ratios=self.block_ratios("cpu"),
                   wall_block_ratios=self.block_ratios("wall"), flops_differences=self.flops_differences())
        return out

    def format(self) -> str:
        """The side-by-side table, the ratios, the FLOPs check and the notes."""
        head = ["side", "CPU s/step (median; blocks)", "wall s/step (median)", "TFLOP/step", "params", "peak mem",
                "first-step loss"]
        rows = []
        for s in (self.medfoundry, self.dinov2):
            mem = f"{s.peak_mem_bytes / 2**30:.2f} GiB" if s.peak_mem_bytes else "n/a"
            rows.append([s.name, f"{s.cpu_median:.4g} ({_span(s.cpu_s)})", f"{s.wall_median:.4g}",
                         f"{s.flops / 1e12:.5f}", f"{s.params / 1e6:.2f} M", mem, f"{s.first_loss:.5g}"])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines = [f"peer comparison: {self.label}, batch {self.batch}, {self.device} {self.precision}, "
                 f"{self.threads} torch thread{'s' if self.threads > 1 else ''}",
                 "  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        cpu_blocks, wall_blocks = self.block_ratios("cpu"), self.block_ratios("wall")
        lines.append(f"ratio medfoundry / dinov2: CPU time {self.cpu_ratio():.3f} (blocks {_span(cpu_blocks, 3)}), "
                     f"wall time {self.wall_ratio():.3f} (blocks {_span(wall_blocks, 3)})")
        rel = self.flops_ratio() - 1
        verdict = ("equal within 0.1 %" if self.flops_equal() else "NOT equal within 0.1 %")
        lines.append(f"FLOPs per step: medfoundry {self.medfoundry.flops:,} / dinov2 {self.dinov2.flops:,} = "
                     f"{self.flops_ratio():.6f} ({100 * rel:+.4f} %): {verdict}")
        lines += [f"  {line}" for line in self.flops_differences()]
        lines.append(f"peer code: {self.peer}")
        lines += ["notes:"] + [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def _span(values: list[float], digits: int = 3) -> str:
    if not values:
        return "n/a"
    return f"{min(values):.{digits}g}-{max(values):.{digits}g}" if len(values) > 1 else f"{values[0]:.{digits}g}"


def count_flops_by_op(fn: Callable[[], object]) -> tuple[int, dict[str, int], object]:
    """(total FLOPs, FLOPs per aten operator, ``fn()``'s result) under ``FlopCounterMode`` with the CPU
    flash-attention formulas :func:`medfoundry_cli.bench.flops.count_flops` uses."""
    from torch.utils.flop_counter import FlopCounterMode

    from medfoundry_cli.bench.flops import _cpu_sdpa_mapping

    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
        out = fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op, out


def time_alternating(sides: list[tuple[Side, Callable[[int], object]]], device: torch.device, repeats: int,
                     steps: int, warmup: int, first_step: int = 1) -> None:
    """Fill each side's ``cpu_s`` / ``wall_s``: ``warmup`` untimed steps per side, then ``repeats`` blocks of
    ``steps`` steps per side, alternating which side runs first (A B, B A, ...) so drifts of a shared machine
    fall on both. Each block is synchronised; each side keeps its own step counter."""
    counters = {id(s): first_step for s, _ in sides}

    def run(side: Side, fn: Callable[[int], object], n: int) -> None:
        for _ in range(n):
            fn(counters[id(side)])
            counters[id(side)] += 1

    for side, fn in sides:
        run(side, fn, warmup)
    synchronize(device)
    for r in range(repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        for side, fn in order:
            reset_peak_memory(device)
            c0, w0 = time.process_time(), time.perf_counter()
            run(side, fn, steps)
            synchronize(device)
            side.cpu_s.append((time.process_time() - c0) / steps)
            side.wall_s.append((time.perf_counter() - w0) / steps)
            if device.type == "cuda":
                mem, _ = peak_memory(device)
                side.peak_mem_bytes = max(side.peak_mem_bytes or 0, mem)


def dino_loss_einsum_flops(n_teacher: int, n_student: int, batch: int, prototypes: int) -> int:
    """FLOPs the counter books for medfoundry's ``einsum("tbk,sbk->ts")`` in :class:`medfoundry.losses.DINOLoss`:
    forward ``2 t s B K`` and the student-side gradient another ``2 t s B K`` (the targets need none)."""
    return 4 * n_teacher * n_student * batch * prototypes


def compare_with_dinov2(spec: StepSpec, peer_path: str | None = None, fetch: bool = True, repeats: int = 4,
                        steps: int = 1, warmup: int = 1) -> PeerComparison:
    """Build medfoundry's step and dinov2's for ``spec`` and measure both (see the module docstring)."""
    from medfoundry_cli.bench.peer_code import import_dinov2, locate_dinov2
    from medfoundry_cli.bench.peer_dinov2 import Dinov2PeerStep, dinov2_batch

    code = locate_dinov2(peer_path, fetch=fetch)  # first: an offline machine fails before building anything
    mods = import_dinov2(code)
    setup = build_dino_step(spec)
    cfg, device, precision, method, step, batch = (setup.cfg, setup.device, setup.precision, setup.method,
                                                   setup.step, setup.batch)
    backbone = method.student["backbone"]
    peer = Dinov2PeerStep(cfg, backbone, device, precision, mods)
    peer.load_medfoundry_student(method.student)
    peer_batch = dinov2_batch(batch)

    ours = Side("medfoundry", params=sum(p.numel() for p in method.student.parameters()))
    theirs = Side("dinov2", params=peer.parameter_count())
    ours.flops, ours.flops_by_op, loss = count_flops_by_op(lambda: step(batch, 0))
    ours.first_loss = float(loss)
    theirs.flops, theirs.flops_by_op, loss = count_flops_by_op(lambda: peer(peer_batch, 0))
    theirs.first_loss = float(loss)
    time_alternating([(ours, lambda i: step(batch, i)), (theirs, lambda i: peer(peer_batch, i))], device,
                     repeats, steps, warmup)

    c, d = cfg.crops, cfg.dino
    n_students = c.n_global + c.n_local
    einsum = dino_loss_einsum_flops(c.n_global, n_students, spec.batch, d.head.out_dim)
    mm_ops = {op: einsum for op in set(ours.flops_by_op) | set(theirs.flops_by_op) if op.endswith(("mm", "bmm"))}
    n = torch.get_num_threads()
    result = PeerComparison(
        label=f"{spec.label()}, {d.head.out_dim} prototypes, DINO + iBOT ({d.ibot_weight:g}) + KoLeo "
              f"({d.koleo_weight:g}), {d.centering}", device=str(device), precision=precision, threads=n,
        batch=spec.batch, peer=code.describe(), peer_commit=code.commit, medfoundry=ours, dinov2=theirs,
        flops_known_terms=mm_ops)
    masked = int(peer_batch["n_masked_patches"].item())
    result.notes += [
        f"same weights (the peer starts from medfoundry's student), same crops and the same {masked} iBOT-masked "
        "patches (medfoundry's block masks, in dinov2's collate layout, head buffer = masked count)",
        f"timing: {warmup} untimed step(s) per side, then {repeats} alternating blocks of {steps} step(s) per side; "
        "CPU time = time.process_time() (all threads of this process); medians over the blocks",
        "medfoundry side: the training loop's body (TrainStep: StepOutputs.forward_backward, the loop's "
        "train.step.update; finite/stop flags as train.nonfinite_check=auto: read on the host on a CPU, kept on "
        "the device on a GPU; no metric read, as a non-logging step) around "
        "DINOMethod; dinov2 side: do_train's body around "
        "SSLMetaArch.forward_backward's code (loss .item()s + NaN check)",
        "dinov2 without xFormers: MemEffAttention falls back to its plain Attention (torch SDPA); the nested "
        "student call runs as two backbone passes (global, local) -- the same FLOPs",
        "first-step losses agree only up to the position-embedding resampling of the local crops (timm: bicubic "
        "to size; dinov2: bicubic with a 0.1 scale offset); with global size = local size they are equal",
    ]
    if ours.params != theirs.params:
        result.notes.append(f"student parameter counts differ: medfoundry {ours.params:,}, dinov2 {theirs.params:,}")
    frozen = sum(p.numel() for p in method.student.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in peer.student.parameters() if p.requires_grad)
    if frozen:
        result.notes.append(f"trained parameters: medfoundry {ours.params - frozen:,}, dinov2 {trainable:,}: "
                            "medfoundry keeps the prototypes' weight-norm gains fixed at 1 (DINO's norm_last_layer), "
                            "dinov2's DINOHead trains them (no FLOPs; a few more AdamW elements)")
    if mods.warnings:
        result.notes.append("dinov2 said on import: " + "; ".join(mods.warnings))
    return result
