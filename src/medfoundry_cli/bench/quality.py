"""The quality benchmark: does pretraining beat random init and raw pixels on a held-out real split?

For each seed, :func:`run_quality` pretrains the recipe for a fixed number of steps on the ``train``
images of a :mod:`~medfoundry_cli.bench.quality_data` set (labels unused), then embeds the labelled set with

* the final teacher backbone (``pretrained``),
* the same backbone at its random initialisation under the same seed (``random_init``),
* the images themselves, flattened after the same evaluation transform (``raw_pixels``),

and runs DINO's weighted kNN (k = 20, bank = train, queries = val and test) and the logistic-regression
probe (C chosen on val, reported on test). The majority class of the training split is the floor. It
also reads the run's logged head statistics (teacher effective prototypes, DINO loss / ln K) so a
collapsed head shows next to the numbers. :func:`format_quality` prints mean ± std over the seeds.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medfoundry_cli.bench.quality_data import PREPARERS, QualitySet

#: Recipe used for each benchmark set unless one is given.
DEFAULT_RECIPES = {"brain": "quality_brain_cpu", "fashion": "quality_fashion_cpu", "ct": "quality_ct_cpu"}
#: Per-backbone metrics reported (``val_`` = the validation split, the rest on test).
HEADLINE = ("knn_top1_k20", "knn_balanced_acc_k20", "val_knn_top1_k20", "linear_accuracy", "linear_balanced_accuracy",
            "linear_auc")


@dataclass
class QualitySpec:
    """One benchmark run: which set, which recipe and overrides, how many seeds, where to write."""

    dataset: str = "brain"
    recipe: str = ""  # "" = DEFAULT_RECIPES[dataset]
    overrides: list[str] = field(default_factory=list)
    seeds: Sequence[int] = (0, 1, 2)
    steps: int = 0  # 0 = the recipe's train.steps
    cache: str = ".cache/quality"
    output_dir: str = "runs/quality"
    n_bootstrap: int = 0  # linear-probe bootstrap resamples (0 = no CIs; the seed spread is reported instead)
    tasks: Sequence[str] = ("knn", "linear")  # "knn" alone for a quick screen
    resume: bool = False  # keep existing run folders and resume them (default: start each seed afresh)


def raw_pixel_features(lset, transform, batch_size: int = 256, pca_dims: int = 0):
    """A :class:`~medfoundry.eval.features.FeatureSet` whose features are the evaluation-transformed pixels.

    With ``pca_dims`` the pixels are projected on the leading principal components of the *training* split
    (fitted there only), which keeps the logistic-regression probe on raw pixels affordable on a CPU.
    """
    import torch

    from medfoundry.eval.eval_images import EvalImages
    from medfoundry.eval.features import FeatureSet

    loader = torch.utils.data.DataLoader(EvalImages(lset.items, transform), batch_size=batch_size, num_workers=0)
    feats = np.concatenate([b.flatten(1).float().numpy() for b in loader]).astype(np.float32)
    fs = FeatureSet(feats, lset.labels, lset.splits, lset.classes, [it.path for it in lset.items],
                    [it.series for it in lset.items], {"feature": "raw_pixels", **transform.settings()})
    return train_pca(fs, pca_dims) if pca_dims else fs


def train_pca(fs, dims: int):
    """``fs`` with its features projected on their ``dims`` leading principal components, fitted on the
    *training* split only (the other splits are projected, never fitted); unchanged if ``dims`` >= the width."""
    import dataclasses

    if dims >= fs.feats.shape[1]:
        return fs
    train = fs.feats[fs.splits == "train"]
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    return dataclasses.replace(fs, feats=((fs.feats - mean) @ vt[:dims].T).astype(np.float32),
                               meta={**fs.meta, "pca_dims": dims})


#: The benchmark's table columns that have a majority-class value.
MAJORITY_KEYS = ("knn_top1_k20", "val_knn_top1_k20", "knn_balanced_acc_k20", "linear_accuracy",
                 "linear_balanced_accuracy", "linear_auc")


def majority_metrics(lset) -> dict[str, float]:
    """The table's accuracy / balanced accuracy / AUC columns for always answering the training split's most
    common class, each on its own split (the library's rule, :mod:`medfoundry.eval.majority`)."""
    from medfoundry.eval.majority import labelled_set_baseline
    from medfoundry.eval.majority import majority_metrics as under_names

    return under_names(labelled_set_baseline(lset), MAJORITY_KEYS)


def head_statistics(run_dir: Path) -> dict[str, float]:
    """Head health over the run from ``metrics.jsonl``: minimum and final teacher effective-prototype
    fraction, final DINO loss / ln K and the last logged teacher per-sample entropy fraction."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]
    out: dict[str, float] = {}
    for key in ("teacher_effective_prototypes_frac", "teacher_effective_prototypes", "dino_loss_frac",
                "teacher_entropy_frac", "teacher_distinct_prototypes"):
        vals = [float(r[key]) for r in recs if key in r and math.isfinite(float(r[key]))]
        if vals:
            out[f"{key}_final"] = vals[-1]
            out[f"{key}_min"] = min(vals)
    return out


def _evaluate(fs, n_bootstrap: int, seed: int, tasks: Sequence[str] = ("knn", "linear")) -> dict[str, float]:
    from medfoundry.eval.tasks import evaluate_features

    res = evaluate_features(fs, tuple(tasks), (20,), 0.07, n_bootstrap, seed=seed, val_knn=True)
    return {k: float(v) for k, v in res.items()}


def run_quality(spec: QualitySpec, log=print) -> dict:
    """Prepare the set, then pretrain and evaluate each seed; returns (and writes) the results."""
    from medfoundry.config import load_config
    from medfoundry.eval.eval_images import eval_transform_from_config
    from medfoundry.eval.features import compute_feature_set
    from medfoundry.eval.labelled_set import load_labelled_set
    from medfoundry.methods.checkpoint_backbone import load_backbone
    from medfoundry.recipes import resolve_recipe
    from medfoundry.train.loop import train

    if spec.dataset not in PREPARERS:
        raise ValueError(f"unknown quality dataset '{spec.dataset}'; choose one of {sorted(PREPARERS)}")
    qset: QualitySet = PREPARERS[spec.dataset](spec.cache)
    log(f"[quality] {spec.dataset}: {qset.counts} images under {qset.root}")
    recipe = spec.recipe or DEFAULT_RECIPES[spec.dataset]
    out_root = Path(spec.output_dir) / spec.dataset
    lset = load_labelled_set(str(qset.manifest), qset.label_column)
    per_seed: list[dict] = []
    raw: dict[str, float] | None = None
    for seed in spec.seeds:
        run_dir = out_root / f"seed{seed}"
        overrides = [f"output_dir={run_dir}", f"data.root={qset.images('train')}", f"train.seed={seed}",
                     f"eval.data={qset.manifest}", f"eval.label_column={qset.label_column}", *spec.overrides]
        if spec.steps:
            overrides.append(f"train.steps={spec.steps}")
        cfg = load_config(resolve_recipe(recipe), overrides)
        if run_dir.exists() and not spec.resume:  # a finished run of other settings would be evaluated again
            shutil.rmtree(run_dir)
        log(f"[quality] seed {seed}: pretraining {cfg.model.name} for {cfg.train.steps} steps (recipe {recipe}) ...")
        t0 = time.perf_counter()
        train(cfg)
        train_s = time.perf_counter() - t0
        entry: dict = {"seed": seed, "train_seconds": train_s, "steps": cfg.train.steps}
        for name, random_init in (("pretrained", False), ("random_init", True)):
            lb = load_backbone(run_dir, random_init=random_init)
            transform = eval_transform_from_config(lb.sections, 0)
            ec = lb.sections.eval
            fs = compute_feature_set(lb.backbone, lset, transform, ec.feature, ec.batch_size)
            entry[name] = _evaluate(fs, spec.n_bootstrap, seed, spec.tasks)
            if raw is None:  # kNN on the pixels themselves, the linear probe on their 256 leading components
                pixels = raw_pixel_features(lset, transform)  # read once; the probe gets the PCA of it
                raw = _evaluate(pixels, spec.n_bootstrap, seed, ("knn",))
                if "linear" in spec.tasks:
                    raw |= _evaluate(train_pca(pixels, 256), spec.n_bootstrap, seed, ("linear",))
        entry["head"] = head_statistics(run_dir)
        per_seed.append(entry)
        log(f"[quality] seed {seed}: {train_s:.0f} s; kNN top-1 test pretrained "
            f"{entry['pretrained']['knn_top1_k20']:.3f} vs random init {entry['random_init']['knn_top1_k20']:.3f}")
    result = {"spec": asdict(spec) | {"seeds": list(spec.seeds)}, "recipe": recipe, "dataset": spec.dataset,
              "counts": qset.counts, "classes": lset.classes, "label_column": qset.label_column,
              "seeds": per_seed, "raw_pixels": raw, "majority": majority_metrics(lset)}
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "quality.json").write_text(json.dumps(result, indent=2))
    return result


def _mean_std(values: list[float]) -> str:
    arr = np.asarray(values, dtype=float)
    if arr.size == 1:
        return f"{arr[0]:.3f}"
    return f"{arr.mean():.3f} ± {arr.std(ddof=1):.3f}"


def format_quality(result: dict) -> str:
    """Markdown table: pretrained / random init (mean ± std over seeds), raw pixels and majority class."""
    seeds = result["seeds"]
    lines = [f"quality benchmark '{result['dataset']}' (recipe {result['recipe']}, {len(seeds)} seed(s), "
             f"{seeds[0]['steps']} steps, {np.mean([s['train_seconds'] for s in seeds]):.0f} s pretraining per seed; "
             f"splits {result['counts']})", "",
             "| metric | pretrained | random init | raw pixels | majority class |", "|---|---|---|---|---|"]
    for key in HEADLINE:
        if key not in seeds[0]["pretrained"]:
            continue
        raw = result.get("raw_pixels") or {}
        row = [key, _mean_std([s["pretrained"][key] for s in seeds]), _mean_std([s["random_init"][key] for s in seeds]),
               f"{raw[key]:.3f}" if key in raw else "",
               f"{result['majority'][key]:.3f}" if key in result["majority"] else ""]
        lines.append("| " + " | ".join(row) + " |")
    head = [s.get("head", {}) for s in seeds]
    if head and "teacher_effective_prototypes_frac_min" in head[0]:
        lines.append("")
        lowest = _mean_std([h["teacher_effective_prototypes_frac_min"] for h in head])
        final = _mean_std([h["teacher_effective_prototypes_frac_final"] for h in head])
        loss = _mean_std([h.get("dino_loss_frac_final", float("nan")) for h in head])
        lines.append(f"head: teacher effective prototypes / attainable, minimum over the run {lowest}, final {final}; "
                     f"final DINO loss / ln K {loss}")
    gap = [s["pretrained"]["knn_top1_k20"] - s["random_init"]["knn_top1_k20"] for s in seeds]
    lines.append(f"kNN top-1 (test) pretrained minus random init: {_mean_std(gap)} (per seed: "
                 + ", ".join(f"{g:+.3f}" for g in gap) + ")")
    return "\n".join(lines)


def report_quality(spec: QualitySpec, json_path: str | None = None) -> dict:
    """:func:`run_quality`, then print :func:`format_quality` and (``json_path``) write the results as JSON;
    what ``medfoundry bench --mode quality`` and ``benchmarks/bench_quality.py`` run."""
    result = run_quality(spec)
    print(format_quality(result), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
