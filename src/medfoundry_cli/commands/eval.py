"""Evaluate a checkpoint on registered tasks: medfoundry eval CHECKPOINT --task TASK[,TASK...] [--data SET].

The tasks are those of :mod:`medfoundry.eval.registry` (listed by ``--help``). Tasks on the frozen
backbone (``needs`` features or views) run here through :func:`medfoundry.eval.tasks.evaluate_backbone`;
``retrieval`` is DINO-X's label-free view-retrieval ratio: it needs no ``--data``, only images
(``--retrieval-data`` or the run's training data).

CHECKPOINT is a run folder (its newest checkpoint, or ``best.pt``/``best.dcp`` with ``--best``) or a checkpoint
file. SET is a labelled manifest (CSV/TSV/JSONL/Parquet with ``path`` and a label column, optional
``split``/``series``/``patient``) or a folder ``<label>/...`` or ``<split>/<label>/...``; it defaults
to the run's ``eval.data``. Features are cached per checkpoint, so several tasks in a row extract
them once. ``--random-init`` evaluates the same backbone at its initialisation instead;
``--compare-random`` evaluates both and writes ``RUN/eval/comparison.json`` for the report.

Image-text tasks (``needs="clip"``: zero-shot classification, image<->report retrieval) go to
:func:`medfoundry_cli.commands.eval_clip.run_task`; on a ``method=clip`` checkpoint a CLIP task's alias
(``retrieval`` for ``clip_retrieval``) means that task. Slide-level tasks (``needs="slides"``: ``slide``, with
``--slides MANIFEST``) go to :func:`medfoundry_cli.commands.eval_slide.run_task`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medfoundry_cli.commands import eval_clip, eval_slide

_TASK_LIST = "\0medfoundry-eval-task-list"  # epilog placeholder, filled by _HelpWithTasks


class _HelpWithTasks(argparse.RawDescriptionHelpFormatter):
    """Fills the epilog with the registered tasks when help is printed.

    Every CLI start builds this command's parser; reading the registry there would import
    :mod:`medfoundry.eval` (torch) for every command, so it is read only when ``--help`` is shown.
    """

    def add_text(self, text: str | None) -> None:
        if text == _TASK_LIST:
            from medfoundry.eval import registry

            text = "tasks (--task; 'all' = every task on the frozen backbone):\n" + registry.describe()
        super().add_text(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _HelpWithTasks
    parser.epilog = _TASK_LIST
    parser.add_argument("checkpoint", help="run folder or checkpoint file (.pt)")
    parser.add_argument("--task", action="append", metavar="TASK",
                        help="task to run, repeatable or comma-separated (the tasks are listed below), or all "
                             "(default: the run's eval.tasks)")
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
    parser.add_argument("--best", action="store_true", help="use the best checkpoint (RUN/best.pt; "
                        "RUN/best.dcp from an FSDP run) instead of the newest")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate the backbone at its random initialisation (baseline)")
    parser.add_argument("--compare-random", action="store_true",
                        help="evaluate the checkpoint and its random initialisation side by side")
    parser.add_argument("--cache-dir", help="feature cache folder (default: RUN/eval/feature_cache)")
    parser.add_argument("--no-cache", action="store_true", help="always recompute the features")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    eval_clip.add_arguments(parser)
    eval_slide.add_arguments(parser)


def _tasks(args: argparse.Namespace, default: list[str]) -> list[str]:
    from medfoundry.eval import registry

    raw = [t.strip() for item in (args.task or []) for t in item.split(",") if t.strip()]
    if not raw:
        return list(default)
    if "all" in raw:
        return list(registry.task_names())
    return list(dict.fromkeys(raw))


def _checkpoint_method(path: Path) -> str | None:
    """``method`` of a run folder (from config.yaml) without loading weights; None if unknown."""
    if path.is_dir() and path.suffix != ".dcp":
        cfg_path: Path | None = path / "config.yaml"
    elif path.parent.name == "checkpoints":
        cfg_path = path.parent.parent / "config.yaml"
    else:  # e.g. RUN/best.pt or RUN/best.dcp
        cfg_path = path.parent / "config.yaml"
    if cfg_path is not None and cfg_path.is_file():
        import yaml

        return (yaml.safe_load(cfg_path.read_text()) or {}).get("method")
    return None


def run(args: argparse.Namespace) -> int:
    from medfoundry.eval import registry
    from medfoundry.eval.report_context import comparison_context
    from medfoundry.eval.split_warnings import val_needs
    from medfoundry.eval.tasks import evaluate_backbone, format_results
    from medfoundry.methods.checkpoint_backbone import load_backbone

    path = Path(args.checkpoint)
    if not path.exists():
        print(f"medfoundry eval: '{path}' does not exist", file=sys.stderr)
        return 2
    requested = _tasks(args, [])
    is_clip = _checkpoint_method(path) == "clip"
    resolved = {name: registry.resolve(name, clip_checkpoint=is_clip) for name in requested}
    unknown = [name for name, task in resolved.items() if task is None]
    if unknown:
        print(f"medfoundry eval: unknown task(s) {unknown}; known: {registry.names()}", file=sys.stderr)
        return 2
    to_clip = [name for name, task in resolved.items() if task is not None and task.needs == "clip"]
    rc = 0
    for task in to_clip:
        rc = max(rc, eval_clip.run_task(task, args))
    to_slide = [name for name, task in resolved.items() if task is not None and task.needs == "slides"]
    for task in to_slide:  # slide-level MIL (--slides MANIFEST): medfoundry_cli.commands.eval_slide
        rc = max(rc, eval_slide.run_task(task, args))
    feature_tasks = [t for t in requested if t not in to_clip + to_slide]
    if requested and not feature_tasks:
        return rc

    which = "best" if args.best else "latest"
    variants = [False, True] if args.compare_random else [bool(args.random_init)]
    all_results: dict = {}
    context: dict = {}
    for random_init in variants:
        loaded = load_backbone(path, random_init=random_init, which=which, device=args.device)
        tasks = feature_tasks or list(loaded.sections.eval.tasks)
        data = args.data or loaded.sections.eval.data
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
        if any(registry.needs_of(t) == "masks" for t in tasks):  # localisation: images and masks, no labels
            summary += f"; masks from {data}"
        print(f"{loaded.checkpoint} ({loaded.label}); {summary}{'; features from cache' if from_cache else ''}")
        print(format_results(results, f"[{name}] tasks: {', '.join(tasks)}"))
        if lset is not None and not context:  # the split checks and the majority-class baseline, once
            context = comparison_context(lset, results, args.split, val_needs(tasks))
            for warning in context["warnings"]:
                print(f"medfoundry eval: warning: {warning['message']}", file=sys.stderr)
            if context["majority_class"]:
                print(format_results(context["majority_class"], f"[majority class: always "
                                     f"'{context['majority']['class']}'] same splits"))
        all_results[name] = results
        all_results.setdefault("meta", {"checkpoint": str(loaded.checkpoint), "step": loaded.step,
                                        "data": str(data), "summary": lset.summary() if lset else "",
                                        "classes": lset.classes if lset else [],
                                        "label_column": args.label_column or loaded.sections.eval.label_column})
    if args.compare_random:
        meta = all_results["meta"]
        comparison = {"checkpoint": meta["checkpoint"], "step": meta["step"], "labels": {
            meta["label_column"]: {"pretrained": all_results["pretrained"], "random_init": all_results["random_init"],
                                   "summary": meta["summary"], "classes": meta["classes"], "data": meta["data"],
                                   **context}}}
        run_dir = path if path.is_dir() else (path.parent.parent if path.parent.name == "checkpoints" else None)
        if run_dir is not None:
            out = run_dir / "eval" / "comparison.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(comparison, indent=2))
            print(f"comparison written to {out} (shown by `medfoundry report {run_dir}`)")
    if context:
        all_results["majority_class"] = context["majority_class"]
        all_results["warnings"] = context["warnings"]
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(all_results, indent=2))
    return rc
