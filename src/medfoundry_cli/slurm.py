"""Launching training jobs: SLURM through submitit (``medfoundry launch --slurm``) and torchrun command lines.

A SLURM job runs one task per GPU, each task executing ``python -m medfoundry_cli train RECIPE overrides`` via
``srun``; the process-group set-up in :mod:`medfoundry.distributed.setup` reads ``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node list, so no torchrun is needed inside the job. The sbatch text
is rendered by submitit's own renderer (the one its ``SlurmExecutor`` submits with), so a ``--dry-run`` script
is byte-for-byte what a real submission would send, and it is written to ``RUN_DIR/launch/submit.sbatch``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfoundry.errors import UserError

#: Settings accepted as ``key=value`` before the recipe (``medfoundry launch --slurm nodes=2 ... RECIPE``).
SLURM_SETTINGS: dict[str, str] = {
    "nodes": "number of nodes (int)",
    "gpus_per_node": "GPUs per node; one task per GPU (int, 0 = CPU-only job)",
    "tasks_per_node": "tasks per node (int; default gpus_per_node, or 1 without GPUs)",
    "time": "wall-clock limit: minutes, HH:MM:SS or D-HH:MM:SS",
    "partition": "SLURM partition",
    "account": "SLURM account to charge",
    "cpus_per_task": "CPU cores per task (int)",
    "mem": "memory per node, e.g. 200G",
    "qos": "quality of service",
    "constraint": "node feature constraint",
    "job_name": "job name (default medfoundry-<run folder name>)",
}
#: Settings for local/multi-node torchrun launches (``medfoundry launch nodes=2 node_rank=0 ... RECIPE``).
TORCHRUN_SETTINGS: dict[str, str] = {
    "nodes": "number of nodes (torchrun --nnodes)",
    "gpus_per_node": "processes per node (torchrun --nproc-per-node; default: visible GPUs, or 1)",
    "node_rank": "this node's rank (torchrun --node-rank)",
    "rdzv_endpoint": "host:port of the rendezvous (node 0), needed with nodes > 1",
    "rdzv_id": "rendezvous id shared by all nodes (default medfoundry)",
}
_INT_SETTINGS = {"nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "node_rank"}

#: Signal sent before the time limit: the training loop checkpoints on SIGUSR1 and stops cleanly.
PREEMPT_SIGNAL = "USR1@120"

#: Shell lines after ``srun``: a run that exits with the pre-emption code (checkpoint written on every rank,
#: :data:`medfoundry.train.preemption.PREEMPTED_EXIT_CODE`) is requeued; the requeued job resumes it.
REQUEUE_TEARDOWN = [
    "status=$?",
    'if [ "$status" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then',
    '  echo "medfoundry: pre-empted after a checkpoint (exit 75); requeueing job $SLURM_JOB_ID" >&2',
    '  scontrol requeue "$SLURM_JOB_ID"',
    "fi",
    'exit "$status"',
]


class LaunchError(UserError, ValueError):
    """A launch setting is malformed or missing; the message says what to change."""


def split_launch_tokens(tokens: list[str]) -> tuple[list[str], str, list[str]]:
    """Split ``[key=value ...] RECIPE [override ...]`` into settings, recipe and overrides.

    The recipe is the first token without ``=``; every token before it is a launcher setting.
    """
    for i, tok in enumerate(tokens):
        if "=" not in tok:
            return list(tokens[:i]), tok, list(tokens[i + 1:])
    raise LaunchError("no recipe given: expected [key=value ...] RECIPE [overrides ...]")


def parse_settings(items: list[str], allowed: dict[str, str]) -> dict[str, Any]:
    """``["nodes=2", "time=1:00:00"]`` -> ``{"nodes": 2, "time": "1:00:00"}``, checking names and integer values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise LaunchError(f"launcher setting '{item}' must look like key=value")
        if key not in allowed:
            near = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise LaunchError(f"unknown launcher setting '{key}'{hint} (valid: {', '.join(allowed)})")
        if key in _INT_SETTINGS:
            try:
                out[key] = int(value)
            except ValueError:
                raise LaunchError(f"launcher setting '{key}' expects an integer, got {value!r}") from None
            if out[key] < 0:
                raise LaunchError(f"launcher setting '{key}' must be >= 0, got {value!r}")
        else:
            out[key] = value.strip()
    return out


def parse_time_minutes(text: str | int) -> int:
    """A SLURM time limit (``90``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in whole minutes."""
    raw = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", raw)
    if not m:
        raise LaunchError(f"time={raw!r} is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total_s = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(parts) == 1:
        total_s = parts[0] * 60
    elif len(parts) == 2:  # MM:SS
        total_s = parts[0] * 60 + parts[1]
    else:
        total_s = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    minutes = math.ceil(total_s / 60)
    if minutes < 1:
        raise LaunchError(f"time={raw!r} must be at least one minute")
    return minutes


def parse_slurm_opts(opts: list[str]) -> dict[str, Any]:
    """Extra sbatch options (``qos=high``, ``--exclusive``, ``gres=gpu:a100:4``) as an sbatch parameter mapping."""
    out: dict[str, Any] = {}
    for opt in opts:
        opt = opt.strip()
        key, sep, value = opt.lstrip("-").partition("=")
        key = key.strip().replace("_", "-")
        if not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", key):
            raise LaunchError(f"--slurm-opt '{opt}' must look like name=value or a bare flag name")
        out[key] = value if sep else True
    return out


@dataclass
class SlurmSpec:
    """Resources and environment of one SLURM job (or of each job of an array)."""

    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None
    time: str = "60"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # further sbatch options (--slurm-opt)
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, venv activation)
    python: str = field(default_factory=lambda: shlex.quote(sys.executable))

    @classmethod
    def from_settings(cls, settings: dict[str, Any], slurm_opts: Sequence[str] = (), setup: Sequence[str] = (),
                      python: str | None = None) -> SlurmSpec:
        """Build from :func:`parse_settings` output plus ``--slurm-opt`` / ``--setup`` values."""
        spec = cls(**settings, extra=parse_slurm_opts(list(slurm_opts)), setup=list(setup))
        if python:
            spec.python = python
        parse_time_minutes(spec.time)  # fail early on a malformed limit
        if spec.nodes < 1:
            raise LaunchError("nodes must be >= 1")
        return spec

    @property
    def ntasks_per_node(self) -> int:
        """One task per GPU unless ``tasks_per_node`` says otherwise."""
        if self.tasks_per_node:
            return self.tasks_per_node
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        """Total number of training processes."""
        return self.nodes * self.ntasks_per_node

    def setup_lines(self) -> list[str]:
        """Shell lines before ``srun``: the user's set-up, then a job-unique rendezvous address and port."""
        return [
            *self.setup,
            "# rendezvous for the process group (read by medfoundry.distributed.setup in every task)",
            'if command -v scontrol >/dev/null 2>&1; then',
            '  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            "  export MASTER_ADDR",
            "fi",
            "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        ]

    def parameters(self, job_name: str, chdir: str | Path | None = None) -> dict[str, Any]:
        """Keyword parameters for ``submitit.SlurmExecutor.update_parameters`` (sbatch names, not submitit's)."""
        params: dict[str, Any] = {
            "job_name": self.job_name or job_name,
            "nodes": self.nodes,
            "ntasks_per_node": self.ntasks_per_node,
            "time": parse_time_minutes(self.time),
            "setup": self.setup_lines(),
            "teardown": list(REQUEUE_TEARDOWN),
            "stderr_to_stdout": False,
        }
        if self.gpus_per_node and "gres" not in self.extra:
            params["gpus_per_node"] = self.gpus_per_node
        for name in ("partition", "account", "cpus_per_task", "mem", "qos", "constraint"):
            value = getattr(self, name)
            if value not in (None, ""):
                params[name] = value
        additional: dict[str, Any] = {"signal": PREEMPT_SIGNAL, "requeue": True}
        if chdir is not None:
            additional["chdir"] = str(chdir)
        additional.update(self.extra)
        params["additional_parameters"] = additional
        return params


def train_command(recipe: str | Path, overrides: list[str], python: str | None = None) -> str:
    """The shell command each task runs: ``python -u -m medfoundry_cli train RECIPE overrides`` (quoted)."""
    python = python or shlex.quote(sys.executable)
    parts = ["-u", "-m", "medfoundry_cli", "train", str(recipe), *overrides]
    return " ".join([python, *(shlex.quote(p) for p in parts)])


def render_sbatch(spec: SlurmSpec, command: str, log_folder: str | Path, job_name: str,
                  chdir: str | Path | None = None, array_size: int | None = None) -> str:
    """The sbatch script submitit would submit for ``command`` (``array_size`` renders a job array)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = spec.parameters(job_name, chdir)
    if array_size is not None:
        params["map_count"] = array_size
    return _make_sbatch_string(command=command, folder=str(log_folder), **params)


def make_executor(spec: SlurmSpec, folder: str | Path, job_name: str, chdir: str | Path | None = None):
    """A configured ``submitit.SlurmExecutor`` (raises :class:`LaunchError` off a SLURM cluster)."""
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=str(folder), python=spec.python)
    except RuntimeError as err:
        raise LaunchError(f"cannot submit to SLURM here ({err}); use --dry-run to only write the script") from err
    executor.update_parameters(**spec.parameters(job_name, chdir))
    return executor


@dataclass
class LaunchResult:
    """What :func:`launch_slurm` did."""

    run_dir: Path
    script_path: Path
    script: str
    job_id: str | None = None


def launch_slurm(recipe: str | Path, overrides: list[str], spec: SlurmSpec, dry_run: bool = False,
                 chdir: str | Path | None = None) -> LaunchResult:
    """Validate the config, write ``RUN_DIR/launch/submit.sbatch`` and (unless ``dry_run``) submit it with submitit.

    ``RUN_DIR`` is the resolved ``output_dir`` of the recipe plus overrides; a config error is raised before
    anything is written or submitted.
    """
    from medfoundry.config import load_config

    recipe = Path(recipe).resolve()
    cfg = load_config(recipe, overrides)
    chdir = Path(chdir or Path.cwd()).resolve()
    run_dir = Path(cfg.output_dir)
    run_dir = run_dir if run_dir.is_absolute() else chdir / run_dir
    launch_dir = run_dir / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    job_name = f"medfoundry-{run_dir.name}"
    command = train_command(recipe, overrides, spec.python)
    script_path = launch_dir / "submit.sbatch"
    script = render_sbatch(spec, command, launch_dir, job_name, chdir)
    if dry_run:
        script_path.write_text(script)
        return LaunchResult(run_dir, script_path, script)

    executor = make_executor(spec, launch_dir, job_name, chdir)
    job = executor._submit_command(command)  # submits exactly this command line through sbatch
    submitted = Path(job.paths.submission_file)
    if submitted.is_file():
        script = submitted.read_text()
    script_path.write_text(script)
    record = {"job_id": str(job.job_id), "command": command, "nodes": spec.nodes, "world_size": spec.world_size,
              "recipe": str(recipe), "overrides": list(overrides)}
    (launch_dir / "job.json").write_text(json.dumps(record, indent=2))
    return LaunchResult(run_dir, script_path, script, str(job.job_id))


def torchrun_command(recipe: str | Path, overrides: list[str], nodes: int = 1, gpus_per_node: int | None = None,
                     node_rank: int = 0, rdzv_endpoint: str | None = None, rdzv_id: str = "medfoundry",
                     python: str | None = None) -> list[str]:
    """The ``torchrun`` (``python -m torch.distributed.run``) argument list for this node of a run.

    One node: ``--standalone``. Several nodes: torchrun's default static rendezvous, so each node passes its
    own ``node_rank`` and all pass node 0's ``rdzv_endpoint`` (``HOST:PORT``).
    """
    if gpus_per_node is None:
        import torch

        gpus_per_node = torch.cuda.device_count() or 1
    if nodes > 1 and not rdzv_endpoint:
        raise LaunchError("a multi-node torchrun launch needs rdzv_endpoint=HOST:PORT (node 0's address)")
    if not 0 <= node_rank < nodes:
        raise LaunchError(f"node_rank={node_rank} must be in [0, {nodes - 1}]")
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
           f"--nproc-per-node={max(1, gpus_per_node)}"]
    if nodes > 1:  # static rendezvous: ranks follow node_rank, node 0 hosts the store at rdzv_endpoint
        cmd += [f"--node-rank={node_rank}", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "medfoundry_cli", "train", str(recipe), *overrides]
