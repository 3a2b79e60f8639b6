"""Load the backbone to evaluate from a run folder or checkpoint (or its random initialisation).

The run's config travels inside every checkpoint (``state["config"]``), so the backbone is rebuilt
exactly as trained: :func:`config_from_checkpoint` restores the config and the method's registry
entry (:class:`medfoundry.methods.MethodEntry`) builds only its evaluated backbone - the EMA
teacher's for DINO, the student for distillation, the image tower's for CLIP - whose weights are the
keys of ``state["method"]`` under the entry's ``eval_prefix`` (``teacher.backbone.*`` ...). Nothing
else of the method is built and no external weights are read (``model.pretrained``, a distillation
teacher's checkpoint, a Gram anchor), so a student still evaluates once its teacher's run folder is
gone. With ``random_init=True`` the weights stay those of the backbone built under the run's seed,
i.e. exactly the run's step-0 initialisation: the baseline that shows what pretraining added.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from torch import Tensor

from medfoundry.checkpoints.format import (
    best_checkpoint,
    is_best_checkpoint,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint,
)
from medfoundry.config.schema import RunConfig
from medfoundry.eval.loaded import LoadedBackbone
from medfoundry.methods.registry import get_method_entry
from medfoundry.models.backbone import Backbone
from medfoundry.models.model_card import Provenance
from medfoundry.models.preprocessing import Preprocessing


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """The checkpoint for ``path``: a file or sharded folder as is; a run folder's newest checkpoint or best one.

    ``which`` is ``latest`` (``RUN/checkpoints/step_*.pt|.dcp``, falling back to the best checkpoint) or
    ``best`` (``RUN/best.pt``, or ``RUN/best.dcp/`` from an FSDP run, falling back to the latest).
    """
    p = Path(path)
    if p.is_file() or is_sharded_checkpoint(p):
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint or run folder '{p}' does not exist")
    best = best_checkpoint(p)
    if not (p / "checkpoints").is_dir() and best is None:
        from medfoundry.methods.exported_backbone import ACCEPTED

        raise FileNotFoundError(f"{p}: not a run folder, checkpoint or medfoundry export; accepted: {ACCEPTED}")
    latest = latest_checkpoint(p)
    order = [best, latest] if which == "best" else [latest, best]
    for candidate in order:
        if candidate is not None and (Path(candidate).is_file() or is_sharded_checkpoint(Path(candidate))):
            return Path(candidate)
    raise FileNotFoundError(f"run folder '{p}' holds no checkpoint (checkpoints/step_*.pt|.dcp, best.pt or best.dcp)")


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
    from medfoundry.config.loader import ConfigError, from_dict, new_run_config
    from medfoundry.config.names import DEFAULT_METHOD

    try:
        return from_dict(data, source=source)
    except ConfigError:
        dropped: list[str] = []
        root = type(new_run_config(data.get("method", DEFAULT_METHOD), source))
        pruned = _prune(root, data, "", dropped)
        cfg = from_dict(pruned, source=source)
        print(f"warning: {source}: ignored config keys unknown to this version: {', '.join(dropped)}", file=sys.stderr)
        return cfg


def _prune(cls: type, data: dict, prefix: str, dropped: list[str]) -> dict:
    import dataclasses

    from medfoundry.config.loader import resolved_hints

    hints = resolved_hints(cls)
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


def build_eval_backbone(cfg: RunConfig) -> tuple[Backbone, str]:
    """The run's evaluated backbone at its step-0 initialisation, and its state-dict prefix in ``state["method"]``.

    Built under ``train.seed`` (as the training loop builds the method) in a forked RNG, so the
    caller's random state is untouched.
    """
    entry = get_method_entry(cfg.method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        backbone = entry.build_eval_backbone(cfg)
    return backbone, entry.eval_prefix


def _load_weights(backbone: Backbone, weights: dict[str, Tensor], prefix: str, source: Path) -> None:
    """Load the keys of ``weights`` under ``prefix`` into ``backbone``; every backbone key must be there, no other."""
    sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    wanted = set(backbone.state_dict())
    missing, unexpected = sorted(wanted - set(sub)), sorted(set(sub) - wanted)
    if missing or unexpected:
        raise ValueError(f"{source}: the '{prefix}*' weights do not match the run's backbone: "
                       f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    backbone.load_state_dict(sub)


def random_init_identity(cfg: RunConfig) -> str:
    """Names a run's random initialisation (architecture, seed, method) for feature caches."""
    digest = hashlib.sha256(f"{cfg.model}|{cfg.train.seed}|{cfg.method}".encode()).hexdigest()[:16]
    return f"random-init-{digest}"


def load_backbone(
    path: str | Path,
    random_init: bool = False,
    which: str = "latest",
    device: str | torch.device = "cpu",
) -> LoadedBackbone:
    """The evaluated backbone of a training checkpoint (or run folder), with its weights, in eval mode and frozen.

    Only that backbone is built (:func:`build_eval_backbone`) and only its weights are read, so
    nothing outside the checkpoint is needed. With ``random_init`` the checkpoint only provides the
    config; the weights are the run's initialisation (built under ``train.seed``, like step 0 of the
    run). A ``medfoundry export`` folder (hf, timm or safetensors, or its ``model.safetensors``) is read by
    :func:`medfoundry.methods.exported_backbone.load_export`: the features of the checkpoint it was exported
    from, and the same evaluation sections. Other released weights are loaded with
    :func:`medfoundry.models.pretrained.backbone_from_weights`.
    """
    from medfoundry.methods.exported_backbone import ACCEPTED, export_folder, load_export

    if export_folder(path) is not None or Path(path).suffix == ".safetensors":  # the latter: an error naming it
        return load_export(path, random_init, device)
    ckpt = resolve_checkpoint(path, which)
    state = load_checkpoint(ckpt)
    if not isinstance(state, dict) or "config" not in state or "method" not in state:
        raise ValueError(f"{ckpt}: not a medfoundry training checkpoint (needs 'config' and 'method'); "
                         f"accepted: {ACCEPTED}")
    cfg = config_from_checkpoint(state["config"], str(ckpt))
    backbone, prefix = build_eval_backbone(cfg)
    if random_init:
        identity = random_init_identity(cfg)
    else:
        _load_weights(backbone, state["method"], prefix, ckpt)
        identity = checkpoint_identity(ckpt)
    backbone = backbone.to(device).eval()
    backbone.requires_grad_(False)
    step = state.get("step")
    sections = get_method_entry(cfg.method).frozen_eval_sections(cfg, state["method"])
    return LoadedBackbone(backbone, cfg.method, ckpt, int(step) if step is not None else None, identity, random_init,
                          sections)


def run_folder_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint lies in (``RUN/checkpoints/step_*.pt|.dcp``, ``RUN/best.pt|.dcp``), else None."""
    p = Path(checkpoint)
    if p.parent.name == "checkpoints":
        return p.parent.parent
    return p.parent if is_best_checkpoint(p) else None


def export_provenance(state: dict, source: str | Path, which: str = "auto",
                      channels: int | None = None) -> tuple[Preprocessing, Provenance]:
    """What an export of a training checkpoint records besides the weights: the preprocessing frozen evaluation
    uses (the method entry's ``frozen_eval_sections``: the DINO crops' mean/std, a CLIP tower's pixel statistics
    and ``clip.preprocess.size``; ``channels``: the exported backbone's input channels) and the provenance for the
    model card (method, step, tower, resolved config, the run folder's evaluation results)."""
    from medfoundry.config.loader import to_dict
    from medfoundry.models.convert.medfoundry_ckpt import resolve_tower
    from medfoundry.models.model_card import read_run_metrics
    from medfoundry.models.preprocessing import preprocessing_from_sections

    cfg = config_from_checkpoint(state["config"], str(source))
    sections = get_method_entry(cfg.method).frozen_eval_sections(cfg, state["method"])
    prep = preprocessing_from_sections(sections.data, sections.crops, sections.eval, channels=channels)
    step = state.get("step")
    provenance = Provenance(method=cfg.method, step=int(step) if step is not None else None,
                            tower=resolve_tower(state, which), source=str(source), run_config=to_dict(cfg),
                            metrics=read_run_metrics(run_folder_of(source)))
    return prep, provenance


__all__ = ["LoadedBackbone", "build_eval_backbone", "checkpoint_identity", "config_from_checkpoint",
           "export_provenance", "load_backbone", "random_init_identity", "resolve_checkpoint", "run_folder_of"]
