"""Export a run's backbone: medfoundry export RUN_OR_CHECKPOINT --to hf|timm|safetensors --out DIR.

RUN_OR_CHECKPOINT is a run folder (its newest checkpoint), a checkpoint file, or any weights the
loader reads (Meta DINOv2/DINOv3 ``.pth``, HF folder, timm file - then ``--model`` names the
architecture). The evaluated backbone is exported by default (EMA teacher for ``dino``, student for
``distill``, image tower for ``clip``; ``--which`` picks another tower); LoRA adapters are merged. The
normalisation recorded with the export is the one frozen evaluation uses (the method entry's
``frozen_eval_sections``: the DINO crops' mean/std, a CLIP image tower's pixel statistics). The export is
reloaded with the target library and its features compared with medfoundry's (max abs diff must be <= 1e-4)
unless ``--no-check``.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="run folder, checkpoint file, or weights file/folder")
    parser.add_argument("--to", required=True, choices=("hf", "timm", "safetensors"), help="export format")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--which", default="auto", choices=("auto", "teacher", "student", "image"),
                        help="tower of a training checkpoint (auto: the one the method evaluates)")
    parser.add_argument("--model", default=None, help="registered backbone name, for weights that are not a run")
    parser.add_argument("--img-size", type=int, default=224, help="native input size with --model")
    parser.add_argument("--in-chans", type=int, default=3, help="input channels with --model")
    parser.add_argument("--format", default="auto", help="input weights format (auto, dinov2, dinov3, hf, timm, ...)")
    parser.add_argument("--no-check", action="store_true", help="skip reloading and comparing the export")


def _preprocessing(loaded) -> tuple[list[float] | None, list[float] | None, dict]:
    """Input normalisation and provenance from a medfoundry checkpoint's config (None otherwise)."""
    from medfoundry.methods import get_method_entry
    from medfoundry.methods.checkpoint_backbone import config_from_checkpoint
    from medfoundry.models.convert import medfoundry_ckpt

    obj = loaded[0] if loaded is not None else None
    if not medfoundry_ckpt.is_training_checkpoint(obj) or not obj.get("config"):
        return None, None, {}
    cfg = config_from_checkpoint(obj["config"], "weights to export")
    crops = get_method_entry(cfg.method).frozen_eval_sections(cfg, obj["method"]).crops
    return list(crops.mean), list(crops.std), {"step": obj.get("step"), "method": cfg.method}


def run(args: argparse.Namespace) -> int:
    from medfoundry.config.schema import ModelConfig
    from medfoundry.models.convert import PretrainedLoadError
    from medfoundry.models.export import ExportError, export_backbone
    from medfoundry.models.pretrained import backbone_from_weights, read_weights, resolve_source

    try:
        source = resolve_source(args.source)
        model = ModelConfig(name=args.model, img_size=args.img_size, in_chans=args.in_chans) if args.model else None
        fmt = args.format
        if fmt == "auto" and args.which != "auto":
            fmt = f"medfoundry:{args.which}"
        loaded = None
        if source.is_file() and source.suffix != ".safetensors":
            loaded = read_weights(source, fmt if fmt != "auto" else "medfoundry", "weights to export")
        backbone, _ = backbone_from_weights(source, which=args.which, fmt=fmt, model=model, preloaded=loaded,
                                            what="weights to export")
        mean, std, extra = _preprocessing(loaded)
        extra["source"] = str(source)
        result = export_backbone(backbone, args.to, args.out, check=not args.no_check, mean=mean, std=std,
                                 extra=extra)
    except (PretrainedLoadError, ExportError, KeyError, ValueError) as err:
        print(f"medfoundry export: {err}", file=sys.stderr)
        return 1
    diff = "not checked" if result.max_abs_diff is None else f"max abs diff {result.max_abs_diff:.2e} vs medfoundry"
    print(f"exported {backbone.name} to {result.out_dir} ({result.format}; {diff})")
    print(f"load with: {result.load_hint}")
    return 0
