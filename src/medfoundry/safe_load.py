"""Read ``torch.save`` files without running code from them.

Every weights, checkpoint, anchor, teacher or cache file that a user can hand to medfoundry goes through
:func:`load_torch_file`, which uses ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler) with
an explicit allow-list: only the numpy types that older medfoundry checkpoints used for RNG states. A file
that needs any other global is refused with :class:`~medfoundry.errors.UnsafeFileError`, whose message
names the globals and says how to convert the file; there is no silent fallback. A user who wrote the file
themselves can opt in to the unsafe reader explicitly with ``MEDFOUNDRY_TRUST_PICKLE=1`` (or the CLI's
``--trust-pickle``), off by default.

TorchScript archives (OpenAI's released CLIP ``.pt`` files) are not pickles of plain data: ``torch.jit.load``
compiles the code stored in the archive and runs its ``__setstate__`` methods while loading, and that code
can touch the file system (``torch.from_file`` creates files). :func:`load_torchscript` therefore needs the
same explicit trust; :func:`load_torch_file` refuses such an archive with :class:`UnsafeFileError`.

:func:`convert_legacy_file` (``medfoundry convert IN OUT``) rewrites a trusted legacy file as
plain data (dicts, lists, tensors, numpy arrays) that loads safely from then on.
"""

from __future__ import annotations

import argparse  # Namespace objects stored in checkpoints (to_plain_data)
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medfoundry.errors import CorruptFileError, UnsafeFileError

TRUST_ENV = "MEDFOUNDRY_TRUST_PICKLE"

def convert_hint(path: str | Path) -> str:
    """How to make a trusted legacy pickle load safely: the converter command for this file, or the opt-in."""
    path = Path(path)
    out = path.with_name(f"{path.stem}.safe{path.suffix or '.pt'}")
    return (
        "If you trust the file (you or a colleague wrote it), convert it once into plain data that loads safely:\n"
        f"  medfoundry convert {path} {out}\n"
        "and use the new file, or load it as it is with --trust-pickle "
        f"(environment {TRUST_ENV}=1). Never do either for a file from an unknown source."
    )


def torchscript_hint(path: str | Path) -> str:
    """How to use a trusted TorchScript archive: the opt-in, or a one-off conversion to safetensors."""
    path = Path(path)
    out = path.with_suffix(".safetensors")
    return (
        "If you trust the archive (e.g. OpenAI's CLIP release, checked against its published SHA256), load it "
        f"with --trust-pickle (environment {TRUST_ENV}=1), or convert it once into a safetensors file and use "
        "that:\n"
        f"  python -c \"import torch, safetensors.torch as st; sd = torch.jit.load('{path}').state_dict(); "
        f"st.save_file({{k: v.clone().contiguous() for k, v in sd.items()}}, '{out}')\""
    )


CONVERT_HINT = convert_hint("IN.pt")  # the generic wording, for callers without a path at hand

_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def numpy_safe_globals() -> list:
    """The numpy globals allowed when unpickling: what an RNG state or a numpy array/scalar needs.

    ``np.random.get_state()`` is a tuple holding a uint32 array; older medfoundry checkpoints stored it as
    it is. Arrays are rebuilt by numpy's ``_reconstruct``; their items still pass the restricted unpickler.
    """
    import numpy as np

    found: list = [np.ndarray, np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["_reconstruct"])
        except ImportError:
            continue
        found += [getattr(module, name) for name in ("_reconstruct", "scalar") if hasattr(module, name)]
        break
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and not n.startswith("_")
                  and n not in ("ObjectDType", "VoidDType")]
    return found


def trust_pickle_requested() -> bool:
    """Whether the user opted in to the unsafe (code-running) reader for trusted legacy files."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _trusted(trust: bool | None) -> bool:
    """``trust`` when given, else the user's opt-in (:func:`trust_pickle_requested`)."""
    return trust if trust is not None else trust_pickle_requested()


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript (``torch.jit.save``) archive: a zip holding ``constants.pkl`` and code."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.split("/", 1)[-1] == "constants.pkl" for n in names)


def _check_present(path: Path, what: str) -> None:
    """Raise :class:`CorruptFileError` for a missing or empty file (before any reader sees it)."""
    if not path.is_file():
        raise CorruptFileError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{what} {path} is empty (0 bytes): the write that produced it did not finish")


def load_torch_file(path: str | Path, what: str = "file", trust: bool | None = None) -> Any:
    """Load a ``torch.save`` file on the CPU with the restricted unpickler; refuse what would run code.

    Args:
        path: the file.
        what: what the file is for, named in errors ("pretrained weights", "checkpoint", ...).
        trust: read with ``weights_only=False`` when the safe read is refused; ``None`` follows
            :func:`trust_pickle_requested`. Only for files the user wrote.

    Raises:
        FileNotFoundError-like :class:`CorruptFileError` when the file is missing, empty or unreadable;
        :class:`UnsafeFileError` when it needs globals outside the allow-list and trust is off, or when it is a
        TorchScript archive (whose code runs on load; read those with :func:`load_torchscript`).
    """
    path = Path(path)
    _check_present(path, what)
    if is_torchscript_archive(path):
        raise UnsafeFileError(
            f"refused to load {what} {path}: it is a TorchScript archive, not a plain torch.save file; loading it "
            f"runs the code stored inside it.\n{torchscript_hint(path)}"
        )
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path, err)
        if not unsafe:
            raise CorruptFileError(f"{what} {path} is not a readable torch file ({_first_line(err)})") from err
        if _trusted(trust):
            warnings.warn(f"{path}: loading with the unsafe unpickler (globals {unsafe}) because trust was "
                          "requested", stacklevel=2)
            return torch.load(path, map_location="cpu", weights_only=False)
        raise UnsafeFileError(
            f"refused to load {what} {path}: unpickling it would call {', '.join(unsafe[:6])}"
            f"{' ...' if len(unsafe) > 6 else ''}, which can run arbitrary code.\n{convert_hint(path)}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            struct.error, zipfile.BadZipFile) as err:  # what the restricted unpickler raises on garbage
        raise CorruptFileError(f"{what} {path} is truncated or not a torch file ({_first_line(err)})") from err


def _unsafe_globals(path: Path, err: BaseException | None = None) -> list[str]:
    """Globals the file's pickle names that the allow-list does not cover (empty if it cannot tell).

    The zip format is scanned completely; for the legacy (pre-1.6, non-zip) format torch cannot scan, the
    global the restricted unpickler stopped at is read from its error message.
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a file torch cannot scan: fall back to the unpickler's message
        names = _GLOBAL_IN_ERROR.findall(str(err)) if err is not None else []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in numpy_safe_globals()}
    return [n for n in names if n not in allowed]


def load_torchscript(path: str | Path, what: str = "TorchScript archive", trust: bool | None = None):
    """``torch.jit.load`` a TorchScript archive on the CPU, only when the user trusts it.

    Loading compiles the TorchScript code stored in the archive and runs its ``__setstate__`` methods, which
    can create and write files (``torch.from_file``); PyTorch itself refuses TorchScript under
    ``weights_only=True``. So it needs the same opt-in as an unsafe pickle.

    Raises:
        CorruptFileError: missing, empty, or not a TorchScript archive.
        UnsafeFileError: trust is off (the default).
    """
    path = Path(path)
    _check_present(path, what)
    if not is_torchscript_archive(path):
        raise CorruptFileError(f"{what} {path} is not a TorchScript archive")
    if not _trusted(trust):
        raise UnsafeFileError(
            f"refused to load {what} {path}: it is a TorchScript archive, and loading one runs the code stored "
            f"inside it.\n{torchscript_hint(path)}"
        )
    warnings.warn(f"{path}: loading a TorchScript archive (its code runs) because trust was requested",
                  stacklevel=2)
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, OSError, ValueError) as err:
        raise CorruptFileError(f"{what} {path} is not a loadable TorchScript archive ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def to_plain_data(obj: Any, where: str = "") -> Any:
    """``obj`` rebuilt from plain containers, tensors and numpy arrays/scalars, so it loads with the safe reader.

    ``argparse.Namespace`` (stored by many research checkpoints as ``args``) becomes a dict; other mappings
    become dicts. Anything else that is not plain data raises ``TypeError`` naming where it sits.
    """
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype,
                                       torch.device, torch.Size)):
        return obj
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return obj
    if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
        return obj
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {k: to_plain_data(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where or 'the file'} holds a {type(obj).__module__}.{type(obj).__qualname__}, which is "
                    "not plain data; drop or convert that entry by hand")


def convert_legacy_file(src: str | Path, dst: str | Path) -> Path:
    """Read a trusted legacy ``torch.save`` file with the unsafe reader and write it back as plain data.

    Only for files you trust: reading ``src`` runs whatever its pickle calls. The result is checked by
    reading it back with :func:`load_torch_file`.
    """
    src, dst = Path(src), Path(dst)
    _check_present(src, "file to convert")
    obj = torch.load(src, map_location="cpu", weights_only=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_plain_data(obj), dst)
    load_torch_file(dst, "converted file", trust=False)
    return dst
