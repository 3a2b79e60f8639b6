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

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from medfoundry_cli.bench.results import peak_memory, reset_peak_memory, synchronize
from medfoundry_cli.bench.step import DinoStepSetup, StepSpec, build_dino_step

FLOPS_TOLERANCE = 1e-3  # "equal": within 0.1 %


@dataclass
class Side:
    """One side of the comparison: its per-block timings and counted FLOPs."""

    name: str
    cpu_s: list[float] = field(default_factory=list)  # CPU seconds per step, one value per timed block
    wall_s: list[float] = field(default_factory=list)  # wall seconds per step, one value per timed block
    user_s: list[float] = field(default_factory=list)  # user CPU seconds per step (getrusage), per block
    sys_s: list[float] = field(default_factory=list)  # system (kernel) CPU seconds per step (getrusage), per block
    minflt: list[float] = field(default_factory=list)  # minor page faults per step (getrusage), per block
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

    def add_block(self, block: dict[str, float]) -> None:
        """Append one timed block (:func:`time_block`'s per-step figures)."""
        for key in ("cpu_s", "wall_s", "user_s", "sys_s", "minflt"):
            getattr(self, key).append(block[key])

    def median_of(self, key: str) -> float:
        """Median of one per-block figure (``user_s``, ``sys_s``, ``minflt``, ...); nan when none was taken."""
        values = getattr(self, key)
        return statistics.median(values) if values else float("nan")


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
        head = ["side", "CPU s/step (median; blocks)", "wall s/step (median)", "user / sys s/step", "minor faults/step",
                "TFLOP/step", "params", "peak mem", "first-step loss"]
        rows = []
        for s in (self.medfoundry, self.dinov2):
            mem = f"{s.peak_mem_bytes / 2**30:.2f} GiB" if s.peak_mem_bytes else "n/a"
            rows.append([s.name, f"{s.cpu_median:.4g} ({_span(s.cpu_s)})", f"{s.wall_median:.4g}",
                         f"{s.median_of('user_s'):.3g} / {s.median_of('sys_s'):.3g}", f"{s.median_of('minflt'):,.0f}",
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


def time_block(fn: Callable[[], object], steps: int, device: torch.device) -> dict[str, float]:
    """Run ``fn`` ``steps`` times, synchronised at the end, and return per-step CPU time (``time.process_time``),
    wall time, user and system time and minor page faults (``getrusage`` of this process)."""
    u0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    u1, c1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    return {"cpu_s": (c1 - c0) / steps, "wall_s": (w1 - w0) / steps, "user_s": (u1.ru_utime - u0.ru_utime) / steps,
            "sys_s": (u1.ru_stime - u0.ru_stime) / steps, "minflt": (u1.ru_minflt - u0.ru_minflt) / steps}


def time_alternating(sides: list[tuple[Side, Callable[[int], object]]], device: torch.device, repeats: int,
                     steps: int, warmup: int, first_step: int = 1) -> None:
    """Fill each side's per-block figures: ``warmup`` untimed steps per side, then ``repeats`` blocks of ``steps``
    steps per side, alternating which side runs first (A B, B A, ...) so drifts of a shared machine fall on both.
    Each block is synchronised; each side keeps its own step counter."""
    counters = {id(s): first_step for s, _ in sides}

    def one(side: Side, fn: Callable[[int], object]) -> None:
        fn(counters[id(side)])
        counters[id(side)] += 1

    for side, fn in sides:
        for _ in range(warmup):
            one(side, fn)
    synchronize(device)
    for r in range(repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        for side, fn in order:
            reset_peak_memory(device)
            side.add_block(time_block(lambda side=side, fn=fn: one(side, fn), steps, device))
            if device.type == "cuda":
                mem, _ = peak_memory(device)
                side.peak_mem_bytes = max(side.peak_mem_bytes or 0, mem)


def dino_loss_einsum_flops(n_teacher: int, n_student: int, batch: int, prototypes: int) -> int:
    """FLOPs the counter books for medfoundry's ``einsum("tbk,sbk->ts")`` in :class:`medfoundry.losses.DINOLoss`:
    forward ``2 t s B K`` and the student-side gradient another ``2 t s B K`` (the targets need none)."""
    return 4 * n_teacher * n_student * batch * prototypes


@dataclass
class PeerSetup:
    """Both steps of the comparison, built from one seed: medfoundry's (``setup``: the loop's step around the real
    DINO method, with its batch) and dinov2's (``peer``, loaded from medfoundry's student, with ``peer_batch``: the
    same tensors in dinov2's collate layout)."""

    code: Any  # medfoundry_cli.bench.peer_code.PeerCode
    mods: Any  # medfoundry_cli.bench.peer_code.Dinov2Modules
    setup: DinoStepSetup
    peer: Any  # medfoundry_cli.bench.peer_dinov2.Dinov2PeerStep
    peer_batch: dict

    def step_fn(self, side: str) -> Callable[[int], object]:
        """The step of ``side`` (``medfoundry`` or ``dinov2``) as a function of the step index."""
        if side == "medfoundry":
            return lambda i: self.setup.step(self.setup.batch, i)
        if side == "dinov2":
            return lambda i: self.peer(self.peer_batch, i)
        raise ValueError(f"unknown side {side!r}: expected 'medfoundry' or 'dinov2'")


def build_peer_setup(spec: StepSpec, peer_path: str | None = None, fetch: bool = True) -> PeerSetup:
    """Locate (and, with ``fetch``, clone) dinov2's code first, so an offline machine fails before building anything,
    then build both steps for ``spec``."""
    from medfoundry_cli.bench.peer_code import import_dinov2, locate_dinov2
    from medfoundry_cli.bench.peer_dinov2 import Dinov2PeerStep, dinov2_batch

    code = locate_dinov2(peer_path, fetch=fetch)
    mods = import_dinov2(code)
    setup = build_dino_step(spec)
    peer = Dinov2PeerStep(setup.cfg, setup.method.student["backbone"], setup.device, setup.precision, mods)
    peer.load_medfoundry_student(setup.method.student)
    return PeerSetup(code, mods, setup, peer, dinov2_batch(setup.batch))


def compare_with_dinov2(spec: StepSpec, peer_path: str | None = None, fetch: bool = True, repeats: int = 4,
                        steps: int = 1, warmup: int = 1, isolate: bool = False) -> PeerComparison:
    """Build medfoundry's step and dinov2's for ``spec`` and measure both (see the module docstring). With
    ``isolate`` the timed blocks run in fresh processes, one side each (:mod:`medfoundry_cli.bench.peer_isolated`);
    the FLOPs and first-step losses are still counted here."""
    built = build_peer_setup(spec, peer_path, fetch)
    code, mods, peer, peer_batch = built.code, built.mods, built.peer, built.peer_batch
    cfg, device, precision, method = built.setup.cfg, built.setup.device, built.setup.precision, built.setup.method

    ours = Side("medfoundry", params=sum(p.numel() for p in method.student.parameters()))
    theirs = Side("dinov2", params=peer.parameter_count())
    steps_of = [(ours, built.step_fn("medfoundry")), (theirs, built.step_fn("dinov2"))]
    for side, fn in steps_of:
        side.flops, side.flops_by_op, loss = count_flops_by_op(lambda fn=fn: fn(0))
        side.first_loss = float(loss)
    if isolate:
        from medfoundry_cli.bench.peer_isolated import time_in_processes

        time_in_processes([ours, theirs], spec, code.root, repeats, steps, warmup)
    else:
        time_alternating(steps_of, device, repeats, steps, warmup)

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
        (f"timing: {repeats} alternating blocks of {steps} step(s) per side, each in a fresh process holding only its "
         f"side's step (after {warmup} untimed step(s) there): no shared allocator heap" if isolate else
         f"timing: {warmup} untimed step(s) per side, then {repeats} alternating blocks of {steps} step(s) per side, "
         "in this one process (both sides share its allocator heap)")
        + "; CPU time = time.process_time() (all threads of the process); medians over the blocks",
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
