"""Grid sweeps over config overrides: expand ``key=a,b`` and run the arms (the results table: ``sweep_results``).

``expand_grid(["dino.center_momentum=0.9,0.999", "train.steps=20"])`` gives two arms; each arm trains into
``SWEEP_DIR/arm_XX_<key>-<value>...`` either in this process one after another (:func:`run_local`) or as a
submitit job array (:func:`submit_array`). :mod:`medfoundry_cli.sweep_results` tabulates them (``results.csv``,
``results.md``).

An arm's status is ``ok``, ``failed`` or ``interrupted``: stopped by SIGTERM/SIGUSR1 (pre-emption), after the loop
wrote a checkpoint at the end of the current step. An interrupted arm is not done: running the sweep again resumes
it from that checkpoint. Locally a signal also stops the sweep, so a pre-empted sweep starts no further arm.

Commas inside brackets, braces or quotes do not split values: ``crops.global_scale=[0.3,1.0],[0.5,1.0]`` is
two arms, ``crops.global_scale=[0.4,1.0]`` is one. For a list-typed key without brackets (``crops.mean=0.5,0.5``)
the whole value is one list, as in ``medfoundry train``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_origin

from medfoundry.config.loader import ConfigError, split_override

if TYPE_CHECKING:
    from medfoundry_cli.slurm import SlurmSpec

ARM_RECORD = "sweep_arm.json"
PLAN_FILE = "sweep.json"


@dataclass
class Arm:
    """One point of the grid."""

    index: int
    name: str
    swept: dict[str, str]  # the grid values of this arm, key -> raw value
    overrides: list[str]  # everything passed to load_config, output_dir included
    output_dir: str

    @property
    def label(self) -> str:
        """The swept overrides as ``key=value key=value``."""
        return " ".join(f"{k}={v}" for k, v in self.swept.items())


@dataclass
class SweepPlan:
    """A recipe, the fixed overrides, the grid axes and the arms they expand to."""

    recipe: str
    sweep_dir: Path
    fixed: list[str]
    axes: list[tuple[str, list[str]]]
    arms: list[Arm] = field(default_factory=list)

    def save(self) -> Path:
        """Write ``SWEEP_DIR/sweep.json`` (what ``--collect`` reads back)."""
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        data = {"recipe": self.recipe, "sweep_dir": str(self.sweep_dir), "fixed": self.fixed,
                "axes": [[k, v] for k, v in self.axes], "arms": [dataclasses.asdict(a) for a in self.arms]}
        path = self.sweep_dir / PLAN_FILE
        path.write_text(json.dumps(data, indent=2))
        return path

    @classmethod
    def load(cls, sweep_dir: str | Path) -> SweepPlan:
        """Read a plan written by :meth:`save`."""
        path = Path(sweep_dir) / PLAN_FILE
        if not path.is_file():
            raise ConfigError(f"{path} not found: not a sweep folder (run `medfoundry sweep RECIPE ...` first)")
        data = json.loads(path.read_text())
        arms = [Arm(**a) for a in data["arms"]]
        return cls(data["recipe"], Path(data["sweep_dir"]), data["fixed"], [(k, v) for k, v in data["axes"]], arms)


# -- grid expansion ------------------------------------------------------------------------------------------------
def split_values(raw: str) -> list[str]:
    """Split ``a,b,[c,d]`` on top-level commas (not inside ``[]``, ``{}``, ``()`` or quotes)."""
    parts, buf, depth, quote = [], [], 0, ""
    for ch in raw:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf).strip())
    return parts


def _field_type(dotted: str) -> Any:
    """The schema type of a dotted config key in any method's run config, or ``None`` when it is a leaf of none."""
    from medfoundry.config.names import registered_methods, run_config_class

    for method in registered_methods():
        ftype = _leaf_type(run_config_class(method), dotted)
        if ftype is not None:
            return ftype
    return None


def _leaf_type(cls: Any, dotted: str) -> Any:
    """The type of leaf ``dotted`` under dataclass ``cls``, or None."""
    from medfoundry.config.loader import resolved_hints

    ftype: Any = None
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = resolved_hints(cls)
        if part not in hints:
            return None
        ftype = cls = hints[part]
    return None if dataclasses.is_dataclass(ftype) else ftype


def _is_list_type(ftype: Any) -> bool:
    if get_origin(ftype) in (list, tuple):
        return True
    return any(get_origin(a) in (list, tuple) for a in get_args(ftype))


def parse_axis(item: str) -> tuple[str, list[str]]:
    """``key=a,b`` -> ``(key, [a, b])``; one value means a fixed override."""
    key, raw = split_override(item, "sweep override", "key.sub=value or key.sub=a,b,c")
    values = split_values(raw)
    if len(values) > 1 and _is_list_type(_field_type(key)) and not any(v.startswith("[") for v in values):
        values = [raw.strip()]  # a bare comma list for a list-typed key is one value (like `medfoundry train`)
    if any(v == "" for v in values):
        raise ConfigError(f"sweep override '{item}' has an empty value in its comma list")
    return key, values


def _slug(value: str) -> str:
    text = value.strip().strip("'\"")
    text = re.sub(r"[\[\]{}()'\" ]", "", text)
    sign = "-" if text.startswith("-") else ""  # keep a negative number's sign
    text = sign + re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")
    return text[:40] or "empty"


def arm_name(index: int, swept: dict[str, str]) -> str:
    """``arm_00_center_momentum-0.9``: index, then each swept key's last part and value (full key if ambiguous)."""
    lasts = [k.split(".")[-1] for k in swept]
    parts = [f"arm_{index:02d}"]
    for key, value in swept.items():
        short = key.split(".")[-1]
        label = short if lasts.count(short) == 1 else key.replace(".", "-")
        parts.append(f"{label}-{_slug(value)}")
    return "_".join(parts)[:150]


def expand_grid(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]], list[dict[str, str]]]:
    """Split overrides into fixed ones and grid axes; returns ``(fixed, axes, combinations)`` in grid order.

    The first axis varies slowest. Without any comma list there is one combination (an empty dict).
    """
    fixed: list[str] = []
    axes: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for item in overrides:
        key, values = parse_axis(item)
        if key in seen:
            raise ConfigError(f"sweep override key '{key}' is given twice")
        seen.add(key)
        if len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        else:
            axes.append((key, values))
    combos = [dict(zip([k for k, _ in axes], vals)) for vals in itertools.product(*[v for _, v in axes])]
    return fixed, axes, combos


def plan_sweep(recipe: str | Path, overrides: list[str], sweep_dir: str | Path | None = None) -> SweepPlan:
    """Expand the grid and validate every arm's config (a bad arm raises :class:`ConfigError` before any run).

    The sweep folder is ``sweep_dir``, else a fixed ``output_dir=...`` override, else ``<recipe output_dir>_sweep``.
    """
    from medfoundry.config import load_config

    recipe = Path(recipe).resolve()
    fixed, axes, combos = expand_grid(list(overrides))
    if any(k == "output_dir" for k, _ in axes):
        raise ConfigError("output_dir cannot be swept: each arm trains into SWEEP_DIR/arm_XX_...")
    out_fixed = [f for f in fixed if f.split("=", 1)[0] == "output_dir"]
    fixed = [f for f in fixed if f.split("=", 1)[0] != "output_dir"]
    if sweep_dir is None:
        if out_fixed:
            sweep_dir = out_fixed[-1].split("=", 1)[1]
        else:
            sweep_dir = load_config(recipe, fixed).output_dir.rstrip("/") + "_sweep"
    sweep_dir = Path(sweep_dir).resolve()
    plan = SweepPlan(str(recipe), sweep_dir, fixed, axes)
    for i, swept in enumerate(combos):
        name = arm_name(i, swept)
        out = str(sweep_dir / name)
        arm_overrides = [*fixed, *(f"{k}={v}" for k, v in swept.items()), f"output_dir={out}"]
        try:
            load_config(recipe, arm_overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep arm {name}: {err}") from err
        plan.arms.append(Arm(i, name, dict(swept), arm_overrides, out))
    return plan


# -- running -------------------------------------------------------------------------------------------------------
class LoopClock:
    """Notes when the training loop starts, through the loop's hook mechanism (:mod:`medfoundry.train.hooks`).

    ``train()`` calls every hook builder once, after the method, its loader and the evaluation hook modules are
    built and imported and right before the first step; this builder only records that moment and adds no hook.
    """

    def __init__(self) -> None:
        self.started: float | None = None

    def __call__(self, cfg: Any) -> list:
        """Hook builder: record the loop start (``time.perf_counter``), build no hooks."""
        self.started = time.perf_counter()
        return []


@contextlib.contextmanager
def clock_training_loop() -> Iterator[LoopClock]:
    """Register a :class:`LoopClock` as the first hook builder for the duration of the block."""
    from medfoundry.train.hooks import HOOK_BUILDERS

    clock = LoopClock()
    HOOK_BUILDERS.insert(0, clock)  # first, so the other builders' work is timed the same way in every arm
    try:
        yield clock
    finally:
        HOOK_BUILDERS[:] = [b for b in HOOK_BUILDERS if b is not clock]


def run_arm(recipe: str, overrides: list[str], output_dir: str) -> dict:
    """Train one arm in this process (or in each task of a SLURM job); never raises for a failed run.

    The status is ``ok``, ``failed`` (with the error) or ``interrupted`` when a signal stopped the training loop
    early (``stopped_step`` is the step of its last checkpoint; running the arm again resumes from there).
    Writes ``OUTPUT/sweep_arm.json`` (main process) with status, error, wall seconds, setup seconds (both added to
    those of earlier attempts), processes, device type and GPUs; returns the same record. ``wall_s`` is the time of
    the training loop itself, from its start (method and data built) to the end of the run, so one-time costs of
    the process (imports of torch, timm, the method, data and evaluation modules, done by whichever arm runs
    first) do not inflate one arm's GPU-hours; ``setup_s`` is the rest (config, imports, method and loader build).
    A run that fails before its loop starts has ``wall_s`` 0 and its whole time in ``setup_s``.
    """
    import torch

    from medfoundry.config import load_config
    from medfoundry.distributed.setup import cleanup_distributed, env_dist_info
    from medfoundry.precision import resolve_device

    info = env_dist_info()
    out = Path(output_dir)
    previous = read_arm_record(out)
    t0 = time.perf_counter()
    status, error, device_type = "ok", "", "cpu"
    stopped: list[int] = []  # the step at which a signal stopped the loop, if one did
    with clock_training_loop() as clock:
        try:
            cfg = load_config(recipe, overrides)
            device_type = resolve_device(cfg.train.device).type
            from medfoundry.train.loop import train

            train(cfg, on_signal_stop=stopped.append)
        except Exception as err:  # a failed arm is recorded and the sweep goes on
            status, error = "failed", f"{type(err).__name__}: {err}"
        finally:
            cleanup_distributed()
    if status == "ok" and stopped:
        status, error = "interrupted", f"stopped by signal after step {stopped[-1]}; run again to resume"
    end = time.perf_counter()
    started = end if clock.started is None else clock.started
    gpus = info.world_size if device_type == "cuda" and torch.cuda.is_available() else 0
    record = {
        "status": status,
        "error": error,
        "overrides": list(overrides),
        "wall_s": (end - started) + float(previous.get("wall_s", 0.0)),
        "setup_s": (started - t0) + float(previous.get("setup_s", 0.0)),
        "attempts": int(previous.get("attempts", 0)) + 1,
        "stopped_step": stopped[-1] if stopped and status == "interrupted" else None,
        "device": device_type,
        "processes": info.world_size,
        "gpus": gpus,
    }
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (ARM_RECORD + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(out / ARM_RECORD)
    return record


def read_arm_record(output_dir: Path) -> dict:
    path = Path(output_dir) / ARM_RECORD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def arm_done(arm: Arm) -> bool:
    """True when the arm already finished successfully (status ``ok``, not interrupted) with exactly these overrides."""
    rec = read_arm_record(Path(arm.output_dir))
    return rec.get("status") == "ok" and rec.get("overrides") == arm.overrides


def run_local(plan: SweepPlan, rerun: bool = False, log: Callable[[str], Any] = print) -> list[dict]:
    """Run the arms one after another in this process; finished arms are skipped unless ``rerun``.

    A failed arm is recorded and the sweep goes on. An arm stopped by a signal (pre-emption) is recorded as
    ``interrupted`` and the sweep stops there, starting no further arm; running it again resumes that arm from
    its checkpoint. Returns the records of the arms skipped or run so far.
    """
    records = []
    for pos, arm in enumerate(plan.arms):
        if not rerun and arm_done(arm):
            log(f"[{arm.index + 1}/{len(plan.arms)}] {arm.name}: already finished, skipped")
            records.append(read_arm_record(Path(arm.output_dir)))
            continue
        log(f"[{arm.index + 1}/{len(plan.arms)}] {arm.name}: {arm.label or '(no grid values)'}")
        rec = run_arm(plan.recipe, arm.overrides, arm.output_dir)
        if rec["status"] == "ok":
            msg = f"ok in {rec['wall_s']:.1f} s"
        elif rec["status"] == "interrupted":
            msg = f"INTERRUPTED: {rec['error']}"
        else:
            msg = f"FAILED: {rec['error']}"
        log(f"[{arm.index + 1}/{len(plan.arms)}] {arm.name}: {msg}")
        records.append(rec)
        if rec["status"] == "interrupted":
            log(f"sweep stopped by a signal; {len(plan.arms) - pos - 1} arm(s) not started "
                "(run the same command again to resume)")
            break
    return records


def submit_array(plan: SweepPlan, spec: SlurmSpec, dry_run: bool = False, wait: bool = True,
                 log: Callable[[str], Any] = print) -> list[Any]:
    """Submit the arms as one submitit job array (each job runs :func:`run_arm` in every task).

    ``spec`` is a :class:`medfoundry_cli.slurm.SlurmSpec` (resources per arm). The array's sbatch script
    is written to ``SWEEP_DIR/launch/array.sbatch``; with ``dry_run`` nothing is submitted. With ``wait`` the call
    blocks until every job ends; a job that dies without writing an ``ok`` record is recorded as failed, and an
    arm whose loop a signal stopped (``interrupted``) is reported as not finished (submit again to resume it).
    """
    from medfoundry_cli.slurm import make_executor, render_sbatch

    folder = plan.sweep_dir / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    job_name = f"medfoundry-sweep-{plan.sweep_dir.name}"
    command = " ".join([spec.python, "-u -m submitit.core._submit", str(folder)])
    script = render_sbatch(spec, command, folder, job_name, chdir=Path.cwd(), array_size=len(plan.arms))
    (folder / "array.sbatch").write_text(script)
    if dry_run:
        return []
    executor = make_executor(spec, folder, job_name, chdir=Path.cwd())
    executor.update_parameters(array_parallelism=len(plan.arms))
    arms = list(plan.arms)
    jobs = executor.map_array(run_arm, [plan.recipe] * len(arms), [a.overrides for a in arms],
                              [a.output_dir for a in arms])
    (folder / "jobs.json").write_text(json.dumps({a.name: str(j.job_id) for a, j in zip(arms, jobs)}, indent=2))
    log(f"submitted job array {jobs[0].job_id.split('_')[0] if jobs else '-'} with {len(jobs)} arm(s)")
    if not wait:
        return jobs
    for arm, job in zip(arms, jobs):
        try:
            job.result()
        except Exception as err:  # the job died (time limit, node failure): record it unless the arm finished
            if read_arm_record(Path(arm.output_dir)).get("status") != "ok":  # interrupted is not finished either
                Path(arm.output_dir).mkdir(parents=True, exist_ok=True)
                rec = {"status": "failed", "error": f"job {job.job_id}: {type(err).__name__}: {err}"[:2000],
                       "overrides": arm.overrides, "wall_s": 0.0, "device": "?", "processes": spec.world_size,
                       "gpus": spec.nodes * spec.gpus_per_node}
                (Path(arm.output_dir) / ARM_RECORD).write_text(json.dumps(rec, indent=2))
            continue
        rec = read_arm_record(Path(arm.output_dir))
        if rec.get("status") == "interrupted":
            log(f"{arm.name}: interrupted ({rec.get('error', '')}); submit the sweep again to resume it")
    return jobs
