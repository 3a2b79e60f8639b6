"""Zero-shot and retrieval evaluation of a CLIP-style method, in training (a hook) and from checkpoints.

:class:`ClipEvaluator` embeds the external labelled set of ``clip.eval.zeroshot`` and the image-report
pairs of ``clip.eval.retrieval`` with the method's two towers (evaluation preprocessing: resize and
centre crop, no augmentation) and runs :mod:`medfoundry.eval.zero_shot`:

* ``zeroshot/auc/<finding>`` (+ ``auc_low``/``auc_high`` bootstrap CI) and ``zeroshot/mean_auc`` from
  CheXzero's positive/negative prompt pairs (Tiu et al. 2022);
* ``zeroshot/accuracy``, ``zeroshot/balanced_accuracy``, ``zeroshot/macro_auc`` from class-name x
  template prompt ensembles (Radford et al. 2021);
* ``retrieval/i2t_recall_at_{k}``, ``retrieval/t2i_recall_at_{k}`` and ``retrieval/chance_at_{k}``.

:class:`ClipEvalHook` runs it every ``clip.eval.every_steps`` steps and at the last step (rank 0
computes, the result is broadcast so every rank returns the same keys), appends
``RUN/eval/clip_history.jsonl`` and keeps ``RUN/best.pt`` + ``RUN/best.json`` for the best value of
``clip.eval.best_metric`` (same record layout as the frozen-feature evaluation hook).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from medfoundry.config.loader import to_dict
from medfoundry.config.schema import RunConfig
from medfoundry.distributed.setup import is_main_process as _is_main
from medfoundry.distributed.setup import say as _say
from medfoundry.train.best import BestCheckpoint
from medfoundry.train.hooks import Hook, register_hook_builder

_MAX_CACHED_ELEMENTS = 1 << 27  # preprocessed evaluation images kept in memory up to ~512 MiB




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


class ClipEvaluator:
    """Embeds and scores the configured evaluation sets with a :class:`~medfoundry.methods.clip.ClipMethod`.

    Sets are read and preprocessed once and kept in memory when small enough.
    """

    def __init__(self, cfg: RunConfig) -> None:
        from medfoundry.data.pair_loader import PairImageTransform

        self.cfg = cfg
        self.ec = cfg.clip.eval
        self.transform = PairImageTransform(cfg.clip.preprocess, cfg.model.in_chans, train=False)
        self._zs = None
        self._zs_images: Tensor | None = None
        self._ret = None
        self._ret_images: Tensor | None = None

    # -- images ------------------------------------------------------------------------------------------------
    def _preprocess_all(self, load: Callable[[int], Tensor], n: int) -> Tensor | None:
        s = self.cfg.clip.preprocess.size
        if n * self.cfg.model.in_chans * s * s > _MAX_CACHED_ELEMENTS:
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
        from medfoundry.train.precision import autocast, resolve_precision

        return autocast(resolve_precision(self.cfg.train.precision, device), device)

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
            self._zs = build_labelled_images(zc, self.cfg.clip.data.demo_dir)
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
            pairs = build_pairs(self.cfg.clip.data if rc.source == "train" else rc.data)
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
    """Evaluate every ``clip.eval.every_steps`` steps (and at the last step); keep the best checkpoint."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.every = int(cfg.clip.eval.every_steps)
        self.last_step = int(cfg.train.steps)
        self.best_metric = cfg.clip.eval.best_metric
        self.best = BestCheckpoint(self.best_metric, cfg.clip.eval.best_mode, to_dict(cfg), "clip.eval.best_metric",
                                   _say)
        self.evaluator = ClipEvaluator(cfg)

    def due(self, step: int) -> bool:
        """Whether ``step`` (1-based, after the optimizer step) is an evaluation step."""
        return self.every > 0 and (step % self.every == 0 or step == self.last_step)

    def on_step_end(self, step: int, metrics: dict[str, float], method: nn.Module,
                    run_dir: Path) -> dict[str, float] | None:
        if not self.due(step):
            return None
        run_dir = Path(run_dir)
        t0 = time.perf_counter()
        results: dict[str, float] | None = self.evaluator.evaluate(method) if _is_main() else None
        if torch.distributed.is_initialized():
            box = [results]
            torch.distributed.broadcast_object_list(box, src=0)
            results = box[0]
        assert results is not None
        seconds = time.perf_counter() - t0
        if _is_main():
            path = run_dir / "eval" / "clip_history.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.write(json.dumps({"step": step, **results, "seconds": seconds}) + "\n")
        self.best.update(step, results, method, run_dir)
        shown = {k: v for k, v in results.items() if "/auc_" not in k and "/n_pos" not in k and "_low" not in k
                 and "_high" not in k}
        _say(f"clip eval step {step} ({seconds:.1f}s): " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        if self.best.value is not None:
            results = {**results, f"best/{self.best_metric}": self.best.value}
        return results

@register_hook_builder
def build(cfg: RunConfig) -> list[Hook]:
    """A :class:`ClipEvalHook` for ``method: clip`` runs with ``clip.eval.every_steps > 0``."""
    if cfg.method != "clip" or cfg.clip.eval.every_steps <= 0:
        return []
    return [ClipEvalHook(cfg)]
