"""Load the backbone to evaluate from a run folder or checkpoint (or its random initialisation).

The run's config travels inside every checkpoint (``state["config"]``), so the backbone is rebuilt
exactly as trained: :func:`medfoundry.config.from_dict` restores the config, the method is built
(without loading any external weights) to find which module is its evaluation backbone (the EMA
teacher's for DINO), and the matching keys of ``state["method"]`` (``teacher.backbone.*``) are
loaded into it. With ``random_init=True`` the weights stay those the method has right after being
built under the run's seed, i.e. exactly the run's step-0 initialisation: the baseline that shows
what pretraining added.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medfoundry.config.schema import RunConfig
from medfoundry.models.backbone import Backbone
from medfoundry.train.checkpoint import latest_checkpoint, load_checkpoint

_FALLBACK_PREFIXES = ("teacher.backbone.", "student.backbone.", "backbone.", "image_encoder.", "")


@dataclass
class LoadedBackbone:
    """A backbone ready for evaluation and where it came from."""

    backbone: Backbone
    cfg: RunConfig
    checkpoint: Path
    step: int | None
    identity: str  # names the weights, for feature caches
    random_init: bool = False

    @property
    def label(self) -> str:
        """Short human-readable name: ``step 1200`` or ``random init``."""
        if self.random_init:
            return "random init"
        return f"step {self.step}" if self.step is not None else self.checkpoint.name


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """The checkpoint file for ``path``: a file as is; a run folder's newest checkpoint or ``best.pt``.

    ``which`` is ``latest`` (``RUN/checkpoints/step_*.pt``, falling back to ``RUN/best.pt``) or
    ``best`` (``RUN/best.pt``, falling back to the latest).
    """
    p = Path(path)
    if p.is_file() or _is_sharded_checkpoint(p):
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint or run folder '{p}' does not exist")
    best = p / "best.pt"
    latest = latest_checkpoint(p)
    order = [best, latest] if which == "best" else [latest, best]
    for candidate in order:
        if candidate is not None and (Path(candidate).is_file() or _is_sharded_checkpoint(Path(candidate))):
            return Path(candidate)
    raise FileNotFoundError(f"run folder '{p}' holds no checkpoint (checkpoints/step_*.pt or best.pt)")


def _is_sharded_checkpoint(p: Path) -> bool:
    """A sharded (FSDP, ``torch.distributed.checkpoint``) checkpoint folder: ``step_XXXXXXXX.dcp/``."""
    return p.is_dir() and (p / "meta.pt").is_file()


def checkpoint_identity(path: str | Path) -> str:
    """Cheap identity of a checkpoint: hash of its resolved path, size and modification time.

    For a sharded checkpoint folder the sizes and times of all its files count.
    """
    p = Path(path).resolve()
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    stamps = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return hashlib.sha256(f"{p}|{stamps}".encode()).hexdigest()[:16]


def config_from_checkpoint(data: dict, source: str = "checkpoint") -> RunConfig:
    """The run config stored in a checkpoint; keys the current schema no longer has are dropped with a warning.

    Checkpoints outlive schema changes (a section gains, renames or loses keys); for evaluation only
    the model, data, crops and method sections matter, so unknown keys elsewhere are not fatal.
    """
    from medfoundry.config.loader import ConfigError, from_dict

    try:
        return from_dict(data, source=source)
    except ConfigError:
        dropped: list[str] = []
        pruned = _prune(RunConfig, data, "", dropped)
        cfg = from_dict(pruned, source=source)
        print(f"warning: {source}: ignored config keys unknown to this version: {', '.join(dropped)}", file=sys.stderr)
        return cfg


def _prune(cls: type, data: dict, prefix: str, dropped: list[str]) -> dict:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        if key not in names:
            dropped.append(prefix + key)
            continue
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype) and isinstance(value, dict):
            out[key] = _prune(ftype, value, f"{prefix}{key}.", dropped)
        else:
            out[key] = value
    return out


def _build_method(cfg: RunConfig) -> nn.Module:
    """The run's method without any external weights (pretrained starts, Gram anchors)."""
    from medfoundry.config.loader import from_dict, to_dict
    from medfoundry.methods import get_method_entry

    build_cfg = from_dict(to_dict(cfg))
    build_cfg.model.pretrained = None
    if build_cfg.dino.gram_mode == "anchor":
        build_cfg.dino.gram_mode = "ema"
    return get_method_entry(build_cfg.method).build(build_cfg)


def _prefix_of(method: nn.Module, module: nn.Module) -> str:
    for name, mod in method.named_modules():
        if mod is module:
            return f"{name}." if name else ""
    raise RuntimeError("the evaluation backbone is not a submodule of its method")


def load_backbone(
    path: str | Path,
    random_init: bool = False,
    which: str = "latest",
    device: str | torch.device = "cpu",
) -> LoadedBackbone:
    """Rebuild the evaluation backbone of a checkpoint (or run folder) and load its weights.

    With ``random_init`` the checkpoint only provides the config; the weights are the run's
    initialisation (built under ``train.seed``, like step 0 of the run).
    """
    ckpt = resolve_checkpoint(path, which)
    state = load_checkpoint(ckpt)
    if "config" not in state or "method" not in state:
        raise ValueError(f"{ckpt}: not a medfoundry training checkpoint (needs 'config' and 'method')")
    cfg = config_from_checkpoint(state["config"], str(ckpt))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        method = _build_method(cfg)
    backbone = method.eval_backbone()
    if random_init:
        identity = "random-init-" + hashlib.sha256(
            f"{cfg.model}|{cfg.train.seed}|{cfg.method}".encode()
        ).hexdigest()[:16]
    else:
        prefix = _prefix_of(method, backbone)
        weights = state["method"]
        wanted = set(backbone.state_dict())
        for candidate in (prefix, *_FALLBACK_PREFIXES):
            sub = {k[len(candidate):]: v for k, v in weights.items() if k.startswith(candidate)}
            if wanted <= set(sub):
                backbone.load_state_dict({k: sub[k] for k in wanted})
                break
        else:
            raise KeyError(f"{ckpt}: no complete set of backbone weights (tried prefix '{prefix}')")
        identity = checkpoint_identity(ckpt)
    backbone = backbone.to(device).eval()
    backbone.requires_grad_(False)
    step = state.get("step")
    return LoadedBackbone(backbone, cfg, ckpt, int(step) if step is not None else None, identity, random_init)
