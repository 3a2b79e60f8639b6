"""Export a run's backbone: medfoundry export RUN_OR_CHECKPOINT --to hf|timm|safetensors --out DIR.

RUN_OR_CHECKPOINT is a run folder (its newest checkpoint), a checkpoint file, or any weights the
loader reads (Meta DINOv2/DINOv3 ``.pth``, HF folder, timm file - then ``--model`` names the
architecture). The evaluated backbone is exported by default (EMA teacher for ``dino``, student for
``distill``, image tower for ``clip``; ``--which`` picks another tower); LoRA adapters are merged. The
normalisation recorded with the export is the one frozen evaluation uses (the method entry's
``frozen_eval_sections``: the DINO crops' mean/std, a CLIP image tower's pixel statistics). The export is
reloaded with the target library and its features compared with medfoundry's (max abs diff must be <= 1e-4)
unless ``--no-check``. Every export folder also gets a model card (README.md: recipe, intensity settings, data
path, the run's evaluation results, how to load it), ``medfoundry_preprocessing.json`` and, for ``hf``, a
``preprocessor_config.json`` for ``transformers.AutoImageProcessor``; ``medfoundry eval`` reads the folder back.
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


def run(args: argparse.Namespace) -> int:
    from medfoundry.checkpoints.format import is_sharded_checkpoint
    from medfoundry.config.schema import ModelConfig
    from medfoundry.methods.checkpoint_backbone import export_provenance
    from medfoundry.methods.exported_backbone import export_folder, export_record
    from medfoundry.models.convert import PretrainedLoadError, medfoundry_ckpt
    from medfoundry.models.export import ExportError, export_backbone
    from medfoundry.models.model_card import Provenance
    from medfoundry.models.pretrained import backbone_from_weights, read_weights, resolve_source

    try:
        source = resolve_source(args.source)
        model = ModelConfig(name=args.model, img_size=args.img_size, in_chans=args.in_chans) if args.model else None
        fmt = args.format
        if fmt == "auto" and args.which != "auto":
            fmt = f"medfoundry:{args.which}"
        loaded = None
        if (source.is_file() and source.suffix != ".safetensors") or is_sharded_checkpoint(source):
            loaded = read_weights(source, fmt if fmt != "auto" else "medfoundry", "weights to export")
        backbone, _ = backbone_from_weights(source, which=args.which, fmt=fmt, model=model, preloaded=loaded,
                                            what="weights to export")
        prep, provenance = None, Provenance(source=str(source))
        if loaded is not None and medfoundry_ckpt.is_training_checkpoint(loaded[0]) and loaded[0].get("config"):
            prep, provenance = export_provenance(loaded[0], source, args.which, channels=backbone.in_chans)
        elif model is None and export_folder(source) is not None:  # re-exporting an export keeps its records
            prep, provenance = export_record(export_folder(source))
        result = export_backbone(backbone, args.to, args.out, check=not args.no_check, preprocessing=prep,
                                 provenance=provenance)
    except (PretrainedLoadError, ExportError, KeyError, ValueError) as err:
        print(f"medfoundry export: {err}", file=sys.stderr)
        return 1
    diff = "not checked" if result.max_abs_diff is None else f"max abs diff {result.max_abs_diff:.2e} vs medfoundry"
    print(f"exported {backbone.name} to {result.out_dir} ({result.format}; {diff})")
    print(f"load with: {result.load_hint}")
    return 0
