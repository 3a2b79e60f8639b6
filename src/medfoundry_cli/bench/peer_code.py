"""Where facebookresearch/dinov2's code comes from for the peer benchmarks, and importing it.

The code is never copied into this repository: it is looked up in a cache folder (default
``.cache/peers/dinov2`` under the repository root, git-ignored; ``--peer-path DIR`` or the environment
variable ``MEDFOUNDRY_PEER_DINOV2`` choose another) and, when absent, cloned there with
``git clone --depth 1 https://github.com/facebookresearch/dinov2``. A folder that already holds the
``dinov2`` package is used as it is (nothing is fetched). :func:`import_dinov2` puts the cache on
``sys.path`` and imports the modules the peer step (:mod:`medfoundry_cli.bench.peer_dinov2`) and the
augmentation comparison (:mod:`medfoundry_cli.bench.data`) are built from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from medfoundry.errors import UserError

PEER_URL = "https://github.com/facebookresearch/dinov2"
ENV_VAR = "MEDFOUNDRY_PEER_DINOV2"
_MARKER = Path("dinov2") / "models" / "vision_transformer.py"


class PeerUnavailableError(UserError):
    """The dinov2 code is neither in the cache folder nor could be cloned there."""


@dataclass(frozen=True)
class PeerCode:
    """Where the dinov2 code is, which commit it is, and whether this call cloned it."""

    root: Path  # the folder that holds the ``dinov2`` package
    commit: str
    fetched: bool = False

    def describe(self) -> str:
        """One line for benchmark output: the commit and where the code came from."""
        how = "cloned now" if self.fetched else "cached, nothing fetched"
        return f"facebookresearch/dinov2 @ {self.commit} ({self.root}, {how})"


def repo_root() -> Path:
    """The repository root of a source checkout (where ``pyproject.toml`` is), else the working directory."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "src" / "medfoundry_cli").is_dir():
            return parent
    return Path.cwd()


def default_cache() -> Path:
    """The peer cache folder: ``$MEDFOUNDRY_PEER_DINOV2`` if set, else ``<repo>/.cache/peers/dinov2`` (the
    checkout this package was imported from, or the working directory's when only that one holds the code)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    here = repo_root() / ".cache" / "peers" / "dinov2"
    cwd = Path.cwd() / ".cache" / "peers" / "dinov2"
    return cwd if not has_code(here) and has_code(cwd) else here


def has_code(root: Path) -> bool:
    """Whether ``root`` holds dinov2's ``dinov2`` package (its vision transformer module)."""
    return (root / _MARKER).is_file()


def peer_commit(root: Path) -> str:
    """The commit of the code in ``root``: a ``COMMIT`` file written when the cache was filled from an archive,
    else ``git rev-parse HEAD`` of a clone, else ``unknown``."""
    marker = root / "COMMIT"
    if marker.is_file():
        return marker.read_text().split()[0]
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=30, check=True)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown (no COMMIT file, no .git)"


def locate_dinov2(path: str | Path | None = None, fetch: bool = True) -> PeerCode:
    """Find dinov2's code in ``path`` (default :func:`default_cache`), cloning it there when absent and ``fetch``.

    A folder that already holds the code is used as it is. Raises :class:`PeerUnavailableError` (one line:
    the folder and how to place the code there) when the code is missing and cannot be cloned, e.g. offline.
    """
    root = Path(path).expanduser() if path else default_cache()
    root = root.resolve()
    if has_code(root):
        return PeerCode(root, peer_commit(root))
    how = (f"place facebookresearch/dinov2 there (its `dinov2/` package directly under {root}, e.g. "
           f"`git clone --depth 1 {PEER_URL} {root}`), or pass --peer-path DIR / set {ENV_VAR}=DIR")
    if not fetch:
        raise PeerUnavailableError(f"dinov2 code not found in {root}: {how}")
    reason = _clone(root)
    if reason is None and has_code(root):
        return PeerCode(root, peer_commit(root), fetched=True)
    raise PeerUnavailableError(f"dinov2 code not found in {root} and cloning {PEER_URL} failed "
                               f"({reason or 'no dinov2 package in the clone'}): {how}")


def _clone(root: Path) -> str | None:
    """``git clone --depth 1`` into ``root``; None on success, else the reason in a few words."""
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(["git", "clone", "--depth", "1", "--quiet", PEER_URL, str(root)], capture_output=True,
                             text=True, timeout=600, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except (OSError, subprocess.SubprocessError) as err:
        return f"{type(err).__name__}: {err}"
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"git exit code {out.returncode}"
    return None


@dataclass
class Dinov2Modules:
    """The dinov2 modules the peer step is built from, and what importing them said."""

    vision_transformer: ModuleType
    layers: ModuleType
    loss: ModuleType
    param_groups: ModuleType
    utils: ModuleType
    warnings: list[str] = field(default_factory=list)


class _OneProcessDist:
    """``torch.distributed`` as dinov2's loss modules see it: torch's own, except that without a process group
    ``all_reduce`` is the identity (an all-reduce over one rank), which dinov2's iBOT Sinkhorn calls unguarded."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.distributed, name)

    @staticmethod
    def all_reduce(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.all_reduce(tensor, *args, **kwargs)
        return None


def import_dinov2(code: PeerCode) -> Dinov2Modules:
    """Import dinov2's modules from ``code.root`` (put first on ``sys.path``); refuses another ``dinov2`` on the
    path. The xFormers warnings dinov2 gives when xFormers is missing are recorded, not printed."""
    root = str(code.root)
    loaded = sys.modules.get("dinov2")
    if loaded is not None and not str(Path(loaded.__file__ or "").resolve()).startswith(root):
        raise PeerUnavailableError(f"another dinov2 is already imported ({loaded.__file__}); run without it")
    if root not in sys.path:
        sys.path.insert(0, root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import dinov2.layers as layers
        import dinov2.loss as loss
        import dinov2.loss.ibot_patch_loss as ibot_patch_loss
        import dinov2.models.vision_transformer as vision_transformer
        import dinov2.utils.param_groups as param_groups
        import dinov2.utils.utils as utils
    ibot_patch_loss.dist = _OneProcessDist()  # the module's global, not its file
    said = sorted({str(w.message) for w in caught if "xformers" in str(w.message).lower()})
    return Dinov2Modules(vision_transformer, layers, loss, param_groups, utils, said)
