"""Slide-level evaluation of a checkpoint (``medfoundry eval CHECKPOINT --task slide --slides MANIFEST``).

The ``eval`` command hands its tasks with ``needs="slides"`` (:mod:`medfoundry.eval.registry`: ``slide``) to
:func:`run_task`; :func:`add_arguments` adds their options. The backbone is the checkpoint's evaluated one
(:func:`medfoundry.methods.checkpoint_backbone.load_backbone`, or its random initialisation with ``--random-init``;
both with ``--compare-random``); the tiles default to the run's ``data.tile_mpp`` / ``data.tile_size`` /
``data.min_tissue``, so the backbone sees tiles of the physical size it was trained on. Tile features are cached
like the other tasks' features (``RUN/eval/feature_cache`` or ``--cache-dir``); heat maps and per-slide
predictions go to ``--slide-out`` (default ``RUN/eval/slide/<pretrained|random_init>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the slide-level task that the ``eval`` command lacks (``--label-column``, ``--feature``,
    ``--img-size``, ``--n-bootstrap``, ``--cache-dir``, ``--no-cache``, ``--json`` are shared)."""
    group = parser.add_argument_group("slide-level evaluation (--task slide)")
    group.add_argument("--slides", metavar="MANIFEST",
                       help="slide manifest: CSV/TSV/JSONL/Parquet with slide path, label and patient columns "
                            "(optional split; without it slides are split by patient)")
    group.add_argument("--slide-column", default="path", help="manifest column with the slide file (default path)")
    group.add_argument("--patient-column", default="patient",
                       help="manifest column with the patient id (default patient; also patient_id, subject, case)")
    group.add_argument("--tile-mpp", type=float, help="tile microns per pixel (default: the run's data.tile_mpp)")
    group.add_argument("--tile-size", type=int, help="tile side in pixels (default: the run's data.tile_size)")
    group.add_argument("--min-tissue", type=float, help="smallest tissue fraction of a tile (default: data.min_tissue)")
    group.add_argument("--max-tiles", type=int, help="tiles per slide, evenly spread (default 256; 0 = all)")
    group.add_argument("--aggregator", help="comma-separated slide aggregators: mean, abmil (default: both)")
    group.add_argument("--epochs", type=int, help="gated attention MIL epochs (default 40; epoch chosen on val)")
    group.add_argument("--slide-out", metavar="DIR",
                       help="heat maps and per-slide predictions (default RUN/eval/slide/<pretrained|random_init>)")


def _run_dir(path: Path) -> Path | None:
    """The run folder of ``path`` (a run folder itself, or a checkpoint inside one), else None."""
    from medfoundry.checkpoints.format import is_sharded_checkpoint
    from medfoundry.methods.checkpoint_backbone import run_folder_of

    if path.is_dir() and not is_sharded_checkpoint(path):  # a run folder
        return path
    return run_folder_of(path)


def run_task(task: str, args: argparse.Namespace) -> int:
    """Run registered slide task ``task`` on ``args.checkpoint``; print the results; the exit code."""
    from medfoundry.errors import UserError
    from medfoundry.eval import registry
    from medfoundry.eval.slide.context import slide_context
    from medfoundry.eval.slide.evaluate import evaluate_slides
    from medfoundry.eval.split_warnings import labelled_set_warnings
    from medfoundry.eval.tasks import default_feature_cache, format_results
    from medfoundry.methods.checkpoint_backbone import load_backbone

    found = registry.get(task)
    if found.needs != "slides":
        print(f"medfoundry eval: '{task}' is not a slide-level task", file=sys.stderr)
        return 2
    if not getattr(args, "slides", None):
        print("medfoundry eval: --task slide needs --slides MANIFEST (columns path, label, patient[, split])",
              file=sys.stderr)
        return 2
    path = Path(args.checkpoint)
    aggregators = None
    if getattr(args, "aggregator", None):
        aggregators = tuple(a.strip() for a in args.aggregator.split(",") if a.strip())
    run_dir = _run_dir(path)
    variants = [False, True] if getattr(args, "compare_random", False) else [bool(getattr(args, "random_init", False))]
    record: dict = {}
    for random_init in variants:
        name = "random_init" if random_init else "pretrained"
        try:
            loaded = load_backbone(path, random_init=random_init, which="best" if args.best else "latest",
                                   device=args.device)
            use_cache = not args.no_cache and loaded.sections.eval.cache_features
            base = Path(args.slide_out) if args.slide_out else \
                run_dir / "eval" / "slide" if run_dir else Path("slide_eval")
            out = base / name
            ctx = slide_context(
                loaded.sections, args.slides, slide_column=args.slide_column,
                label_column=args.label_column or "label", patient_column=args.patient_column,
                img_size=args.img_size, identity=loaded.identity if use_cache else "",
                cache_dir=args.cache_dir or default_feature_cache(loaded.checkpoint), out_dir=out,
                tile_mpp=args.tile_mpp, tile_size=args.tile_size, min_tissue=args.min_tissue,
                max_tiles=args.max_tiles, aggregators=aggregators, epochs=args.epochs, feature=args.feature,
                n_bootstrap=args.n_bootstrap)
            result = evaluate_slides(loaded.backbone, ctx)
        except (ValueError, FileNotFoundError, UserError) as err:
            print(f"medfoundry eval: {err}", file=sys.stderr)
            return 2
        lset, s = ctx.slides, ctx.settings
        patients = len({it.patient for it in lset.items})
        print(f"{loaded.checkpoint} ({loaded.label}); slides {args.slides}: {len(lset)} slides of {patients} "
              f"patients, {lset.summary()}; {s.tile_size}-px tiles at {s.tile_mpp} µm/px, "
              f"{result.metrics['slide_tiles_mean']:.1f} per slide; tile features from cache for "
              f"{result.from_cache}/{len(lset)} slides")
        print(format_results(result.metrics, f"[{name}] task: {task} (test slides unless 'val')"))
        if result.heatmaps:
            print(f"attention heat maps of {len(result.heatmaps)} test slides in {out / 'heatmaps'}")
        warnings = [w.as_dict() for w in labelled_set_warnings(lset)]
        if not record:
            for w in warnings:
                print(f"medfoundry eval: warning: {w['message']}", file=sys.stderr)
        record[name] = result.metrics
        record.setdefault("meta", {"checkpoint": str(loaded.checkpoint), "step": loaded.step,
                                   "slides": str(args.slides), "summary": lset.summary(), "classes": lset.classes,
                                   "tile_mpp": s.tile_mpp, "tile_size": s.tile_size,
                                   "aggregators": list(s.aggregators), "warnings": warnings})
        record.setdefault("outputs", {})[name] = str(out)
    if getattr(args, "json_out", None):
        out_json = Path(args.json_out)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({task: record}, indent=2, allow_nan=True) + "\n")
    return 0
