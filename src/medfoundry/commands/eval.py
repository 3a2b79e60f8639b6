"""Evaluate a checkpoint's frozen features: medfoundry eval CHECKPOINT --task knn|linear|retrieval|health --data SET.

``retrieval`` is DINO-X's label-free view-retrieval ratio: it needs no ``--data``, only images
(``--retrieval-data`` or the run's training data).

CHECKPOINT is a run folder (its newest checkpoint, or ``best.pt`` with ``--best``) or a checkpoint
file. SET is a labelled manifest (CSV/TSV/JSONL/Parquet with ``path`` and a label column, optional
``split``/``series``/``patient``) or a folder ``<label>/...`` or ``<split>/<label>/...``; it defaults
to the run's ``eval.data``. Features are cached per checkpoint, so several tasks in a row extract
them once. ``--random-init`` evaluates the same backbone at its initialisation instead;
``--compare-random`` evaluates both and writes ``RUN/eval/comparison.json`` for the report.

Image-text tasks of CLIP-style checkpoints (zero-shot classification, image<->report retrieval)
live in :mod:`medfoundry.commands.eval_clip`. When that module exists it is dispatched to for its
own task names, and for ``--task retrieval`` on a ``method=clip`` checkpoint. Its contract:
``TASKS: tuple[str, ...]``, optional ``add_arguments(parser)`` for extra options, and
``run_task(task: str, args: argparse.Namespace) -> int``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FEATURE_TASKS = ("knn", "linear", "retrieval", "health")


def _clip_module():
    """The CLIP evaluation command module, or None while it does not exist."""
    import importlib

    try:
        return importlib.import_module("medfoundry.commands.eval_clip")
    except ModuleNotFoundError as err:
        if err.name != "medfoundry.commands.eval_clip":
            raise
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    clip = _clip_module()
    clip_tasks = tuple(getattr(clip, "TASKS", ())) if clip is not None else ()
    parser.add_argument("checkpoint", help="run folder or checkpoint file (.pt)")
    names = ", ".join(dict.fromkeys(FEATURE_TASKS + clip_tasks))
    parser.add_argument("--task", action="append", metavar="TASK",
                        help=f"task to run, repeatable or comma-separated: {names}"
                             " (retrieval: image-text for method=clip runs, else augmented-view retrieval), "
                             "or all (default: the run's eval.tasks)")
    parser.add_argument("--data", help="labelled set: manifest file or label-per-folder image folder "
                                       "(default: the run's eval.data)")
    parser.add_argument("--retrieval-data", help="label-free image folder or prepared set for the DINO-X view "
                                                 "retrieval (default: eval.retrieval_root, else the run's data.root)")
    parser.add_argument("--retrieval-kind", help="data.kind of --retrieval-data (default: eval.retrieval_kind / "
                                                 "data.kind)")
    parser.add_argument("--retrieval-images", type=int, help="N of the view-retrieval ratio (default: "
                                                             "eval.retrieval_images, DINO-X's 4096)")
    parser.add_argument("--label-column", help="manifest column with the label (default: eval.label_column)")
    parser.add_argument("--feature", choices=("cls", "mean_patch", "both"),
                        help="class token, mean patch token or both (default: eval.feature)")
    parser.add_argument("--aggregate", choices=("none", "series"),
                        help="'series': average each series' slice features (3-D evaluation)")
    parser.add_argument("--img-size", type=int, default=0, help="input side for feature extraction")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="kNN query split (default test)")
    parser.add_argument("--k", type=int, nargs="+", help="kNN neighbour counts (default: eval.knn_k)")
    parser.add_argument("--n-bootstrap", type=int, help="bootstrap resamples for confidence intervals")
    parser.add_argument("--best", action="store_true", help="use RUN/best.pt instead of the newest checkpoint")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate the backbone at its random initialisation (baseline)")
    parser.add_argument("--compare-random", action="store_true",
                        help="evaluate the checkpoint and its random initialisation side by side")
    parser.add_argument("--cache-dir", help="feature cache folder (default: RUN/eval/feature_cache)")
    parser.add_argument("--no-cache", action="store_true", help="always recompute the features")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    if clip is not None and hasattr(clip, "add_arguments"):
        clip.add_arguments(parser)


def _tasks(args: argparse.Namespace, default: list[str]) -> list[str]:
    raw = [t.strip() for item in (args.task or []) for t in item.split(",") if t.strip()]
    if not raw:
        return list(default)
    if "all" in raw:
        return list(FEATURE_TASKS)
    return list(dict.fromkeys(raw))


def _checkpoint_method(path: Path) -> str | None:
    """``method`` of a run folder (from config.yaml) without loading weights; None if unknown."""
    if path.is_dir() and path.suffix != ".dcp":
        cfg_path: Path | None = path / "config.yaml"
    elif path.parent.name == "checkpoints":
        cfg_path = path.parent.parent / "config.yaml"
    else:  # e.g. RUN/best.pt
        cfg_path = path.parent / "config.yaml"
    if cfg_path is not None and cfg_path.is_file():
        import yaml

        return (yaml.safe_load(cfg_path.read_text()) or {}).get("method")
    return None


def run(args: argparse.Namespace) -> int:
    from medfoundry.eval.load import load_backbone
    from medfoundry.eval.tasks import evaluate_backbone, format_results

    path = Path(args.checkpoint)
    if not path.exists():
        print(f"medfoundry eval: '{path}' does not exist", file=sys.stderr)
        return 2
    clip = _clip_module()
    requested = _tasks(args, [])
    clip_tasks = tuple(getattr(clip, "TASKS", ())) if clip is not None else ()
    is_clip = _checkpoint_method(path) == "clip"
    to_clip = [t for t in requested if (t in clip_tasks and t not in FEATURE_TASKS)
               or (is_clip and t in clip_tasks)]
    unknown = [t for t in requested if t not in FEATURE_TASKS and t not in clip_tasks]
    if unknown:
        hint = "" if clip is not None else " (image-text tasks need medfoundry.commands.eval_clip)"
        print(f"medfoundry eval: unknown task(s) {unknown}; known: {list(FEATURE_TASKS + clip_tasks)}{hint}",
              file=sys.stderr)
        return 2
    rc = 0
    for task in to_clip:
        rc = max(rc, int(clip.run_task(task, args) or 0))
    feature_tasks = [t for t in requested if t not in to_clip]
    if requested and not feature_tasks:
        return rc

    which = "best" if args.best else "latest"
    variants = [False, True] if args.compare_random else [bool(args.random_init)]
    all_results: dict = {}
    for random_init in variants:
        loaded = load_backbone(path, random_init=random_init, which=which, device=args.device)
        tasks = feature_tasks or list(loaded.cfg.eval.tasks)
        data = args.data or loaded.cfg.eval.data
        retrieval = {"retrieval_root": args.retrieval_data, "retrieval_kind": args.retrieval_kind,
                     "retrieval_images": args.retrieval_images}
        try:
            results, lset, from_cache = evaluate_backbone(
                loaded, tasks, data=data, label_column=args.label_column, feature=args.feature,
                aggregate=args.aggregate, img_size=args.img_size, query_split=args.split, knn_k=args.k,
                n_bootstrap=args.n_bootstrap, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                retrieval=retrieval,
            )
        except (ValueError, FileNotFoundError) as err:
            print(f"medfoundry eval: {err}", file=sys.stderr)
            return 2
        name = "random_init" if random_init else "pretrained"
        summary = f"data {data}: {len(lset)} images, {lset.summary()}" if lset is not None else "label-free"
        print(f"{loaded.checkpoint} ({loaded.label}); {summary}{'; features from cache' if from_cache else ''}")
        print(format_results(results, f"[{name}] tasks: {', '.join(tasks)}"))
        all_results[name] = results
        all_results.setdefault("meta", {"checkpoint": str(loaded.checkpoint), "step": loaded.step,
                                        "data": str(data), "summary": lset.summary() if lset else "",
                                        "classes": lset.classes if lset else [],
                                        "label_column": args.label_column or loaded.cfg.eval.label_column})
    if args.compare_random:
        meta = all_results["meta"]
        comparison = {"checkpoint": meta["checkpoint"], "step": meta["step"], "labels": {
            meta["label_column"]: {"pretrained": all_results["pretrained"], "random_init": all_results["random_init"],
                                   "summary": meta["summary"], "classes": meta["classes"]}}}
        run_dir = path if path.is_dir() else (path.parent.parent if path.parent.name == "checkpoints" else None)
        if run_dir is not None:
            out = run_dir / "eval" / "comparison.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(comparison, indent=2))
            print(f"comparison written to {out} (shown by `medfoundry report {run_dir}`)")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(all_results, indent=2))
    return rc
