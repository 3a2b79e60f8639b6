"""Read ``torch.save`` files without running code from them.

Every weights, checkpoint, anchor, teacher or cache file that a user can hand to medfoundry goes through
:func:`load_torch_file`, which uses ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler) with
an explicit allow-list: only the numpy types that older medfoundry checkpoints used for RNG states. A file
that needs any other global is refused with :class:`~medfoundry.errors.UnsafeFileError`, whose message
names the globals and says how to convert the file; there is no silent fallback. A user who wrote the file
themselves can opt in to the unsafe reader explicitly with ``MEDFOUNDRY_TRUST_PICKLE=1`` (or the CLI's
``--trust-pickle``), off by default.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from medfoundry.errors import CorruptFileError, UnsafeFileError

TRUST_ENV = "MEDFOUNDRY_TRUST_PICKLE"

CONVERT_HINT = (
    "If you trust the file (you or a colleague wrote it), either convert it once, e.g.\n"
    "  python -c \"import torch, safetensors.torch as st; sd = torch.load('IN.pt', weights_only=False); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\"\n"
    "(for a nested checkpoint, save its state-dict entry), or load it as it is with --trust-pickle "
    f"(environment {TRUST_ENV}=1). Never do either for a file from an unknown source."
)


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


def load_torch_file(path: str | Path, what: str = "file", trust: bool | None = None) -> Any:
    """Load a ``torch.save`` file on the CPU with the restricted unpickler; refuse what would run code.

    Args:
        path: the file.
        what: what the file is for, named in errors ("pretrained weights", "checkpoint", ...).
        trust: read with ``weights_only=False`` when the safe read is refused; ``None`` follows
            :func:`trust_pickle_requested`. Only for files the user wrote.

    Raises:
        FileNotFoundError-like :class:`CorruptFileError` when the file is missing, empty or unreadable;
        :class:`UnsafeFileError` when it needs globals outside the allow-list and trust is off.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{what} {path} is empty (0 bytes): the write that produced it did not finish")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise CorruptFileError(f"{what} {path} is not a readable torch file ({_first_line(err)})") from err
        if trust if trust is not None else trust_pickle_requested():
            warnings.warn(f"{path}: loading with the unsafe unpickler (globals {unsafe}) because trust was "
                          "requested", stacklevel=2)
            return torch.load(path, map_location="cpu", weights_only=False)
        raise UnsafeFileError(
            f"refused to load {what} {path}: unpickling it would call {', '.join(unsafe[:6])}"
            f"{' ...' if len(unsafe) > 6 else ''}, which can run arbitrary code.\n{CONVERT_HINT}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CorruptFileError(f"{what} {path} is truncated or not a torch file ({_first_line(err)})") from err


def _unsafe_globals(path: Path) -> list[str]:
    """Globals the file's pickle names that the allow-list does not cover (empty if it cannot tell)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a file torch cannot even scan is corrupt, not unsafe
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in numpy_safe_globals()}
    return [n for n in names if n not in allowed]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
