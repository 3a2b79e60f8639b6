"""Atomic, rotating, checksummed training checkpoints and RNG-state capture for exact resume."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfoundry.checkpoints.integrity import record_file, record_folder, sidecar_path
from medfoundry.errors import UserError
from medfoundry.safe_load import load_torch_file


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permissions); earlier checkpoints are intact."""


_NAME = re.compile(r"^step_(\d{8})\.(pt|dcp)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are ignored)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


BEST_NAMES = ("best.pt", "best.dcp")  # the best checkpoint: one file, or a sharded folder written under FSDP


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete sharded (FSDP, ``torch.distributed.checkpoint``) checkpoint folder
    (``step_XXXXXXXX.dcp/`` or ``best.dcp/``): the main rank writes its ``meta.pt`` last, before the rename."""
    path = Path(path)
    return path.is_dir() and (path / "meta.pt").is_file()


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """A run's best checkpoint (``RUN/best.pt``, or the sharded ``RUN/best.dcp/`` an FSDP run writes), or None.

    Writing one removes the other; should both exist (a crash between the two), ``best.json``'s
    ``checkpoint`` field names the current one.
    """
    run_dir = Path(run_dir)
    found = [run_dir / n for n in BEST_NAMES if (run_dir / n).is_file() or is_sharded_checkpoint(run_dir / n)]
    if len(found) > 1:
        import json

        try:
            named = json.loads((run_dir / "best.json").read_text()).get("checkpoint")
        except (OSError, ValueError):
            named = None
        found = [f for f in found if f.name == named] or found
    return found[0] if found else None


def is_best_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a run folder's best checkpoint (``best.pt`` or ``best.dcp``), so its run is its parent."""
    return Path(path).name in BEST_NAMES


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a truncated one. A write
    that fails (disk full, file-size limit) removes its temporary file and raises
    :class:`CheckpointWriteError` naming the file; what was written before stays intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            raise CheckpointWriteError(
                f"could not write {path}: {err}. Nothing already saved was touched; free disk space (or fix "
                "the folder's permissions) and rerun the same command to resume from the last checkpoint."
            ) from err
        raise
    return path


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` plus its checksum record; keep the newest ``keep_last``."""
    path = atomic_torch_save(state, checkpoint_dir(run_dir) / f"step_{step:08d}.pt")
    record_file(path)
    prune_checkpoints(run_dir, keep_last)
    return path


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (files or sharded folders)."""
    existing = list_checkpoints(run_dir)
    for old in existing[: max(0, len(existing) - max(1, keep_last))]:
        remove_checkpoint(old)


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint: a sharded folder, or a file with its checksum sidecar (nothing if absent)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        sidecar_path(path).unlink(missing_ok=True)


def save_sharded_checkpoint(run_dir: str | Path, step: int, tensors: dict, meta: dict, keep_last: int,
                            is_main: bool) -> Path:
    """Save a sharded (FSDP) checkpoint with torch.distributed.checkpoint, atomically.

    Every rank writes its shards of ``tensors`` (``{"method": ..., "optimizer": ...}`` state dicts with
    DTensors) into a temporary folder; the main rank adds ``meta.pt`` (step, RNG states, config) and
    renames the folder to ``step_XXXXXXXX.dcp`` once all ranks are done. A run can resume from it on
    any number of ranks (DCP reshards on load), including one process.
    """
    final = save_sharded_folder(checkpoint_dir(run_dir) / f"step_{step:08d}.dcp", tensors, meta, is_main)
    if is_main:
        prune_checkpoints(run_dir, keep_last)
    _barrier()
    return final


def save_sharded_folder(final: str | Path, tensors: dict, meta: dict, is_main: bool) -> Path:
    """Write ``tensors`` (state dicts holding DTensors) as a ``torch.distributed.checkpoint`` folder, atomically.

    A collective: every rank writes only its own shards (no rank gathers the full state) into ``.NAME.tmp``
    beside ``final``; the main rank then adds ``meta.pt`` (the non-tensor fields), records the files'
    checksums and renames the folder to ``final``, replacing an older one. A crash leaves the old folder.
    """
    import torch.distributed.checkpoint as dcp

    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    if is_main:
        atomic_torch_save(meta, tmp / "meta.pt")
        record_folder(tmp)  # after every rank's shards are complete (dcp.save ends in a collective)
    _barrier()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    _barrier()
    return final


def _barrier() -> None:
    """``dist.barrier()`` when a process group is up (a one-process run has nothing to wait for)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str | Path) -> dict:
    """Load a medfoundry training checkpoint on the CPU as one dict.

    A sharded ``.dcp`` folder is consolidated into full tensors (``dcp_to_torch_save``) and merged
    with its ``meta.pt``. Read with the restricted unpickler (:func:`medfoundry.safe_load.load_torch_file`):
    a file that would run code is refused, never loaded.
    """
    path = Path(path)
    if path.is_dir():
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            full = Path(tmp) / "full.pt"
            dcp_to_torch_save(str(path), str(full))
            state = load_torch_file(full, "consolidated checkpoint")
        state.update(load_torch_file(path / "meta.pt", "checkpoint metadata"))
        return state
    return load_torch_file(path, "checkpoint")


def consolidate_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a sharded ``.dcp`` checkpoint (or copy a ``.pt`` one) as one ``.pt`` file for export."""
    return atomic_torch_save(load_checkpoint(path), out)


def capture_rng() -> dict:
    """RNG states of torch (CPU and CUDA), numpy and Python's ``random``."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Restore what :func:`capture_rng` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
