"""Zero-shot classification and image<->text retrieval of a CLIP-style checkpoint (``medfoundry eval --task ...``).

Functions for the ``eval`` command: :func:`run_zeroshot` and :func:`run_retrieval` take the parsed
arguments (``args.checkpoint``; optional ``args.overrides``, ``args.device``, ``args.output``,
``args.batch_size``), rebuild the :class:`~medfoundry.methods.clip.ClipMethod` from the config saved
in the checkpoint (no pretrained weights are read: the checkpoint holds them), apply the overrides
(e.g. ``clip.eval.zeroshot.labels=other.csv``), run :class:`~medfoundry.eval.clip_hook.ClipEvaluator`
and print the results as JSON. :func:`add_clip_eval_arguments` adds those options to a parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_clip_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options :func:`run_zeroshot` / :func:`run_retrieval` read (for a parser that lacks them)."""
    parser.add_argument("checkpoint", help="run folder (its best.pt, else newest checkpoint) or a .pt file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the saved config")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    parser.add_argument("--output", default="", help="also write the results to this JSON file")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=0, help="images/texts per forward")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file: ``path`` itself, or in a run folder ``best.pt`` else the newest ``checkpoints/step_*.pt``."""
    from medfoundry.train.checkpoint import latest_checkpoint

    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "best.pt").is_file():
            return p / "best.pt"
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint at {p} (give a .pt file or a run folder with checkpoints)")


def load_clip_checkpoint_method(path: str | Path, overrides: list[str] | tuple[str, ...] = (), device: str = "auto"):
    """``(method, cfg, checkpoint_path, step)`` rebuilt from a medfoundry checkpoint of a ``method: clip`` run."""
    from medfoundry.config.loader import apply_override, from_dict, parse_override, validate
    from medfoundry.methods.clip import ClipMethod
    from medfoundry.train.checkpoint import load_checkpoint
    from medfoundry.train.precision import resolve_device

    ckpt = resolve_checkpoint(path)
    state = load_checkpoint(ckpt)
    if "config" not in state or "method" not in state:
        raise ValueError(f"{ckpt} is not a medfoundry training or best checkpoint (no 'config'/'method')")
    cfg = from_dict(state["config"], source=str(ckpt))
    for item in overrides or ():
        key, value = parse_override(item)
        apply_override(cfg, key, value, source=f"override '{item}'")
    validate(cfg)
    if cfg.method != "clip":
        raise ValueError(f"{ckpt} comes from a method={cfg.method} run; zero-shot/retrieval need method=clip")
    method = ClipMethod(cfg, load_pretrained=False)
    method.load_state_dict(state["method"])
    method.to(resolve_device(device)).eval()
    return method, cfg, ckpt, int(state.get("step", 0))


def _run(args: argparse.Namespace, task: str) -> int:
    from medfoundry.eval.clip_hook import ClipEvaluator

    try:
        method, cfg, ckpt, step = load_clip_checkpoint_method(
            args.checkpoint, getattr(args, "overrides", None) or (), getattr(args, "device", "auto") or "auto")
    except (FileNotFoundError, ValueError) as err:
        print(f"medfoundry eval: {err}", file=sys.stderr)
        return 2
    if getattr(args, "batch_size", 0):
        cfg.clip.eval.batch_size = int(args.batch_size)
    if task == "zeroshot" and cfg.clip.eval.zeroshot.kind == "none":
        print("medfoundry eval: no zero-shot set configured; pass e.g. clip.eval.zeroshot.kind=manifest "
              "clip.eval.zeroshot.labels=LABELS.csv clip.eval.zeroshot.findings=[...]", file=sys.stderr)
        return 2
    if task == "retrieval" and cfg.clip.eval.retrieval.source == "none":
        print("medfoundry eval: no retrieval pairs configured; pass clip.eval.retrieval.source=train (the "
              "training pairs) or source=data with clip.eval.retrieval.data.*", file=sys.stderr)
        return 2
    results = ClipEvaluator(cfg).evaluate(method, (task,))
    record = {"checkpoint": str(ckpt), "step": step, "task": task, "results": results}
    text = json.dumps(record, indent=2, allow_nan=True)
    print(text)
    output = getattr(args, "output", "")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    return 0


def run_zeroshot(args: argparse.Namespace) -> int:
    """``medfoundry eval CHECKPOINT --task zeroshot``: prompt-pair AUCs / prompt-ensemble accuracy; exit code."""
    return _run(args, "zeroshot")


def run_retrieval(args: argparse.Namespace) -> int:
    """``medfoundry eval CHECKPOINT --task retrieval``: image<->text Recall@K; exit code."""
    return _run(args, "retrieval")
