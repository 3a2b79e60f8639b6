"""Export a medfoundry backbone for people who use HuggingFace transformers, timm, or plain safetensors.

* ``hf`` (:mod:`medfoundry.models.export_hf`): a ``save_pretrained`` folder of ``Dinov2Model``
  (absolute position embeddings, no registers), ``Dinov2WithRegistersModel`` (registers) or
  ``DINOv3ViTModel`` (RoPE); loads with
  ``transformers.AutoModel.from_pretrained(DIR)``. Meta/HF place a position embedding on the class
  token and none on registers; timm's register models fold the class position into ``cls_token``,
  which is exactly representable (class position row = 0).
* ``timm``: timm's hub layout, ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``)
  plus ``model.safetensors``; loads with ``timm.create_model("local-dir:DIR", pretrained=True)`` or
  ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=DIR/model.safetensors),
  **model_args)``.
* ``safetensors``: medfoundry's own ``Backbone.state_dict()`` plus ``medfoundry_backbone.json``;
  loads with ``load_pretrained_backbone`` / ``backbone_from_weights``.

LoRA adapters are merged into plain weights first. Unless ``check=False``, each export is reloaded
with the target library and its features are compared with the backbone's own at the native input
size; a difference above ``tol`` (1e-4) raises, so a written export is known to be faithful.

Every format also gets ``medfoundry_backbone.json`` (the architecture medfoundry rebuilds),
``medfoundry_export.json`` (format, check, provenance), ``medfoundry_preprocessing.json`` (the input
preprocessing, :mod:`medfoundry.models.preprocessing`), ``medfoundry_run_config.yaml`` when exported from a run,
and a model card ``README.md`` (:mod:`medfoundry.models.model_card`); ``hf`` adds the transformers
``preprocessor_config.json`` (:mod:`medfoundry.models.preprocessor_config`). So
:func:`medfoundry.methods.checkpoint_backbone.load_backbone` reads every export back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from medfoundry.errors import UserError
from medfoundry.models.backbone import Backbone
from medfoundry.models.convert import is_eva
from medfoundry.models.lora import merged_copy
from medfoundry.models.model_card import ModelCard, Provenance, write_model_card
from medfoundry.models.preprocessing import Preprocessing, plain_preprocessing

ExportFormat = Literal["hf", "timm", "safetensors"]
EXPORT_FORMATS = ("hf", "timm", "safetensors")
BACKBONE_FILE = "medfoundry_backbone.json"  # the architecture: what medfoundry rebuilds (every format)
EXPORT_FILE = "medfoundry_export.json"  # format, check result, load hint, provenance (every format)
RUN_CONFIG_FILE = "medfoundry_run_config.yaml"  # the resolved config of the run exported from


class ExportError(UserError, RuntimeError):
    """The backbone cannot be represented in the requested format, or the reloaded export differs."""


@dataclass
class ExportResult:
    """Where an export went, how faithful it is and how to load it."""

    format: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    max_abs_diff: float | None = None  # reloaded export vs medfoundry features (None: not checked)
    load_hint: str = ""  # a Python snippet that loads the export


def _native_size(backbone: Backbone) -> int:
    grid = getattr(backbone.vit.patch_embed, "grid_size", None)
    return int(grid[0]) * backbone.patch_size if grid is not None else 224


def num_registers(backbone: Backbone) -> int:
    """Register-token count read from the weights (``Backbone.num_reg_tokens`` is 0 for timm Eva)."""
    reg = getattr(backbone.vit, "reg_token", None)
    return int(reg.shape[1]) if reg is not None else 0


def _norm_eps(module: nn.Module) -> float:
    return float(getattr(module, "eps", 1e-6))


def _probe(backbone: Backbone, size: int | None = None, batch: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    size = size or _native_size(backbone)
    return torch.randn(batch, backbone.in_chans, size, size, generator=gen)


def _tokens(backbone: Backbone, x: Tensor) -> Tensor:
    out = backbone.eval().forward_features(x)
    return torch.cat([out.cls[:, None], out.reg, out.patch], dim=1)


def _fail_if_far(diff: float, tol: float, what: str) -> None:
    if not diff <= tol:
        raise ExportError(f"{what}: reloaded features differ from medfoundry's by {diff:.3g} > {tol:g}")


# --------------------------------------------------------------------------------------------- timm
def timm_recipe(backbone: Backbone) -> tuple[str, dict]:
    """``(architecture, model_args)`` that make ``timm.create_model`` rebuild this backbone's network.

    Registered timm names are used as is; medfoundry's own small models are described as overrides
    of a timm architecture of the same family (every size-defining argument is given explicitly).
    """
    import timm
    from timm.layers import Mlp

    vit = backbone.vit
    size = _native_size(backbone)
    base = dict(img_size=size, in_chans=backbone.in_chans, num_classes=0, dynamic_img_size=True, global_pool="token")
    if backbone.name and timm.is_model(backbone.name):
        return backbone.name, base
    blk0 = vit.blocks[0]
    if not isinstance(blk0.mlp, Mlp) or not isinstance(blk0.mlp.act, nn.GELU):
        raise ExportError(f"cannot describe backbone '{backbone.name}' for timm: non-GELU/non-standard MLP")
    common = dict(
        base,
        patch_size=backbone.patch_size,
        embed_dim=backbone.embed_dim,
        depth=backbone.depth,
        num_heads=blk0.attn.num_heads,
        mlp_ratio=blk0.mlp.fc1.out_features / backbone.embed_dim,
    )
    if is_eva(backbone):
        if abs(_norm_eps(vit.norm) - 1e-5) > 1e-12:
            raise ExportError("timm's DINOv3 architectures use LayerNorm eps 1e-5")
        return "vit_base_patch16_dinov3", dict(
            common,
            qkv_bias=getattr(blk0.attn, "q_bias", None) is not None,
            init_values=1.0 if getattr(blk0, "gamma_1", None) is not None else None,
            num_reg_tokens=num_registers(backbone),
            rope_temperature=float(vit.rope.temperature),
        )
    if abs(_norm_eps(vit.norm) - 1e-6) > 1e-12:
        raise ExportError("timm's VisionTransformer default uses LayerNorm eps 1e-6")
    ls = getattr(blk0, "ls1", None)
    return "vit_base_patch16_224", dict(
        common,
        qkv_bias=blk0.attn.qkv.bias is not None,
        init_values=1.0 if ls is not None and hasattr(ls, "gamma") else None,
        class_token=backbone.has_class_token,
        reg_tokens=num_registers(backbone),
        no_embed_class=bool(getattr(vit, "no_embed_class", False)),
    )


def export_timm(backbone: Backbone, out_dir: Path, check: bool = True, tol: float = 1e-4,
                mean: list[float] | None = None, std: list[float] | None = None,
                preprocessing: Preprocessing | None = None) -> ExportResult:
    """Write timm's hub layout (``config.json`` + ``model.safetensors``); with ``check`` reload via timm.

    ``pretrained_cfg`` (what ``timm.data.resolve_model_data_config`` reads) carries ``preprocessing``'s size,
    interpolation and mean/std (else ``mean``/``std``, default 0.5, at the native size).
    """
    from safetensors.torch import save_file

    prep = preprocessing or plain_preprocessing(_native_size(backbone), backbone.in_chans, mean, std)
    arch, model_args = timm_recipe(backbone)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    sd = {k: v.detach().contiguous().clone() for k, v in backbone.vit.state_dict().items()}
    save_file(sd, str(weights), metadata={"format": "pt", "exported_by": "medfoundry"})
    size = model_args["img_size"]
    channels = backbone.in_chans
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "medfoundry",
            "custom_load": False,
            "input_size": [channels, prep.img_size, prep.img_size],
            "fixed_input_size": False,
            "interpolation": prep.interpolation,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(prep.mean),
            "std": list(prep.std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    hint = (f"timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(weights)!r}, "
            f"num_classes=0, input_size={(channels, size, size)!r}), **{model_args!r})  "
            f"# or timm.create_model('local-dir:{out_dir}', pretrained=True)")
    result = ExportResult("timm", out_dir, [weights, out_dir / "config.json"], load_hint=hint)
    if check:
        import timm

        overlay = dict(file=str(weights), num_classes=0, input_size=(channels, size, size))
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **model_args).eval()
        x = _probe(backbone)
        with torch.no_grad():
            ours = _tokens(backbone, x)
            theirs = model.forward_features(x)
        result.max_abs_diff = float((ours - theirs).abs().max())
        _fail_if_far(result.max_abs_diff, tol, "timm export")
    return result


# -------------------------------------------------------------------------------------- safetensors
def export_safetensors(backbone: Backbone, out_dir: Path, check: bool = True, tol: float = 1e-4,
                       extra: dict | None = None) -> ExportResult:
    """Write ``Backbone.state_dict()`` as ``model.safetensors`` plus ``medfoundry_backbone.json``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    sd = {k: v.detach().contiguous().clone() for k, v in backbone.state_dict().items()}
    save_file(sd, str(weights), metadata={"format": "pt", "exported_by": "medfoundry", "backbone": backbone.name})
    info = {"name": backbone.name, "img_size": _native_size(backbone), "in_chans": backbone.in_chans,
            "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim, **(extra or {})}
    (out_dir / "medfoundry_backbone.json").write_text(json.dumps(info, indent=2))
    result = ExportResult("safetensors", out_dir, [weights, out_dir / "medfoundry_backbone.json"],
                          load_hint=f"medfoundry.models.pretrained.backbone_from_weights({str(out_dir)!r})")
    if check and backbone.name:
        from medfoundry.models.pretrained import backbone_from_weights

        reloaded, _ = backbone_from_weights(out_dir, verbose=False)
        x = _probe(backbone)
        with torch.no_grad():
            result.max_abs_diff = float((_tokens(backbone, x) - _tokens(reloaded, x)).abs().max())
        _fail_if_far(result.max_abs_diff, tol, "safetensors export")
    return result


def export_backbone(
    backbone: Backbone,
    to: ExportFormat,
    out_dir: str | Path,
    *,
    check: bool = True,
    tol: float = 1e-4,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    extra: dict | None = None,
    preprocessing: Preprocessing | None = None,
    provenance: Provenance | None = None,
) -> ExportResult:
    """Export ``backbone`` (LoRA merged into a copy; the original is untouched) to ``out_dir``.

    Args:
        to: ``hf``, ``timm`` or ``safetensors``.
        check: reload the export with the target library and compare features (raises beyond ``tol``); for
            ``hf`` also load ``preprocessor_config.json`` with ``AutoImageProcessor``.
        mean, std: input normalisation when no ``preprocessing`` is given (default 0.5 per channel).
        extra: additional provenance written to ``medfoundry_backbone.json`` and ``medfoundry_export.json``.
        preprocessing: the input preprocessing the backbone was evaluated with (default: [0, 1] pictures at the
            native size normalised by ``mean``/``std``): ``medfoundry_preprocessing.json``, timm's
            ``pretrained_cfg``, HF's ``preprocessor_config.json`` and the card's preprocessing section.
        provenance: the run it comes from (method, step, tower, checkpoint, resolved config, metrics) for the card.
    """
    if to not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {to!r}; one of {list(EXPORT_FORMATS)}")
    plain = merged_copy(backbone).eval()
    out = Path(out_dir)
    prep = preprocessing or plain_preprocessing(_native_size(plain), plain.in_chans, mean, std)
    if prep.channels != plain.in_chans:
        raise ExportError(f"the preprocessing gives {prep.channels} channels but backbone '{plain.name}' takes "
                          f"{plain.in_chans}; set data.channels to model.in_chans")
    provenance = provenance or Provenance()
    if to == "hf":
        from medfoundry.models.export_hf import export_hf

        result = export_hf(plain, out, check, tol)
    elif to == "timm":
        result = export_timm(plain, out, check, tol, preprocessing=prep)
    else:
        result = export_safetensors(plain, out, check, tol, extra)
    record = {**provenance.record(), **(extra or {})}
    result.files += _write_records(plain, to, out, prep, provenance, record, result)
    if to == "hf":
        from medfoundry.models.preprocessor_config import write_preprocessor_config

        result.files.append(write_preprocessor_config(out, prep))
        if check:
            _check_processor(out)
    card = ModelCard(plain.name or type(plain.vit).__name__, to, out, prep, architecture(plain), provenance,
                     result.max_abs_diff)
    result.files.append(write_model_card(card))
    return result


def architecture(backbone: Backbone) -> dict:
    """The backbone's shape for the card and ``medfoundry_backbone.json``: layout, patch, width, depth, heads..."""
    layout = ("DINOv3-style ViT (timm Eva, RoPE)" if is_eva(backbone)
              else "DINOv2-style ViT (timm VisionTransformer, absolute position embeddings)")
    return {"layout": layout, "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim,
            "depth": backbone.depth, "num_heads": int(backbone.vit.blocks[0].attn.num_heads),
            "registers": num_registers(backbone), "img_size": _native_size(backbone), "in_chans": backbone.in_chans}


def _write_records(backbone: Backbone, to: str, out: Path, prep: Preprocessing, provenance: Provenance,
                   record: dict, result: ExportResult) -> list[Path]:
    """The medfoundry files every export holds (see the module docstring); returns their paths."""
    import yaml

    files = [prep.save(out)]
    info = {"name": backbone.name, "img_size": _native_size(backbone), "in_chans": backbone.in_chans,
            "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim, "format": to, **record}
    (out / BACKBONE_FILE).write_text(json.dumps(info, indent=2))
    export_info = {"backbone": backbone.name, "format": to, "max_abs_diff": result.max_abs_diff,
                   "load": result.load_hint, "mean": prep.mean, "std": prep.std, **record,
                   **({"metrics": provenance.metrics} if provenance.metrics else {})}
    (out / EXPORT_FILE).write_text(json.dumps(export_info, indent=2))
    files += [out / BACKBONE_FILE, out / EXPORT_FILE]
    if provenance.run_config:
        (out / RUN_CONFIG_FILE).write_text(yaml.safe_dump(provenance.run_config, sort_keys=False))
        files.append(out / RUN_CONFIG_FILE)
    return [f for f in files if f not in result.files]


def _check_processor(out: Path) -> None:
    """``AutoImageProcessor.from_pretrained(out)`` must load the written ``preprocessor_config.json``."""
    from transformers import AutoImageProcessor

    try:
        AutoImageProcessor.from_pretrained(str(out))
    except Exception as err:  # noqa: BLE001 - any failure means the processor file is unusable
        raise ExportError(f"{out}/preprocessor_config.json: transformers cannot load it ({err}); "
                          "upgrade transformers (>= 4.56) or pass --no-check") from None


__all__ = [
    "BACKBONE_FILE",
    "EXPORT_FILE",
    "EXPORT_FORMATS",
    "RUN_CONFIG_FILE",
    "architecture",
    "ExportError",
    "ExportResult",
    "export_backbone",
    "export_safetensors",
    "export_timm",
    "timm_recipe",
]
