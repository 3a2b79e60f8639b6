"""Process-group set-up for torchrun and SLURM (srun without torchrun)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_dist_info() -> DistInfo:
    """Rank and world size from torchrun's variables, else from SLURM's (srun), else a single process."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init_distributed(backend: str = "auto") -> DistInfo:
    """Initialise the default process group when the job has several processes; idempotent.

    With SLURM but no torchrun, MASTER_ADDR defaults to the first host of the allocation and
    MASTER_PORT to 29500 unless set. ``auto`` uses NCCL when CUDA is available, else gloo.
    """
    info = env_dist_info()
    if not info.enabled or dist.is_initialized():
        return info
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.setdefault("MASTER_ADDR", _slurm_master() or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def _slurm_master() -> str | None:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    first = re.split(r",(?![^\[]*\])", nodes)[0]  # first host expression (commas inside [...] do not split)
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first)  # each range -> first value


def cleanup_distributed() -> None:
    """Destroy the process group if this process created one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def is_main_process() -> bool:
    """True on rank 0 (or without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def say(message: str) -> None:
    """Print ``message`` on rank 0 to stderr without breaking a tqdm progress bar."""
    if not is_main_process():
        return
    import sys

    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(message, file=sys.stderr, flush=True)
