"""The end-to-end demo on real medical images that installable packages ship (``medfoundry demo``).

Data (fetched through pip on first use, cached under ``.cache/demo_ct``, never committed):

* the five test cases inside the **pyradiomics 3.0.1 source archive** (PyPI sdist, BSD-3-Clause):
  two chest CT volumes (``lung1``, ``lung2``; HU), two brain MR volumes (``brain1``, ``brain2``) and
  one breast MR volume (``breast1``), each with a tumour segmentation mask. Every axial slice
  becomes one 128x128 16-bit PNG (CT in a lung window, L -400 / W 1500 HU; MR scaled between the
  volume's 0.5th and 99.5th percentiles) with two real labels: ``tumour`` (the slice intersects
  the tumour mask) and ``region`` (chest CT / brain MR / breast MR);
* the real DICOM samples of **pydicom-data** (MIT) listed in :mod:`medfoundry.data.bundled`
  (CT, MR, radiographs, ultrasound, nuclear medicine), added to the unlabelled pretraining images.

Steps of :func:`run_demo`: prepare the data; pretrain a tiny ViT with the DINO-X-style recipe
``recipes/demo_ct_cpu.yaml`` on the CPU (in-training kNN / linear probe / health every 250 steps,
entropy-wall and collapse monitors); evaluate the final teacher backbone and the same backbone at
its random initialisation (kNN, linear probe with bootstrap CIs, view retrieval, health) on both
labels; render attention and PCA maps of test slices; write the HTML report.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PYRADIOMICS_VERSION = "3.0.1"
#: (case, region label, modality) of the pyradiomics test cases used.
CASES = (
    ("lung1", "chest_ct", "CT"),
    ("lung2", "chest_ct", "CT"),
    ("brain1", "brain_mr", "MR"),
    ("brain2", "brain_mr", "MR"),
    ("breast1", "breast_mr", "MR"),
)
CT_WINDOW = (-1150.0, 350.0)  # lung window: level -400 HU, width 1500 HU
SLICE_SIZE = 128
SPLIT_FRACTIONS = (0.5, 0.2, 0.3)
DEMO_RECIPE = "demo_ct_cpu"


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


# ----------------------------------------------------------------------------------------------- fetching
def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def ensure_python_package(module: str, package: str) -> None:
    """Import ``module``, installing ``package`` through pip first if it is missing."""
    import importlib

    try:
        importlib.import_module(module)
        return
    except ImportError:
        pass
    _log(f"installing {package} (needed to read the demo data) ...")
    res = _pip("install", "--quiet", package)
    if res.returncode != 0:
        raise RuntimeError(f"`pip install {package}` failed:\n{res.stderr[-2000:]}")
    importlib.invalidate_caches()
    importlib.import_module(module)


def fetch_pyradiomics_data(cache: str | Path) -> Path:
    """The ``data`` folder of the pyradiomics 3.0.1 source archive (downloaded with pip once, then cached).

    Only ``data/*.nrrd``, ``data/README.md`` and the licence are extracted. Idempotent.
    """
    cache = Path(cache)
    root = cache / f"pyradiomics-{PYRADIOMICS_VERSION}"
    data = root / "data"
    needed = [data / f"{case}_{kind}.nrrd" for case, _, _ in CASES for kind in ("image", "label")]
    if all(p.is_file() for p in needed):
        return data
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz"
    if not archive.is_file():
        _log(f"downloading the pyradiomics {PYRADIOMICS_VERSION} source archive from PyPI (34 MB) ...")
        args = ("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "--quiet",
                f"pyradiomics=={PYRADIOMICS_VERSION}", "-d", str(cache))
        res = _pip(*args)
        if res.returncode != 0:  # preparing the sdist's metadata may need these build helpers
            _pip("install", "--quiet", "versioneer", "setuptools", "wheel", "numpy")
            res = _pip(*args)
        if res.returncode != 0 or not archive.is_file():
            raise RuntimeError(
                "could not download the pyradiomics source archive with pip:\n"
                f"{res.stderr[-2000:]}\nRun by hand: pip download --no-deps --no-binary :all: "
                f"--no-build-isolation pyradiomics=={PYRADIOMICS_VERSION} -d {cache}"
            )
    prefix = f"pyradiomics-{PYRADIOMICS_VERSION}/"
    wanted = {prefix + "LICENSE.txt", prefix + "data/README.md"} | {str(p.relative_to(cache)) for p in needed}
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name in wanted and m.isfile()]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(cache, members=members, filter="data")
        else:  # pragma: no cover - Python without extraction filters; members are plain files by name
            tar.extractall(cache, members=members)
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise RuntimeError(f"{archive} lacks {missing}")
    return data


# ----------------------------------------------------------------------------------------------- preparation
@dataclass
class DemoData:
    """Where the prepared demo data lie."""

    root: Path  # .cache/demo_ct
    images: Path  # pretraining image folder (labelled slices + pydicom-data frames)
    manifest: Path  # labelled slices: path, tumour, region, modality, series, patient, split, slice
    n_slices: int
    n_extra: int


def _scale(arr: np.ndarray, modality: str) -> np.ndarray:
    if modality == "CT":
        lo, hi = CT_WINDOW
    else:
        lo, hi = np.percentile(arr, [0.5, 99.5])
    return np.clip((arr - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)


def _square_resize(img: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    h, w = img.shape
    side = max(h, w)
    canvas = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = img
    t = torch.from_numpy(canvas)[None, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    return out.clamp(0, 1).numpy()


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
    """Fetch (once) and convert the demo data; returns where it is. Idempotent: existing files are kept."""
    from PIL import Image

    cache = Path(cache)
    images = cache / "images"
    manifest = cache / "manifest.csv"
    done_flag = cache / "prepared.json"
    if done_flag.is_file() and manifest.is_file():
        info = json.loads(done_flag.read_text())
        if info.get("size") == size and info.get("seed") == seed:
            return DemoData(cache, images, manifest, info["n_slices"], info["n_extra"])
    ensure_python_package("nrrd", "pynrrd")
    data = fetch_pyradiomics_data(cache / "downloads")
    from medfoundry.data.readers import read_nrrd

    slices_dir = images / "pyradiomics"
    slices_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case_index, (case, region, modality) in enumerate(CASES):
        vol = read_nrrd(data / f"{case}_image.nrrd")
        mask = read_nrrd(data / f"{case}_label.nrrd").array > 0
        scaled = _scale(vol.array, modality)
        positive = mask.any(axis=(1, 2))
        splits = _slice_splits(vol.depth, positive, seed + case_index)
        for z in range(vol.depth):
            target = slices_dir / f"{case}_{z:03d}.png"
            if not target.is_file():
                arr = (_square_resize(scaled[z], size) * 65535).round().astype(np.uint16)
                tmp = target.with_suffix(".tmp.png")
                Image.fromarray(arr).save(tmp)
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
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(manifest)
    done_flag.write_text(json.dumps({"size": size, "seed": seed, "n_slices": len(rows), "n_extra": len(extra)}))
    return DemoData(cache, images, manifest, len(rows), len(extra))


# ----------------------------------------------------------------------------------------------- the demo
def _pick_attention_images(manifest: Path, n: int = 6) -> list[Path]:
    """Test slices for the attention pictures: tumour slices of each case first, then others."""
    with open(manifest) as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    chosen: list[dict] = []
    for want_tumour in (True, False):
        for case, _, _ in CASES:
            for r in rows:
                if r["series"] == case and (r["tumour"] == "tumour") == want_tumour and r not in chosen:
                    chosen.append(r)
                    break
    return [manifest.parent / r["path"] for r in chosen[:n]]


def compare_backbones(
    run_dir: Path, manifest: Path, label_columns: tuple[str, ...] = ("tumour", "region"),
    tasks: tuple[str, ...] = ("knn", "linear", "health", "retrieval"), which: str = "latest",
) -> dict:
    """Evaluate the run's backbone and its random initialisation on each label column of ``manifest``.

    Returns ``{"checkpoint", "step", "labels": {column: {"pretrained": metrics, "random_init": metrics,
    "summary", "classes", "n"}}}`` and writes it to ``RUN/eval/comparison.json`` (the report shows it).
    The view-retrieval ratio needs no labels and is computed with the first column only.
    """
    from medfoundry.eval.load import load_backbone
    from medfoundry.eval.tasks import evaluate_backbone

    run_dir = Path(run_dir)
    loaded = {"pretrained": load_backbone(run_dir, which=which),
              "random_init": load_backbone(run_dir, random_init=True, which=which)}
    out: dict = {"checkpoint": str(loaded["pretrained"].checkpoint), "step": loaded["pretrained"].step,
                 "labels": {}}
    for i, column in enumerate(label_columns):
        entry: dict = {}
        for name, lb in loaded.items():
            use = tasks if i == 0 else tuple(t for t in tasks if t != "retrieval")
            res, lset, _ = evaluate_backbone(lb, use, data=str(manifest), label_column=column,
                                             cache_dir=run_dir / "eval" / "feature_cache")
            entry[name] = res
            entry.update(classes=lset.classes, summary=lset.summary(), n=len(lset))
        out["labels"][column] = entry
    path = run_dir / "eval" / "comparison.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


def format_comparison(comparison: dict) -> str:
    """A side-by-side text table of pretrained vs random-init headline numbers."""
    keys = ("knn_top1_k10", "knn_balanced_acc_k10", "knn_auc_k10", "knn_top1_k20", "knn_balanced_acc_k20",
            "knn_auc_k20", "linear_accuracy", "linear_balanced_accuracy",
            "linear_auc", "view_retrieval_ratio", "health_effective_rank", "health_active_dims_frac",
            "health_mean_pairwise_cosine", "health_class_separation")
    lines = []
    for column, entry in comparison["labels"].items():
        lines.append(f"label '{column}' ({entry['summary']})")
        lines.append(f"  {'metric':<30}{'pretrained':>12}{'random init':>14}")
        for k in keys:
            if k in entry["pretrained"]:
                a, b = entry["pretrained"][k], entry["random_init"][k]
                lines.append(f"  {k:<30}{a:>12.4f}{b:>14.4f}")
    return "\n".join(lines)


def run_demo(
    output_dir: str | Path = "runs/demo_ct_cpu",
    cache: str | Path = ".cache/demo_ct",
    overrides: list[str] | None = None,
    fresh: bool = True,
) -> Path:
    """Prepare data, pretrain, evaluate against random init, render attention maps, write the report.

    Returns the path of the HTML report. ``fresh`` removes an existing run folder first (the demo
    always shows one complete run); ``overrides`` are ``key.sub=value`` config overrides.
    """
    from medfoundry.config import load_config
    from medfoundry.eval.attention import save_attention_maps
    from medfoundry.eval.load import load_backbone
    from medfoundry.eval.report import write_report
    from medfoundry.recipes import resolve_recipe
    from medfoundry.train.loop import train

    t_start = time.perf_counter()
    output_dir = Path(output_dir)
    _log("preparing the real demo data (pyradiomics test cases + pydicom-data samples) ...")
    data = prepare_demo_data(cache)
    _log(f"{data.n_slices} labelled slices + {data.n_extra} pydicom-data frames under {data.images}")

    if fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    cfg = load_config(
        resolve_recipe(DEMO_RECIPE),
        [f"output_dir={output_dir}", f"data.root={data.images}", f"eval.data={data.manifest}", *(overrides or [])],
    )
    _log(f"pretraining {cfg.model.name} for {cfg.train.steps} steps on the CPU (recipe {DEMO_RECIPE}) ...")
    t0 = time.perf_counter()
    run_dir = Path(train(cfg))
    train_seconds = time.perf_counter() - t0

    _log("evaluating the pretrained backbone against the same backbone at random initialisation ...")
    comparison = compare_backbones(run_dir, data.manifest)
    print(format_comparison(comparison), flush=True)

    _log("rendering attention and PCA maps ...")
    picks = _pick_attention_images(data.manifest)
    for name, random_init in (("pretrained", False), ("random_init", True)):
        lb = load_backbone(run_dir, random_init=random_init)
        save_attention_maps(lb.backbone, picks, run_dir / "attention" / name, lb.cfg, img_size=SLICE_SIZE,
                            title=lb.label)

    timing = {"train_seconds": train_seconds, "total_seconds_before_report": time.perf_counter() - t_start,
              "cpu_count": os.cpu_count()}
    (run_dir / "eval" / "demo_timing.json").write_text(json.dumps(timing, indent=2))
    report = write_report(run_dir)
    _log(f"finished in {time.perf_counter() - t_start:.0f} s")
    return report
