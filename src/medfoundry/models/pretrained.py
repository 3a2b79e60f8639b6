"""Load released or colleague's weights into a medfoundry backbone, from local files only.

``load_pretrained_backbone(backbone, path, fmt)`` reads Meta DINOv2 / DINOv3 ``.pth`` files,
HuggingFace ``Dinov2Model`` / ``DINOv3ViTModel`` folders, timm state dicts and medfoundry's own
training checkpoints or exports (format detection with ``fmt="auto"``), maps every key onto the
backbone (:mod:`medfoundry.models.convert`), then adapts what differs between checkpoint and model:

* the absolute position-embedding grid (bicubic resampling, class/register rows kept aside, see
  :mod:`medfoundry.models.resize`) - RoPE models need none;
* the class/register position layout (Meta's class position folded into timm's ``cls_token``);
* the patch size (FlexiViT resize) and the number of input channels (average/repeat, magnitude kept).

Every key is accounted for: the returned :class:`LoadReport` lists the converted, skipped (with the
reason) and missing keys plus the adaptations; it is printed and can be saved as JSON in the run
folder. Anything that would silently change the model - an unexpected key, a missing weight other
than the iBOT ``mask_token``, a shape that cannot be resolved - raises :class:`PretrainedLoadError`.

No hub access: paths must be local files or folders.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from medfoundry.config.names import PRETRAINED_FORMATS
from medfoundry.models.backbone import Backbone
from medfoundry.models.convert import Converted, PretrainedLoadError
from medfoundry.models.resize import (
    ChannelMode,
    adapt_in_chans,
    infer_grid,
    infer_pos_prefix,
    reconcile_pos_prefix,
    resample_patch_embed,
    resample_pos_embed,
)

FORMATS = PRETRAINED_FORMATS  # medfoundry:<tower> picks a tower of a training checkpoint (image: a CLIP run's)
OPTIONAL_KEYS = ("mask_token",)  # may stay at their init (zeros): used only by iBOT masking


@dataclass
class LoadReport:
    """What a pretrained load did, key by key."""

    source: str  # the file or folder read
    format: str  # the detected or given format
    backbone: str  # the target backbone's registry name
    converted: list[tuple[str, str]] = field(default_factory=list)  # (source key, backbone key)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source key, reason)
    missing: list[str] = field(default_factory=list)  # backbone keys left at their initial value
    adapted: list[str] = field(default_factory=list)  # resizes, channel adaptation, layout changes
    notes: list[str] = field(default_factory=list)  # format-specific remarks

    def summary(self) -> str:
        """Human-readable report: counts, then every skipped/missing key and every adaptation."""
        lines = [
            f"pretrained: {self.source} (format {self.format}) -> {self.backbone}: "
            f"{len(self.converted)} keys converted, {len(self.skipped)} skipped, {len(self.missing)} missing"
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  adapted: {a}" for a in self.adapted]
        by_reason: dict[str, list[str]] = {}
        for key, why in self.skipped:
            by_reason.setdefault(why, []).append(key)
        for why, keys in by_reason.items():
            if len(keys) <= 4:
                lines += [f"  skipped: {k} ({why})" for k in keys]
            else:
                lines.append(f"  skipped {len(keys)} keys ({why}): {', '.join(keys[:3])}, ... (all listed in the JSON)")
        lines += [f"  missing: {k} (left at its initial value)" for k in self.missing]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (lists of pairs become lists of 2-lists)."""
        return asdict(self)

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON (e.g. ``RUN/pretrained_load.json``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def resolve_source(path: str | Path) -> Path:
    """A run folder -> its newest checkpoint; an export folder -> its ``model.safetensors``; else ``path``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PretrainedLoadError(f"pretrained weights not found: {p} (only local files/folders; no hub downloads)")
    if p.is_dir():
        from medfoundry.checkpoints.format import is_sharded_checkpoint
        from medfoundry.models.convert.hf import is_hf_folder

        if is_hf_folder(p) or is_sharded_checkpoint(p):  # HF folder or sharded (FSDP) checkpoint
            return p
        if (p / "checkpoints").is_dir():
            from medfoundry.checkpoints.format import latest_checkpoint

            ckpt = latest_checkpoint(p)
            if ckpt is None:
                raise PretrainedLoadError(f"run folder {p} has no checkpoint yet")
            return ckpt
        for name in ("model.safetensors", "pytorch_model.bin", "model.pth"):
            if (p / name).is_file():
                return p / name
        raise PretrainedLoadError(f"{p}: not a run folder, HF folder or export folder (no weights file found)")
    return p


def read_weights(path: Path, fmt: str = "auto", what: str = "pretrained weights") -> tuple[Any, dict | None, list[str]]:
    """Load the object stored at ``path``: ``(state dict or checkpoint, HF config or None, notes)``.

    Every ``torch.save`` file (of any ``fmt``; the argument is kept for callers) is read with the restricted
    unpickler of :func:`medfoundry.safe_load.load_torch_file`: a file whose unpickling would call anything
    outside the allow-list raises :class:`~medfoundry.errors.UnsafeFileError` naming ``what`` and the fix,
    never a silent unsafe fallback. safetensors files hold tensors only and are read as they are.

    Raises:
        UnsafeFileError: the file would run code when unpickled (and trust was not requested).
        CorruptFileError: the file is truncated or not a torch file.
        PretrainedLoadError: the file holds something other than a dict.
    """
    from medfoundry.checkpoints.format import is_sharded_checkpoint, load_checkpoint
    from medfoundry.safe_load import load_torch_file

    if is_sharded_checkpoint(path):
        return load_checkpoint(path), None, ["consolidated a sharded (FSDP) checkpoint"]
    if path.is_dir():
        from medfoundry.models.convert.hf import read_folder

        sd, config = read_folder(path, what)
        return sd, config, []
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = load_torch_file(path, what)
    if not isinstance(obj, dict):
        raise PretrainedLoadError(f"{what} {path}: expected a state dict or checkpoint dict, got {type(obj).__name__}")
    return obj, None, []


def _read_safetensors(path: Path) -> tuple[dict, dict | None, list[str]]:
    """A ``.safetensors`` file, with the HF ``config.json`` next to it when the folder is an HF model folder."""
    from safetensors.torch import load_file

    from medfoundry.models.convert.hf import is_hf_folder

    sd = load_file(str(path))
    hf_cfg = path.parent / "config.json"
    config = json.loads(hf_cfg.read_text()) if hf_cfg.is_file() and is_hf_folder(path.parent) else None
    return sd, config, []


def detect_format(obj: Any, config: dict | None = None) -> str:
    """Guess the format from the loaded object's keys (see the converters' ``looks_like``)."""
    from medfoundry.models.convert import dinov2_meta, dinov3_meta, hf, medfoundry_ckpt, timm_sd, unwrap_state_dict

    if config is not None:
        return "hf"
    if medfoundry_ckpt.is_training_checkpoint(obj):
        return "medfoundry"
    sd, _ = unwrap_state_dict(obj)
    if medfoundry_ckpt.looks_like(sd):
        return "medfoundry"
    if hf.looks_like(sd):
        return "hf"
    if dinov3_meta.looks_like(sd):
        return "dinov3"
    if dinov2_meta.looks_like(sd):
        return "dinov2"
    if timm_sd.looks_like(sd):
        return "timm"
    sample = sorted(sd)[:8]
    raise PretrainedLoadError(
        f"cannot detect the checkpoint format from its keys {sample}...; pass the format explicitly "
        f"(model.pretrained_format, one of {list(FORMATS)})"
    )


def convert_any(obj: Any, backbone: Backbone, fmt: str, config: dict | None = None) -> Converted:
    """Run the converter of ``fmt`` (already resolved, not ``auto``)."""
    from medfoundry.models.convert import dinov2_meta, dinov3_meta, hf, medfoundry_ckpt, timm_sd

    if fmt == "dinov2":
        return dinov2_meta.convert(obj, backbone)
    if fmt == "dinov3":
        return dinov3_meta.convert(obj, backbone)
    if fmt == "hf":
        return hf.convert(obj, backbone, config)
    if fmt == "timm":
        return timm_sd.convert(obj, backbone)
    if fmt.startswith("medfoundry"):
        which = fmt.split(":", 1)[1] if ":" in fmt else "auto"
        return medfoundry_ckpt.convert(obj, backbone, which)
    raise PretrainedLoadError(f"unknown pretrained format {fmt!r}; one of {list(FORMATS)}")


def _target_names(backbone: Backbone) -> dict[str, str]:
    """Plain key -> actual state_dict key (LoRA-wrapped linears store ``*.base_layer.*``; adapters excluded)."""
    names = {}
    for key in backbone.state_dict():
        if ".lora_" in key:
            continue
        names[key.replace(".base_layer.", ".")] = key
    return names


def _adapt_pos_embed(conv: Converted, backbone: Backbone, report: LoadReport) -> None:
    pos = conv.tensors.get("vit.pos_embed")
    target = getattr(backbone.vit, "pos_embed", None)
    if pos is None or target is None:
        return
    vit = backbone.vit
    tgt_prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    reg = conv.tensors.get("vit.reg_token")
    n_reg_src = int(reg.shape[1]) if reg is not None else 0
    if conv.pos_prefix is not None:
        src_prefix = conv.pos_prefix
    else:
        src_prefix = infer_pos_prefix(pos.shape[1], list(dict.fromkeys([tgt_prefix, 0, 1, 1 + n_reg_src])))
    pos, cls_tok, reg_tok, note = reconcile_pos_prefix(pos, src_prefix, tgt_prefix, conv.tensors.get("vit.cls_token"),
                                                       reg)
    if note:
        report.adapted.append(f"vit.pos_embed: {note}")
        if cls_tok is not None:
            conv.tensors["vit.cls_token"] = cls_tok
        if reg_tok is not None:
            conv.tensors["vit.reg_token"] = reg_tok
    old_grid = infer_grid(pos.shape[1] - tgt_prefix)
    new_grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    if old_grid != new_grid:
        pos = resample_pos_embed(pos, new_grid, tgt_prefix, old_grid)
        report.adapted.append(
            f"vit.pos_embed: patch grid {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} "
            f"(2D bicubic, antialiased; {tgt_prefix} prefix rows kept)"
        )
    conv.tensors["vit.pos_embed"] = pos


def _adapt_patch_embed(conv: Converted, backbone: Backbone, report: LoadReport, channel_mode: ChannelMode) -> None:
    key = "vit.patch_embed.proj.weight"
    weight = conv.tensors.get(key)
    if weight is None or weight.ndim != 4:
        return
    target = backbone.vit.patch_embed.proj.weight
    if tuple(weight.shape[-2:]) != tuple(target.shape[-2:]):
        old = tuple(weight.shape[-2:])
        weight = resample_patch_embed(weight, tuple(target.shape[-2:]))
        report.adapted.append(f"{key}: patch size {old} -> {tuple(target.shape[-2:])} (FlexiViT pseudo-inverse)")
    if weight.shape[1] != target.shape[1]:
        old_c = weight.shape[1]
        weight = adapt_in_chans(weight, int(target.shape[1]), channel_mode)
        report.adapted.append(
            f"{key}: {old_c} -> {target.shape[1]} input channels ({channel_mode}, scaled by {old_c}/{target.shape[1]})"
        )
    conv.tensors[key] = weight


def load_pretrained_backbone(
    backbone: Backbone,
    path: str | Path,
    fmt: str = "auto",
    *,
    channel_mode: ChannelMode = "average",
    strict: bool = True,
    verbose: bool = True,
    record_to: str | Path | None = None,
    preloaded: tuple[Any, dict | None, list[str]] | None = None,
    what: str = "pretrained weights",
) -> LoadReport:
    """Load the weights at ``path`` into ``backbone`` in place and report every key.

    Args:
        backbone: the target (built by ``create_backbone``; may already carry LoRA adapters).
        path: a local file (``.pth``/``.pt``/``.bin``/``.safetensors``), an HF ``save_pretrained``
            folder, an export folder, or a medfoundry run folder (its newest checkpoint).
        fmt: ``auto`` or one of :data:`FORMATS`.
        channel_mode: how 3-channel patch-embedding weights become ``in_chans`` channels.
        strict: raise on unexpected or missing keys (``mask_token`` may always stay missing).
        verbose: print the report (on the main process only).
        record_to: also write the report as JSON to this path.
        preloaded: the result of :func:`read_weights` for ``path`` when the caller already read it
            (avoids reading a multi-GB training checkpoint twice).
        what: what the weights are for, named in errors (the config key, e.g. ``dino.gram_anchor``).

    Raises:
        PretrainedLoadError: the file is missing or a key cannot be placed.
        UnsafeFileError: the file would run code when unpickled (see :func:`read_weights`).
        CorruptFileError: the file is truncated or not a torch file.
    """
    if fmt not in FORMATS:
        raise PretrainedLoadError(f"unknown pretrained format {fmt!r}; one of {list(FORMATS)}")
    source = resolve_source(path)
    obj, config, read_notes = preloaded if preloaded is not None else read_weights(source, fmt, what)
    resolved = detect_format(obj, config) if fmt == "auto" else fmt
    conv = convert_any(obj, backbone, resolved, config)
    report = LoadReport(str(source), resolved, backbone.name or type(backbone.vit).__name__,
                        skipped=list(conv.skipped), notes=read_notes + conv.notes)

    _adapt_pos_embed(conv, backbone, report)
    _adapt_patch_embed(conv, backbone, report, channel_mode)

    names = _target_names(backbone)
    current = backbone.state_dict()
    sources_of: dict[str, list[str]] = {}
    for src, dst in conv.converted:
        sources_of.setdefault(dst, []).append(src)
    to_load: dict[str, Tensor] = {}
    unexpected = []
    for key, value in conv.tensors.items():
        if key not in names:
            unexpected.append(key)
            continue
        want = current[names[key]]
        if value.shape != want.shape:
            squeezed = [s for s in value.shape if s != 1] == [s for s in want.shape if s != 1]
            if value.numel() == want.numel() and squeezed:
                value = value.reshape(want.shape)
            else:
                raise PretrainedLoadError(
                    f"shape mismatch for {key} (from {sources_of.get(key, ['?'])}): checkpoint "
                    f"{tuple(value.shape)} vs backbone '{backbone.name}' {tuple(want.shape)}. "
                    "The checkpoint is probably a different architecture (width/depth/heads/registers/MLP); "
                    "pick the matching model.name (see `medfoundry models`)."
                )
        to_load[names[key]] = value.to(dtype=want.dtype)
    for key in unexpected:
        srcs = sources_of.get(key, [key])
        if strict:
            raise PretrainedLoadError(
                f"checkpoint key(s) {srcs} map to '{key}', which backbone '{backbone.name}' does not have "
                "(different architecture? e.g. depth, registers, layer scale, qkv bias). "
                "Pass strict=False to skip such keys."
            )
        for s in srcs:
            report.skipped.append((s, f"no '{key}' in the target backbone (strict=False)"))
    report.converted = [(s, d) for s, d in conv.converted if d not in unexpected]
    missing = sorted(k for k in names if k not in conv.tensors)
    fatal = [k for k in missing if k not in OPTIONAL_KEYS]
    if fatal and strict:
        raise PretrainedLoadError(
            f"{len(fatal)} backbone weights are not in the checkpoint and would stay random: {fatal[:12]}"
            f"{' ...' if len(fatal) > 12 else ''}. Wrong model.name or format? (format {resolved})"
        )
    report.missing = missing
    result = backbone.load_state_dict(to_load, strict=False)
    left = [k for k in result.missing_keys if ".lora_" not in k and k.replace(".base_layer.", ".") not in missing]
    if left or result.unexpected_keys:
        raise PretrainedLoadError(f"internal load mismatch: missing {left}, unexpected {result.unexpected_keys}")
    if verbose and int(os.environ.get("RANK", "0")) == 0:
        print(report.summary(), flush=True)
    if record_to is not None:
        report.save_json(record_to)
    return report


def backbone_from_weights(
    path: str | Path,
    which: str = "auto",
    fmt: str = "auto",
    model: Any | None = None,
    *,
    channel_mode: ChannelMode = "average",
    verbose: bool = True,
    preloaded: tuple[Any, dict | None, list[str]] | None = None,
    what: str = "pretrained weights",
) -> tuple[Backbone, LoadReport]:
    """Build a backbone for a weights file or folder and load them into it (any format); for export.

    For medfoundry checkpoints the architecture comes from the checkpoint's own config (``which``
    picks the tower: ``auto`` - the run's evaluated one -, ``teacher`` or ``student``); for other
    formats pass ``model`` (a ``ModelConfig``) naming the registered architecture. LoRA adapters are
    merged, so the result is a plain backbone. To evaluate a run (its backbone exactly as trained,
    or its random initialisation) use :func:`medfoundry.methods.checkpoint_backbone.load_backbone`. ``preloaded`` and
    ``what`` are as in :func:`load_pretrained_backbone`.
    """
    from medfoundry.config.schema import ModelConfig
    from medfoundry.models.convert import medfoundry_ckpt
    from medfoundry.models.registry import create_backbone

    source = resolve_source(path)
    if model is None:
        from medfoundry.checkpoints.format import is_sharded_checkpoint

        if (source.is_dir() and not is_sharded_checkpoint(source)) or source.suffix == ".safetensors":
            model = _model_from_export(source)
        else:
            if preloaded is None:
                preloaded = read_weights(source, "medfoundry", what)
            obj = preloaded[0]
            if not medfoundry_ckpt.is_training_checkpoint(obj):
                raise PretrainedLoadError(f"{source}: not a medfoundry checkpoint; name the architecture (model=...)")
            section = medfoundry_ckpt.tower_model_config(obj, which)
            model = ModelConfig()
            for key, value in section.items():
                if hasattr(model, key) and value is not None:
                    setattr(model, key, value)
            model.pretrained = None
            model.drop_path_rate = 0.0
            model.grad_checkpointing = False
    backbone = create_backbone(model)
    if fmt == "auto" and which not in ("auto", "", None):
        fmt = f"medfoundry:{which}"
    report = load_pretrained_backbone(backbone, source, fmt, channel_mode=channel_mode, verbose=verbose,
                                      preloaded=preloaded, what=what)
    return backbone, report


def _model_from_export(source: Path):
    """The ``ModelConfig`` recorded next to a ``medfoundry export --to safetensors`` file."""
    from medfoundry.config.schema import ModelConfig

    folder = source if source.is_dir() else source.parent
    meta = folder / "medfoundry_backbone.json"
    if not meta.is_file():
        raise PretrainedLoadError(f"{source}: no medfoundry_backbone.json next to it; name the architecture (model=)")
    info = json.loads(meta.read_text())
    return ModelConfig(name=info["name"], img_size=int(info["img_size"]), in_chans=int(info["in_chans"]))


def record_load_reports(reports: list[LoadReport], run_dir: str | Path) -> Path | None:
    """Write ``RUN/pretrained_load.json`` (all loads of a run; only on the main process)."""
    if not reports or int(os.environ.get("RANK", "0")) != 0:
        return None
    path = Path(run_dir) / "pretrained_load.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_dict() for r in reports], indent=1))
    return path


__all__ = [
    "FORMATS",
    "LoadReport",
    "PretrainedLoadError",
    "backbone_from_weights",
    "detect_format",
    "load_pretrained_backbone",
    "record_load_reports",
    "resolve_source",
]
