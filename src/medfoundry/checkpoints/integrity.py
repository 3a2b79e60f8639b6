"""Checkpoint integrity: recorded size + SHA-256 at save, verification at resume, quarantine, stale temporaries.

Every single-file checkpoint ``step_XXXXXXXX.pt`` gets a sidecar ``step_XXXXXXXX.pt.sha256.json`` written
right after the file is renamed into place; a sharded ``step_XXXXXXXX.dcp`` folder holds a
``checksums.json`` for every file in it, written before the folder is renamed into place. At resume the
newest checkpoint is verified (a flipped byte, a truncation or a zero-byte file is caught here, before any
state is touched); an unusable one is renamed to ``*.corrupt`` (kept for inspection, never deleted) and the
run falls back to the next newest. A checkpoint written before checksums existed (no sidecar) is verified
by reading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from medfoundry.errors import CorruptFileError

SIDECAR_SUFFIX = ".sha256.json"
DCP_MANIFEST = "checksums.json"
_CHUNK = 1 << 22


def file_digest(path: str | Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def sidecar_path(path: str | Path) -> Path:
    """Where the checksum record of a single-file checkpoint lives."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_json_atomic(obj: dict, path: Path) -> None:
    """Write JSON to a temporary file, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def record_file(path: str | Path, digest: dict | None = None) -> None:
    """Write the sidecar of a single-file checkpoint (``digest`` if already computed)."""
    write_json_atomic(digest or file_digest(path), sidecar_path(path))


def record_folder(folder: str | Path) -> None:
    """Write ``checksums.json`` for every file of a sharded checkpoint folder (relative paths)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != DCP_MANIFEST)
    write_json_atomic({str(p.relative_to(folder)): file_digest(p) for p in files}, folder / DCP_MANIFEST)


def verify_checkpoint(path: str | Path) -> str:
    """Check a checkpoint against its recorded size and SHA-256; returns how it was verified.

    Returns ``"checksum"`` when a record matched, ``"unrecorded"`` when there is no record (the caller then
    verifies by loading). Raises :class:`CorruptFileError` naming the file and what is wrong.
    """
    path = Path(path)
    if path.is_dir():
        return _verify_folder(path)
    if not path.is_file():
        raise CorruptFileError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CorruptFileError(f"checkpoint {path} is empty (0 bytes)")
    side = sidecar_path(path)
    if not side.is_file():
        return "unrecorded"
    want = _read_record(side)
    _compare(path, want, file_digest(path) if size == want.get("size") else {"size": size, "sha256": "?"})
    return "checksum"


def _verify_folder(folder: Path) -> str:
    manifest = folder / DCP_MANIFEST
    if not manifest.is_file():
        if not (folder / "meta.pt").is_file():
            raise CorruptFileError(f"sharded checkpoint {folder} has no meta.pt")
        return "unrecorded"
    for rel, want in _read_record(manifest).items():
        f = folder / rel
        if not f.is_file():
            raise CorruptFileError(f"sharded checkpoint {folder}: file {rel} listed in {DCP_MANIFEST} is missing")
        size = f.stat().st_size
        _compare(f, want, file_digest(f) if size == want.get("size") else {"size": size, "sha256": "?"})
    return "checksum"


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptFileError(f"checksum record {path} is unreadable ({err})") from err
    if not isinstance(record, dict):
        raise CorruptFileError(f"checksum record {path} is not a JSON object")
    return record


def _compare(path: Path, want: dict, got: dict) -> None:
    if got["size"] != want.get("size"):
        raise CorruptFileError(f"checkpoint file {path} has {got['size']} bytes, {want.get('size')} were written "
                               "(truncated or overwritten)")
    if got["sha256"] != want.get("sha256"):
        raise CorruptFileError(f"checkpoint file {path} fails its SHA-256 check (its bytes changed after the save)")


def quarantine(path: str | Path) -> Path:
    """Rename a bad checkpoint (and its sidecar) to ``*.corrupt`` so it is kept but never resumed from."""
    path = Path(path)
    target = path.with_name(path.name + ".corrupt")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt{n}")
        n += 1
    os.replace(path, target)
    side = sidecar_path(path)
    if side.exists():
        os.replace(side, sidecar_path(target))
    return target


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files/folders an interrupted save left in ``folder`` (``.NAME.tmp*``); returns them.

    Only names this package writes are touched: dot-prefixed and containing ``.tmp``. Call it before the
    run writes anything, on the main rank only.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if not (p.name.startswith(".") and ".tmp" in p.name):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
