"""Zero-shot and retrieval evaluation of a CLIP-style method, in training (a hook) and from checkpoints.

:class:`ClipEvaluator` embeds the external labelled set of ``clip.eval.zeroshot`` and the image-report
pairs of ``clip.eval.retrieval`` with the method's two towers (evaluation preprocessing: resize and
centre crop, no augmentation) and runs :mod:`medfoundry.eval.zero_shot`:

* ``zeroshot/auc/<finding>`` (+ ``auc_low``/``auc_high`` bootstrap CI) and ``zeroshot/mean_auc`` from
  CheXzero's positive/negative prompt pairs (Tiu et al. 2022);
* ``zeroshot/accuracy``, ``zeroshot/balanced_accuracy``, ``zeroshot/macro_auc`` from class-name x
  template prompt ensembles (Radford et al. 2021);
* ``retrieval/i2t_recall_at_{k}``, ``retrieval/t2i_recall_at_{k}`` and ``retrieval/chance_at_{k}``;
* ``val/contrastive_loss`` (and ``val/num_pairs``): the training loss module (InfoNCE or SigLIP, the
  current logit scale and bias) on held-out pairs of ``clip.eval.val_loss``, in batches like training
  steps (:func:`contrastive_val_loss`).

:class:`ClipEvalHook` runs zero-shot and retrieval every ``clip.eval.every_steps`` steps and at the
last step (rank 0 computes, the result is broadcast so every rank returns the same keys), the
validation loss every ``clip.eval.val_loss.every_steps`` steps and at the last step (every rank
encodes its share of each batch, the loss module gathers the shares as in training), appends
``RUN/eval/clip_history.jsonl`` and keeps ``RUN/best.pt`` + ``RUN/best.json`` for the best value of
``clip.eval.best_metric`` (same record layout as the frozen-feature evaluation hook).

:func:`run_zeroshot_task` and :func:`run_retrieval_task` are the registered tasks ``zeroshot`` and
``clip_retrieval`` (:mod:`medfoundry.eval.registry`) that ``medfoundry eval`` runs on a checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from medfoundry.config.clip import ClipDataConfig, ClipEvalConfig, ClipPreprocessConfig, best_direction
from medfoundry.distributed.setup import all_reduce_mean_
from medfoundry.distributed.setup import is_main_process as _is_main
from medfoundry.distributed.setup import say as _say
from medfoundry.eval.best import BestCheckpoint

if TYPE_CHECKING:
    from medfoundry.eval.registry import EvalInputs

_MAX_CACHED_ELEMENTS = 1 << 27  # preprocessed evaluation images kept in memory up to ~512 MiB


def _rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def val_loss_spans(n: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the validation-loss batches over the first ``n`` pairs.

    Consecutive batches of ``batch_size`` pairs; a last incomplete batch is left out (fewer negatives
    would make its loss incomparable). With fewer than ``batch_size`` pairs, one batch of all of them.
    Every batch is cut into ``world_size`` equal rank shares, so sizes are rounded down to a multiple
    of it; raises ``ValueError`` when ``batch_size`` is not a multiple or there are too few pairs.
    """
    if batch_size % world_size:
        raise ValueError(f"clip.eval.val_loss.batch_size (or train.batch_size) = {batch_size} must be a multiple "
                         f"of the {world_size} ranks")
    if n < batch_size:
        batch_size = n - n % world_size
    if batch_size < 2:
        raise ValueError(f"the validation loss needs at least 2 pairs (and one per rank); it has {n}")
    return [(start, start + batch_size) for start in range(0, n - batch_size + 1, batch_size)]


def contrastive_val_loss(loss_fn: nn.Module, encode: Callable[[int, int], tuple[Tensor, Tensor]],
                         spans: list[tuple[int, int]], logit_scale: Tensor, logit_bias: Tensor | None) -> float:
    """Mean of ``loss_fn`` over the batches ``spans``, computed the way a training step computes it.

    ``encode(lo, hi)`` returns the unit image and text features of pairs ``lo..hi-1``. Under
    ``torch.distributed`` every rank (all must call this) encodes its equal share of each batch, the
    loss module gathers the other ranks' features as in training and the per-rank values are averaged,
    which equals the loss of one process holding the whole batch (the losses' DDP contract).
    """
    rank, world = _rank_world()
    total = 0.0
    for start, stop in spans:
        share = (stop - start) // world
        lo = start + rank * share
        img, txt = encode(lo, lo + share)
        value = loss_fn(img.float(), txt.float(), logit_scale.float(),
                        None if logit_bias is None else logit_bias.float()).detach().clone()
        total += float(all_reduce_mean_(value))
    return total / len(spans)


class _EvalMode:
    """Put a module in eval mode (and no-grad) for the duration of a ``with`` block, then restore it."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was_training = module, module.training

    def __enter__(self) -> None:
        self.module.eval()
        self._grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def __exit__(self, *exc) -> None:
        torch.set_grad_enabled(self._grad)
        self.module.train(self.was_training)


@dataclass(frozen=True)
class ClipEvalContext:
    """What CLIP evaluation reads of a run: the ``clip`` section's ``eval``, ``preprocess`` and ``data`` parts,
    the image channels (``model.in_chans``), ``train.precision``, and ``train.batch_size`` (the validation-loss
    batch when ``clip.eval.val_loss.batch_size`` is 0). The CLIP pipeline builds it from the run config."""

    eval: ClipEvalConfig
    preprocess: ClipPreprocessConfig
    data: ClipDataConfig
    in_chans: int
    precision: str = "auto"
    batch_size: int = 32


class ClipEvaluator:
    """Embeds and scores the configured evaluation sets with a :class:`~medfoundry.methods.clip.method.ClipMethod`.

    Sets are read and preprocessed once and kept in memory when small enough.
    """

    def __init__(self, ctx: ClipEvalContext) -> None:
        from medfoundry.data.pair_loader import PairImageTransform

        self.ctx = ctx
        self.ec = ctx.eval
        self.transform = PairImageTransform(ctx.preprocess, ctx.in_chans, train=False)
        self._zs = None
        self._zs_images: Tensor | None = None
        self._ret = None
        self._ret_images: Tensor | None = None
        self._val = None
        self._val_images: dict[int, Tensor] = {}

    # -- images ------------------------------------------------------------------------------------------------
    def _preprocess_all(self, load: Callable[[int], Tensor], n: int) -> Tensor | None:
        s = self.ctx.preprocess.size
        if n * self.ctx.in_chans * s * s > _MAX_CACHED_ELEMENTS:
            return None
        return torch.stack([self.transform(load(i)) for i in range(n)])

    def encode_images(self, method, load: Callable[[int], Tensor], n: int, cached: Tensor | None) -> Tensor:
        """(n, D) unit image embeddings of images ``load(0..n-1)`` (evaluation preprocessing)."""
        device = method.logit_scale.device
        out = []
        bs = max(1, self.ec.batch_size)
        with self._autocast(device):
            for start in range(0, n, bs):
                stop = min(n, start + bs)
                if cached is not None:
                    x = cached[start:stop]
                else:
                    x = torch.stack([self.transform(load(i)) for i in range(start, stop)])
                out.append(method.encode_image(x.to(device)).float().cpu())
        return torch.cat(out)

    def encode_texts(self, method, texts: list[str]) -> Tensor:
        """(N, D) unit text embeddings."""
        device = method.logit_scale.device
        with self._autocast(device):
            return method.encode_texts(texts, self.ec.batch_size).float().cpu()

    def _autocast(self, device: torch.device):
        from medfoundry.precision import autocast, resolve_precision

        return autocast(resolve_precision(self.ctx.precision, device), device)

    # -- tasks -------------------------------------------------------------------------------------------------
    def zeroshot(self, method) -> dict[str, float]:
        """Prompt-pair AUCs per finding and/or multi-class prompt-ensemble metrics (keys without prefix)."""
        from medfoundry.data.pairs import build_labelled_images
        from medfoundry.eval.zero_shot import (
            class_embeddings,
            multiclass_zero_shot,
            prompt_pair_auc,
            prompt_pair_probabilities,
        )

        zc = self.ec.zeroshot
        if self._zs is None:
            self._zs = build_labelled_images(zc, self.ctx.data.demo_dir)
            self._zs_images = self._preprocess_all(self._zs.load_image, len(self._zs))
            _say(f"zero-shot evaluation set: {len(self._zs)} images ({zc.kind}); findings {self._zs.findings}; "
                 f"classes {self._zs.class_names}")
        ls = self._zs
        with _EvalMode(method):
            img = self.encode_images(method, ls.load_image, len(ls), self._zs_images)
            out: dict[str, float] = {}
            if ls.binary is not None:
                pos = self.encode_texts(method, [zc.positive_template.format(f) for f in ls.findings])
                neg = self.encode_texts(method, [zc.negative_template.format(f) for f in ls.findings])
                probs = prompt_pair_probabilities(img, pos, neg).numpy()
                out.update(prompt_pair_auc(ls.binary, probs, ls.findings, zc.bootstrap))
            if ls.classes is not None:
                cls_emb = class_embeddings(lambda t: self.encode_texts(method, t), ls.class_names, zc.templates)
                out.update(multiclass_zero_shot(img, cls_emb, ls.classes, zc.bootstrap))
        return out

    def retrieval(self, method) -> dict[str, float]:
        """Image<->text Recall@K on the configured pairs (identical texts all count as correct)."""
        from medfoundry.data.pairs import build_pairs
        from medfoundry.eval.zero_shot import image_text_retrieval

        rc = self.ec.retrieval
        if self._ret is None:
            pairs = build_pairs(self.ctx.data if rc.source == "train" else rc.data)
            n = min(len(pairs), rc.max_pairs) if rc.max_pairs > 0 else len(pairs)
            self._ret = (pairs, n)
            self._ret_images = self._preprocess_all(pairs.load_image, n)
            _say(f"retrieval evaluation: {n} image-report pairs ({rc.source})")
        pairs, n = self._ret
        texts = [" ".join(t.lower().split()) for t in pairs.texts[:n]]
        index: dict[str, int] = {}
        groups = np.asarray([index.setdefault(t, len(index)) for t in texts])
        positives = groups[:, None] == groups[None, :]
        with _EvalMode(method):
            img = self.encode_images(method, pairs.load_image, n, self._ret_images)
            txt = self.encode_texts(method, pairs.texts[:n])
        out = image_text_retrieval(img, txt, rc.ks, positives=positives)
        out["num_pairs"] = float(n)
        return out

    def _val_setup(self) -> tuple:
        """Read the held-out pairs once: ``(pairs, spans)``; caches this rank's preprocessed images if small."""
        from medfoundry.data.pairs import build_pairs

        if self._val is None:
            vc = self.ec.val_loss
            pairs = build_pairs(vc.data)
            n = min(len(pairs), vc.max_pairs) if vc.max_pairs > 0 else len(pairs)
            rank, world = _rank_world()
            spans = val_loss_spans(n, vc.batch_size or self.ctx.batch_size, world)
            self._val = (pairs, spans)
            share = (spans[0][1] - spans[0][0]) // world
            s = self.ctx.preprocess.size
            if len(spans) * share * self.ctx.in_chans * s * s <= _MAX_CACHED_ELEMENTS:
                for start, _ in spans:
                    lo = start + rank * share
                    self._val_images[lo] = torch.stack([self.transform(pairs.load_image(i))
                                                        for i in range(lo, lo + share)])
            _say(f"validation loss: {len(spans)} batches of {spans[0][1] - spans[0][0]} held-out pairs "
                 f"({vc.data.kind})")
        return self._val

    def val_loss(self, method) -> dict[str, float]:
        """``contrastive_loss`` and ``num_pairs`` on ``clip.eval.val_loss`` (collective under DDP: all ranks call)."""
        pairs, spans = self._val_setup()
        device = method.logit_scale.device

        def encode(lo: int, hi: int) -> tuple[Tensor, Tensor]:
            img = self.encode_images(method, lambda i: pairs.load_image(lo + i), hi - lo, self._val_images.get(lo))
            return img.to(device), self.encode_texts(method, pairs.texts[lo:hi]).to(device)

        with _EvalMode(method):
            value = contrastive_val_loss(method.loss_fn, encode, spans, method.logit_scale.exp(), method.logit_bias)
        return {"contrastive_loss": value, "num_pairs": float(sum(b - a for a, b in spans))}

    def evaluate(self, method, tasks: tuple[str, ...] | None = None) -> dict[str, float]:
        """All configured tasks (or ``tasks``), keys prefixed ``zeroshot/`` and ``retrieval/``."""
        if tasks is None:
            tasks = tuple(t for t, on in (("zeroshot", self.ec.zeroshot.kind != "none"),
                                          ("retrieval", self.ec.retrieval.source != "none")) if on)
        out: dict[str, float] = {}
        if "zeroshot" in tasks:
            out.update({f"zeroshot/{k}": float(v) for k, v in self.zeroshot(method).items()})
        if "retrieval" in tasks:
            out.update({f"retrieval/{k}": float(v) for k, v in self.retrieval(method).items()})
        return out


class ClipEvalHook:
    """Zero-shot/retrieval and validation loss at their intervals (and at the last step); keep the best checkpoint."""

    def __init__(self, ctx: ClipEvalContext, steps: int, run_config: dict) -> None:
        """``steps``: the run's last step (always evaluated); ``run_config``: the resolved config as a dict,
        stored in ``best.pt`` so that it loads like any checkpoint."""
        ec = ctx.eval
        self.every = int(ec.every_steps)
        self.val_every = int(ec.val_loss.every_steps)
        self.last_step = int(steps)
        self.best_metric = ec.best_metric
        self.best = BestCheckpoint(self.best_metric, best_direction(ec), run_config, "clip.eval.best_metric", _say)
        self.evaluator = ClipEvaluator(ctx)

    def _at(self, every: int, step: int) -> bool:
        return every > 0 and (step % every == 0 or step == self.last_step)

    def main_due(self, step: int) -> bool:
        """Whether zero-shot / retrieval run after ``step`` (1-based, after the optimizer step)."""
        return self._at(self.every, step)

    def val_due(self, step: int) -> bool:
        """Whether the validation loss is computed after ``step``."""
        return self._at(self.val_every, step)

    def due(self, step: int) -> bool:
        """Whether ``step`` (1-based, after the optimizer step) is an evaluation step."""
        return self.main_due(step) or self.val_due(step)

    def wants_step(self, step: int, log_step: bool) -> bool:
        """Only evaluation steps (:class:`~medfoundry.eval.hooks.Hook`): other steps need no host read."""
        return self.due(step)

    def _evaluate(self, step: int, method: nn.Module) -> dict[str, float]:
        """The results due at ``step``, identical on every rank."""
        results: dict[str, float] = {}
        if self.val_due(step):  # every rank takes part (the loss module gathers across ranks)
            results.update({f"val/{k}": v for k, v in self.evaluator.val_loss(method).items()})
        if self.main_due(step):
            main: dict[str, float] | None = self.evaluator.evaluate(method) if _is_main() else None
            if torch.distributed.is_initialized():
                box = [main]
                torch.distributed.broadcast_object_list(box, src=0)
                main = box[0]
            assert main is not None
            results.update(main)
        return results

    def _all_ran(self, step: int) -> bool:
        """Whether every enabled evaluation ran at ``step`` (a best metric missing then is a misconfiguration)."""
        return (self.every <= 0 or self.main_due(step)) and (self.val_every <= 0 or self.val_due(step))

    def on_step_end(self, step: int, metrics: dict[str, float], method: nn.Module,
                    run_dir: Path) -> dict[str, float] | None:
        if not self.due(step):
            return None
        run_dir = Path(run_dir)
        t0 = time.perf_counter()
        results = self._evaluate(step, method)
        seconds = time.perf_counter() - t0
        if _is_main():
            path = run_dir / "eval" / "clip_history.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.write(json.dumps({"step": step, **results, "seconds": seconds}) + "\n")
        if self.best_metric in results or self._all_ran(step):
            self.best.update(step, results, method, run_dir)
        shown = {k: v for k, v in results.items() if "/auc_" not in k and "/n_pos" not in k and "_low" not in k
                 and "_high" not in k}
        _say(f"clip eval step {step} ({seconds:.1f}s): " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        if self.best.value is not None:
            results = {**results, f"best/{self.best_metric}": self.best.value}
        return results


# -- the registered tasks ``zeroshot`` and ``clip_retrieval`` (medfoundry.eval.registry) ---------------------------
def run_zeroshot_task(inputs: EvalInputs) -> dict[str, float]:
    """``zeroshot``: :meth:`ClipEvaluator.zeroshot` of the CLIP method on ``clip.eval.zeroshot`` (``zeroshot/...``)."""
    assert inputs.clip is not None
    return ClipEvaluator(inputs.clip).evaluate(inputs.clip_method, ("zeroshot",))


def run_retrieval_task(inputs: EvalInputs) -> dict[str, float]:
    """``clip_retrieval``: :meth:`ClipEvaluator.retrieval` on ``clip.eval.retrieval``'s pairs (``retrieval/...``)."""
    assert inputs.clip is not None
    return ClipEvaluator(inputs.clip).evaluate(inputs.clip_method, ("retrieval",))
