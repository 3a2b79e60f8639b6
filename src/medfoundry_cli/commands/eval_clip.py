"""Zero-shot classification and image<->text retrieval of a CLIP-style checkpoint (``medfoundry eval --task ...``).

The ``eval`` command hands its tasks with ``needs="clip"`` (:mod:`medfoundry.eval.registry`: ``zeroshot``,
``clip_retrieval``, alias ``retrieval``) to :func:`run_task`; :func:`add_arguments` adds their options.
:func:`run_task` rebuilds the :class:`~medfoundry.methods.clip.method.ClipMethod` from the config saved in the
checkpoint (no pretrained weights are read: the checkpoint holds them), applies overrides
(``--override clip.eval.zeroshot.labels=other.csv``; ``--data`` is a shortcut for the labelled set or the
pair manifest), runs the registered task and prints the results as JSON.

Arguments read (all optional but ``checkpoint``, so a partial ``argparse.Namespace`` will do):
``checkpoint``, ``best``, ``device``, ``data``, ``label_column``, ``n_bootstrap``, ``json_out`` (or
``output``), ``clip_overrides`` (or ``overrides``), ``batch_size``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medfoundry.eval.registry import EvalTask


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the image-text tasks that the ``eval`` command lacks."""
    parser.add_argument("--override", dest="clip_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="zeroshot/clip_retrieval: override the checkpoint's saved config, e.g. "
                             "clip.eval.zeroshot.findings=[Edema,Cardiomegaly] (repeatable)")


def task_names() -> list[str]:
    """The names (and aliases) :func:`run_task` accepts: the registered ``clip`` tasks."""
    from medfoundry.eval import registry

    return list(dict.fromkeys(n for t in registry.all_tasks() if t.needs == "clip" for n in (t.name, *t.aliases)))


def load_clip_checkpoint_method(path: str | Path, overrides: list[str] | tuple[str, ...] = (), device: str = "auto",
                                best: bool = False):
    """``(method, cfg, checkpoint_path, step)`` rebuilt from a medfoundry checkpoint of a ``method: clip`` run."""
    from medfoundry.checkpoints.format import load_checkpoint
    from medfoundry.config.loader import apply_overrides, from_dict, validate
    from medfoundry.methods.checkpoint_backbone import resolve_checkpoint
    from medfoundry.methods.clip.method import ClipMethod
    from medfoundry.precision import resolve_device

    ckpt = resolve_checkpoint(path, "best" if best else "latest")
    state = load_checkpoint(ckpt)
    if "config" not in state or "method" not in state:
        raise ValueError(f"{ckpt} is not a medfoundry training or best checkpoint (no 'config'/'method')")
    cfg = from_dict(state["config"], source=str(ckpt))
    if not hasattr(cfg, "clip"):  # the tasks need the run's clip section (text tower, evaluation sets)
        raise ValueError(f"{ckpt} comes from a method={cfg.method} run; zero-shot/retrieval need method=clip")
    apply_overrides(cfg, overrides or ())
    cfg.clip.eval.best_metric = ""  # evaluating a checkpoint chooses none (its run's choice may predate the val rule)
    validate(cfg)
    method = ClipMethod(cfg.model, cfg.clip, cfg.adapt, load_pretrained=False)
    method.load_state_dict(state["method"])
    method.to(resolve_device(device)).eval()
    return method, cfg, ckpt, int(state.get("step", 0))


def _shortcuts(args: argparse.Namespace, task: str) -> list[str]:
    """Config overrides implied by the ``eval`` command's generic options for registered CLIP task ``task``."""
    out = []
    data = getattr(args, "data", None)
    if data and task == "zeroshot":
        out += ["clip.eval.zeroshot.kind=manifest", f"clip.eval.zeroshot.labels={data}"]
        if getattr(args, "label_column", None):
            out.append(f"clip.eval.zeroshot.label_column={args.label_column}")
    elif data and task == "clip_retrieval":
        out += ["clip.eval.retrieval.source=data", "clip.eval.retrieval.data.kind=manifest",
                f"clip.eval.retrieval.data.manifest={data}"]
    if getattr(args, "n_bootstrap", None) is not None:
        out.append(f"clip.eval.zeroshot.bootstrap={int(args.n_bootstrap)}")
    if getattr(args, "batch_size", 0):
        out.append(f"clip.eval.batch_size={int(args.batch_size)}")
    return out


def _unconfigured(task: str, cfg) -> str | None:
    """Why registered CLIP task ``task`` has nothing to evaluate under ``cfg``, or None."""
    if task == "zeroshot" and cfg.clip.eval.zeroshot.kind == "none":
        return ("no zero-shot set configured; pass --data LABELS.csv (with --override "
                "clip.eval.zeroshot.findings=[...] or --label-column) or --override clip.eval.zeroshot.*")
    if task == "clip_retrieval" and cfg.clip.eval.retrieval.source == "none":
        return ("no retrieval pairs configured; pass --data PAIRS.csv or --override "
                "clip.eval.retrieval.source=train (the training pairs)")
    return None


def _run(args: argparse.Namespace, task: EvalTask, name: str) -> int:
    """Run registered CLIP task ``task`` (asked for as ``name``) on ``args.checkpoint``; the exit code."""
    from medfoundry.config import ConfigError
    from medfoundry.eval.registry import EvalInputs
    from medfoundry.methods.clip.pipeline import eval_context

    overrides = _shortcuts(args, task.name) + list(getattr(args, "clip_overrides", None) or [])
    overrides += list(getattr(args, "overrides", None) or [])
    try:
        method, cfg, ckpt, step = load_clip_checkpoint_method(
            args.checkpoint, overrides, getattr(args, "device", "auto") or "auto", bool(getattr(args, "best", False)))
    except (FileNotFoundError, ValueError, ConfigError) as err:
        print(f"medfoundry eval: {err}", file=sys.stderr)
        return 2
    problem = _unconfigured(task.name, cfg)
    if problem:
        print(f"medfoundry eval: {problem}", file=sys.stderr)
        return 2
    results = task.run(EvalInputs(clip_method=method, clip=eval_context(cfg)))
    record = {"checkpoint": str(ckpt), "step": step, "task": name, "results": results}
    text = json.dumps(record, indent=2, allow_nan=True)
    print(text)
    output = getattr(args, "json_out", None) or getattr(args, "output", None)
    if output:  # {"zeroshot": record, "retrieval": record}: tasks of one invocation share the file
        out = Path(output)
        merged: dict = {}
        if out.is_file():
            try:
                previous = json.loads(out.read_text())
                if isinstance(previous, dict) and previous and set(previous) <= set(task_names()):
                    merged = previous
            except ValueError:
                pass
        merged[name] = record
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(merged, indent=2, allow_nan=True) + "\n")
    return 0


def run_task(task: str, args: argparse.Namespace) -> int:
    """Dispatch entry of the ``eval`` command: a registered CLIP task's name or alias; returns the exit code."""
    from medfoundry.eval import registry

    found = registry.resolve(task, clip_checkpoint=True)
    if found is None or found.needs != "clip":
        print(f"medfoundry eval: unknown image-text task '{task}'; known: {task_names()}", file=sys.stderr)
        return 2
    return _run(args, found, task)


def run_zeroshot(args: argparse.Namespace) -> int:
    """``medfoundry eval CHECKPOINT --task zeroshot``: prompt-pair AUCs / prompt-ensemble accuracy; exit code."""
    return run_task("zeroshot", args)


def run_retrieval(args: argparse.Namespace) -> int:
    """``medfoundry eval CHECKPOINT --task retrieval``: image<->text Recall@K; exit code."""
    return run_task("retrieval", args)
