"""The end-to-end demo on real medical images that installable packages ship (``medfoundry demo``).

Data (fetched on first use through the package registries, cached under ``.cache/quality``, never
committed): sagittal 48 mm patches of the **MNI152 2009 T1 template** (nilearn wheel) labelled by the
lobe of the **Harvard-Oxford cortical atlas** (Debian ``mricron-data``), left hemisphere for training
and validation, right hemisphere for testing (:func:`medfoundry_cli.bench.quality_data.prepare_brain_patches`).

Steps of :func:`run_demo`: prepare the data; pretrain a tiny ViT with ``recipes/quality_brain_cpu.yaml`` on
the CPU on the training patches (labels unused; in-training kNN / health every 250 steps, head-collapse,
entropy-wall and feature-collapse monitors); evaluate the final teacher backbone, the same backbone at its
random initialisation and the raw pixels (kNN with bootstrap intervals, linear probe, view retrieval,
health) on the held-out hemisphere; render attention and PCA maps of test patches; write the HTML report.

The CT/MR slice preparation below (:func:`prepare_demo_data`, the pyradiomics test cases) was the first
demo's data; the quality benchmark's ``ct`` set (``recipes/quality_ct_cpu.yaml``) reads those cases.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfoundry_cli.bench.offline_data import (
    CASES,
    ensure_python_package,
    fetch_pyradiomics_data,
    scale_intensity,
    square_resize,
)

SLICE_SIZE = 128
SPLIT_FRACTIONS = (0.5, 0.2, 0.3)
DEMO_RECIPE = "quality_brain_cpu"
DEMO_LABEL = "lobe"
PATCH_SIZE = 48


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


# ----------------------------------------------------------------------------------------------- preparation
@dataclass
class DemoData:
    """Where the prepared demo data lie."""

    root: Path  # .cache/demo_ct
    images: Path  # pretraining image folder (labelled slices + pydicom-data frames)
    manifest: Path  # labelled slices: path, tumour, region, modality, series, patient, split, slice
    n_slices: int
    n_extra: int


def _slice_splits(n: int, positive: np.ndarray, seed: int) -> list[str]:
    """Label-stratified slice-level split of one volume (slices of a case appear in every split)."""
    rng = np.random.default_rng(seed)
    out = [""] * n
    for flag in (True, False):
        idx = np.flatnonzero(positive == flag)
        rng.shuffle(idx)
        k = idx.size
        n_test = max(1, round(SPLIT_FRACTIONS[2] * k)) if k >= 2 else 0
        n_val = max(1, round(SPLIT_FRACTIONS[1] * k)) if k >= 3 else 0
        for j, i in enumerate(idx):
            out[i] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    return out


def prepare_demo_data(cache: str | Path = ".cache/demo_ct", size: int = SLICE_SIZE, seed: int = 0) -> DemoData:
    """Fetch (once) and convert the demo data; returns where it is. Idempotent: existing files are kept (those
    written before 16-bit PNGs recorded their value mapping are rewritten with it)."""
    cache = Path(cache)
    images = cache / "images"
    manifest = cache / "manifest.csv"
    done_flag = cache / "prepared.json"
    if done_flag.is_file() and manifest.is_file():
        info = json.loads(done_flag.read_text())
        if info.get("size") == size and info.get("seed") == seed and info.get("mapped"):  # mapped: PNGs record it
            return DemoData(cache, images, manifest, info["n_slices"], info["n_extra"])
    ensure_python_package("nrrd", "pynrrd")
    data = fetch_pyradiomics_data(cache / "downloads")
    from medfoundry.data.readers import read_nrrd
    from medfoundry.data.readers.slices import FULL_RANGE_UINT16, read_mapping, write_stored

    slices_dir = images / "pyradiomics"
    slices_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case_index, (case, region, modality) in enumerate(CASES):
        vol = read_nrrd(data / f"{case}_image.nrrd")
        mask = read_nrrd(data / f"{case}_label.nrrd").array > 0
        scaled = scale_intensity(vol.array, modality)
        positive = mask.any(axis=(1, 2))
        splits = _slice_splits(vol.depth, positive, seed + case_index)
        for z in range(vol.depth):
            target = slices_dir / f"{case}_{z:03d}.png"
            if not target.is_file() or read_mapping(target) is None:  # (re)write files without a recorded mapping
                arr = (square_resize(scaled[z], size) * 65535).round().astype(np.uint16)
                tmp = target.with_suffix(".tmp.png")
                write_stored(tmp, arr, FULL_RANGE_UINT16)  # value = stored / 65535, recorded in the PNG
                tmp.replace(target)
            rows.append({
                "path": str(target.relative_to(cache)),
                "tumour": "tumour" if positive[z] else "no_tumour",
                "region": region,
                "modality": modality,
                "series": case,
                "patient": case,
                "split": splits[z],
                "slice": z,
            })
    extra = []
    try:
        from medfoundry.data.bundled import export_pydicom_samples

        extra = export_pydicom_samples(images / "pydicom_data", max_side=size)
    except (ImportError, FileNotFoundError) as err:
        _log(f"pydicom-data samples skipped ({err})")
    import pandas as pd

    from medfoundry.data.manifest import write_table

    write_table(pd.DataFrame(rows), manifest)
    done_flag.write_text(json.dumps({"size": size, "seed": seed, "n_slices": len(rows), "n_extra": len(extra),
                                     "mapped": True}))
    return DemoData(cache, images, manifest, len(rows), len(extra))


# ----------------------------------------------------------------------------------------------- the demo
def _pick_attention_images(manifest: Path, label: str = DEMO_LABEL, n: int = 6) -> list[Path]:
    """Test images for the attention pictures: the first test image of each class, then further ones."""
    with open(manifest) as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    chosen: list[dict] = []
    for r in rows:
        if r[label] not in {c[label] for c in chosen}:
            chosen.append(r)
    chosen += [r for r in rows[:: max(1, len(rows) // n)] if r not in chosen]
    return [manifest.parent / r["path"] for r in chosen[:n]]


def compare_backbones(
    run_dir: Path, manifest: Path, label_columns: tuple[str, ...] = (DEMO_LABEL,),
    tasks: tuple[str, ...] | None = None, which: str = "latest", raw_pixels: bool = True,
) -> dict:
    """Evaluate the run's backbone, its random initialisation and (``raw_pixels``) the pixels themselves
    on ``tasks`` (default: every registered task on the frozen backbone, :func:`~medfoundry.eval.registry.task_names`).

    Returns ``{"checkpoint", "step", "labels": {column: {"pretrained": metrics, "random_init": metrics,
    "raw_pixels": kNN metrics, "summary", "classes", "n", "data"} + the labelled set's context}}`` and writes it
    to ``RUN/eval/comparison.json`` (the report shows it). The context
    (:func:`medfoundry.eval.report_context.comparison_context`) holds the split sizes, the query split, the
    majority-class baseline under the metric names (``majority_class``) and the split warnings, which are also
    printed. kNN accuracies carry bootstrap intervals (``eval.n_bootstrap`` resamples of the test images).
    Label-free tasks (the view-retrieval ratio) are computed with the first column only.
    """
    from medfoundry.eval import registry
    from medfoundry.eval.eval_images import eval_transform_from_config
    from medfoundry.eval.report_context import comparison_context
    from medfoundry.eval.split_warnings import val_needs
    from medfoundry.eval.tasks import evaluate_backbone, evaluate_features
    from medfoundry.methods.checkpoint_backbone import load_backbone
    from medfoundry_cli.bench.quality import raw_pixel_features

    run_dir = Path(run_dir)
    loaded = {"pretrained": load_backbone(run_dir, which=which),
              "random_init": load_backbone(run_dir, random_init=True, which=which)}
    out: dict = {"checkpoint": str(loaded["pretrained"].checkpoint), "step": loaded["pretrained"].step,
                 "labels": {}}
    cfg = loaded["pretrained"].sections
    tasks = registry.task_names() if tasks is None else tasks
    labelled = tuple(t for t in tasks if registry.needs_of(t) != "views")
    for i, column in enumerate(label_columns):
        entry: dict = {}
        for name, lb in loaded.items():
            use = tasks if i == 0 else labelled
            res, lset, _ = evaluate_backbone(lb, use, data=str(manifest), label_column=column,
                                             cache_dir=run_dir / "eval" / "feature_cache")
            entry[name] = res
            entry.update(classes=lset.classes, summary=lset.summary(), n=len(lset))
        if raw_pixels:  # the labelled set the backbones were just evaluated on
            fs = raw_pixel_features(lset, eval_transform_from_config(cfg, 0))
            entry["raw_pixels"] = evaluate_features(fs, ("knn",), cfg.eval.knn_k, cfg.eval.knn_temperature,
                                                    seed=cfg.eval.split_seed, knn_bootstrap=cfg.eval.n_bootstrap)
        entry["data"] = str(manifest)
        entry.update(comparison_context(lset, entry["pretrained"], "test", val_needs(tasks)))
        for warning in entry["warnings"]:
            _log(f"warning (label '{column}'): {warning['message']}")
        out["labels"][column] = entry
    path = run_dir / "eval" / "comparison.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


def format_comparison(comparison: dict) -> str:
    """A side-by-side text table of pretrained vs random-init headline numbers (the registered tasks'
    headline metrics, :func:`medfoundry.eval.registry.headline_keys`), with the split each row is on, the raw
    pixels and the majority-class baseline of the same split; ``*`` marks the better of pretrained and random
    init where their 95% intervals do not overlap (nothing where they overlap), as the report highlights it."""
    from medfoundry.eval.metric_splits import metric_split
    from medfoundry.eval.registry import headline_keys, metric_direction
    from medfoundry.eval.report_format import interval_winner

    lines = []
    for column, entry in comparison["labels"].items():
        raw = entry.get("raw_pixels", {})
        majority = entry.get("majority_class", {})
        query = entry.get("query_split", "test")
        lines.append(f"label '{column}' ({entry['summary']})")
        if (entry.get("majority") or {}).get("class") is not None:
            lines.append(f"  majority class: always '{entry['majority']['class']}' (the training split's most "
                         "frequent class)")
        lines.append(f"  {'metric':<30}{'split':>8}{'pretrained':>24}{'random init':>24}{'raw pixels':>22}"
                     f"{'majority':>10}")
        for k in headline_keys(entry["pretrained"]):
            winner = interval_winner(entry["pretrained"], entry["random_init"], k, metric_direction(k) or "max")
            cells = [_with_interval(entry[name], k) + (" *" if winner == i + 1 else "  ")
                     for i, name in enumerate(("pretrained", "random_init"))]
            cells.append(_with_interval(raw, k) if k in raw else "")
            cells.append(f"{majority[k]:.4f}" if k in majority else "")
            widths = (24, 24, 22, 10)
            lines.append(f"  {k:<30}{metric_split(k, query):>8}"
                         + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
        lines.append("  * better, 95% intervals not overlapping (no mark: they overlap or there is no interval)")
        for warning in entry.get("warnings", []):
            lines.append(f"  WARNING: {warning['message']}")
    return "\n".join(lines)


def _with_interval(metrics: dict, key: str) -> str:
    low, high = metrics.get(key + "_ci_low"), metrics.get(key + "_ci_high")
    value = f"{metrics[key]:.4f}"
    if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
        value += f" [{low:.3f}, {high:.3f}]"
    return value


def headline(comparison: dict, key: str = "knn_top1_k20") -> str:
    """One sentence: the headline metric of the first label for pretrained vs random init, with intervals,
    and whether the intervals overlap."""
    column, entry = next(iter(comparison["labels"].items()))
    pre, rnd = entry["pretrained"], entry["random_init"]
    text = (f"headline ({key}, label '{column}', test split): pretrained {_with_interval(pre, key)} vs random init "
            f"{_with_interval(rnd, key)}")
    majority = entry.get("majority_class", {})
    if key in majority:
        text += f" (majority class {majority[key]:.4f})"
    if key + "_ci_low" in pre and key + "_ci_high" in rnd:
        if pre[key + "_ci_low"] > rnd[key + "_ci_high"]:
            text += ": pretrained ahead, intervals do not overlap"
        elif rnd[key + "_ci_low"] > pre[key + "_ci_high"]:
            text += ": RANDOM INIT ahead, intervals do not overlap"
        else:
            text += ": the intervals overlap"
    return text


def run_demo(
    output_dir: str | Path = "runs/demo_brain_cpu",
    cache: str | Path = ".cache/quality",
    overrides: list[str] | None = None,
    fresh: bool = True,
) -> Path:
    """Prepare data, pretrain, evaluate against random init and raw pixels, render attention maps, write the report.

    Returns the path of the HTML report. ``fresh`` removes an existing run folder first (the demo
    always shows one complete run); ``overrides`` are ``key.sub=value`` config overrides.
    """
    from medfoundry.config import load_config
    from medfoundry.eval.attention import save_attention_comparison
    from medfoundry.eval.report import write_report
    from medfoundry.methods.checkpoint_backbone import load_backbone
    from medfoundry.recipes import resolve_recipe
    from medfoundry.train.loop import train
    from medfoundry_cli.bench.quality_data import prepare_brain_patches

    t_start = time.perf_counter()
    output_dir = Path(output_dir)
    _log("preparing the real demo data (MNI152 template + Harvard-Oxford atlas, split by hemisphere) ...")
    data = prepare_brain_patches(cache)
    _log(f"brain patches {data.counts} under {data.root}")

    if fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    cfg = load_config(
        resolve_recipe(DEMO_RECIPE),
        [f"output_dir={output_dir}", f"data.root={data.images('train')}", f"eval.data={data.manifest}",
         *(overrides or [])],
    )
    _log(f"pretraining {cfg.model.name} for {cfg.train.steps} steps on the CPU (recipe {DEMO_RECIPE}) ...")
    t0 = time.perf_counter()
    run_dir = Path(train(cfg))
    train_seconds = time.perf_counter() - t0

    _log("evaluating the pretrained backbone against the same backbone at random initialisation and raw pixels ...")
    comparison = compare_backbones(run_dir, data.manifest)
    print(format_comparison(comparison), flush=True)
    _log(headline(comparison))

    _log("rendering attention and PCA maps ...")
    picks = _pick_attention_images(data.manifest)
    loaded = {name: load_backbone(run_dir, random_init=random_init)
              for name, random_init in (("pretrained", False), ("random_init", True))}
    # one colour scale per image for both backbones and all heads; the panels show the model's own [0, 1] input
    save_attention_comparison({name: (lb.backbone, lb.label) for name, lb in loaded.items()}, picks,
                              run_dir / "attention", loaded["pretrained"].sections, img_size=2 * PATCH_SIZE)

    timing = {"train_seconds": train_seconds, "total_seconds_before_report": time.perf_counter() - t_start,
              "cpu_count": os.cpu_count()}
    (run_dir / "eval" / "demo_timing.json").write_text(json.dumps(timing, indent=2))
    report = write_report(run_dir)
    _log(f"finished in {time.perf_counter() - t_start:.0f} s")
    return report
