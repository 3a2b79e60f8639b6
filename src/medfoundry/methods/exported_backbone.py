"""Load a ``medfoundry export`` folder (``hf``, ``timm`` or ``safetensors``) as a backbone to evaluate.

Every export holds ``medfoundry_backbone.json`` (the registered architecture), the weights in its format and
``medfoundry_preprocessing.json`` (the run's ``data``/``crops``/``eval`` sections, so evaluation preprocesses
images as the run did). The weights are read by :func:`medfoundry.models.pretrained.backbone_from_weights`:
safetensors as they are, a ``pytorch_model.bin`` only through medfoundry's restricted unpickler. Exports that
predate the preprocessing record are evaluated with the mean/std of their ``medfoundry_export.json`` at the
native size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medfoundry.config.data import DataConfig
from medfoundry.config.evaluation import EvalConfig
from medfoundry.config.schema import CropsConfig
from medfoundry.eval.loaded import LoadedBackbone
from medfoundry.eval.sections import FrozenEvalSections
from medfoundry.models.export import BACKBONE_FILE, EXPORT_FILE, RUN_CONFIG_FILE
from medfoundry.models.model_card import Provenance
from medfoundry.models.preprocessing import Preprocessing, read_preprocessing

#: What ``load_backbone`` accepts, for error messages.
ACCEPTED = ("a run folder (checkpoints/step_*.pt|.dcp, best.pt or best.dcp), a checkpoint file (.pt) or "
            "sharded .dcp folder, "
            "or a `medfoundry export` folder (--to hf, timm or safetensors: it holds medfoundry_backbone.json)")


def export_folder(path: str | Path) -> Path | None:
    """The export folder ``path`` names (the folder, or its ``model.safetensors``), or None if it is no export."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if (p.is_dir() or p.suffix == ".safetensors") and (folder / BACKBONE_FILE).is_file():
        return folder
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise ValueError(f"{path}: not valid JSON; re-export the model with `medfoundry export`") from None


def export_sections(folder: Path) -> FrozenEvalSections:
    """The frozen-evaluation sections recorded with an export (older exports: their mean/std, native size)."""
    prep = read_preprocessing(folder)
    if prep is not None:
        return FrozenEvalSections(*prep.section_configs())
    arch, info = _read_json(folder / BACKBONE_FILE), _read_json(folder / EXPORT_FILE)
    size, chans = int(arch.get("img_size", 224)), int(arch.get("in_chans", 3))
    crops = CropsConfig(global_size=size, mean=list(info.get("mean") or [0.5]), std=list(info.get("std") or [0.5]))
    return FrozenEvalSections(DataConfig(channels=chans), crops, EvalConfig(img_size=size))


def export_record(folder: Path) -> tuple[Preprocessing | None, Provenance]:
    """The preprocessing and provenance an export folder recorded (to carry them into a re-export)."""
    import yaml

    info = {**_read_json(folder / BACKBONE_FILE), **_read_json(folder / EXPORT_FILE)}
    config_path = folder / RUN_CONFIG_FILE
    run_config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    provenance = Provenance(method=info.get("method") or "", step=info.get("step"), tower=info.get("tower") or "",
                            source=info.get("source") or str(folder), run_config=run_config,
                            metrics=info.get("metrics") or {})
    return read_preprocessing(folder), provenance


def _random_init(folder: Path, info: dict) -> tuple[torch.nn.Module, str]:
    """The run's evaluated backbone at its step-0 initialisation and its identity, from the run config recorded
    with the export (the same identity as the run's own random initialisation, so feature caches are shared)."""
    import yaml

    from medfoundry.methods.checkpoint_backbone import build_eval_backbone, config_from_checkpoint, random_init_identity
    from medfoundry.methods.registry import get_method_entry

    path = folder / RUN_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: --random-init needs the run config ({RUN_CONFIG_FILE}), which this export "
                         "lacks; evaluate the run folder instead")
    cfg = config_from_checkpoint(yaml.safe_load(path.read_text()) or {}, str(path))
    tower = info.get("tower")
    if tower and tower != get_method_entry(cfg.method).eval_tower:
        raise ValueError(f"{folder}: the export holds the run's '{tower}' tower, not the evaluated one; "
                         "--random-init applies to the evaluated tower only (evaluate the run folder instead)")
    return build_eval_backbone(cfg)[0], random_init_identity(cfg)


def load_export(path: str | Path, random_init: bool = False, device: str | torch.device = "cpu") -> LoadedBackbone:
    """An export folder's backbone, frozen and in eval mode, with the sections it was evaluated with.

    With ``random_init`` the weights are the run's initialisation (from ``medfoundry_run_config.yaml``).
    """
    from medfoundry.methods.checkpoint_backbone import checkpoint_identity
    from medfoundry.models.pretrained import backbone_from_weights

    folder = export_folder(path)
    if folder is None:
        raise FileNotFoundError(f"{path}: not a medfoundry export (no {BACKBONE_FILE} in its folder); "
                                f"accepted: {ACCEPTED}")
    info = {**_read_json(folder / BACKBONE_FILE), **_read_json(folder / EXPORT_FILE)}
    if not info.get("name"):
        raise ValueError(f"{folder}: exported from a backbone with no registered name; medfoundry cannot rebuild it "
                         "(export a backbone built by create_backbone)")
    if random_init:
        backbone, identity = _random_init(folder, info)
    else:
        backbone, _ = backbone_from_weights(folder, verbose=False, what=f"export {folder}")
        identity = checkpoint_identity(folder)
    backbone = backbone.to(device).eval()
    backbone.requires_grad_(False)
    step = info.get("step")
    return LoadedBackbone(backbone, str(info.get("method") or "export"), folder, int(step) if step is not None
                          else None, identity, random_init, export_sections(folder))


__all__ = ["ACCEPTED", "export_folder", "export_record", "export_sections", "load_export"]
