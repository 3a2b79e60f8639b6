"""Localisation benchmark on real CT tumour masks: does pretraining make the attention point at the tumour?

Data: the two CT cases of the pyradiomics 3.0.1 test data (``lung1``, ``lung2``: NRRD HU volumes with a tumour
mask each, fetched by :func:`medfoundry_cli.bench.offline_data.fetch_pyradiomics_data` into the quality cache).
Axial slices are prepared as the CT quality set prepares them (:mod:`medfoundry_cli.bench.quality_data`: the lung
window :data:`~medfoundry_cli.bench.offline_data.CT_WINDOW` to [0, 1], padded to a square and resized to the
model's input size); each mask goes through the same pad and resize (area-weighted, then >= 0.5).

There are two CT patients only, so the split is by patient and one way: the backbone is pretrained (a short
``medfoundry`` DINO + iBOT run of ``recipes/quality_ct_cpu.yaml`` at the benchmark's input size) on every slice of
the ``pretrain`` cases and scored on the tumour slices (mask area at the input size >= ``min_area_px``) of the
``score`` cases, which it never saw. Scored: the last-block class-token attention averaged over heads of

* the pretrained backbone (the final teacher),
* the same backbone at its random initialisation (the run's step-0 weights, ``load_backbone(random_init=True)``),
* two reference maps: a centred Gaussian prior and a uniform map (:mod:`medfoundry.eval.localisation`),

with the pointing game, IoU (top area, threshold 0.5), pixel AUC, bootstrap 95 % intervals over slices, and the
paired per-slice difference pretrained - random init. Slices of one patient are not independent: the intervals
describe these slices, not patients.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

RECIPE = "quality_ct_cpu"


@dataclass
class LocalisationSpec:
    """What the localisation benchmark runs."""

    cache: str = ".cache/quality"  # where the pyradiomics data are (downloads/) and the slices are written
    output_dir: str = "runs/localisation"
    size: int = 96  # model input side (pixels); vit_tiny_patch8 gives a (size/8)^2 patch grid
    pretrain: tuple[str, ...] = ("lung1",)  # cases whose slices pretrain the backbone
    score: tuple[str, ...] = ("lung2",)  # cases whose tumour slices are scored (never seen in pretraining)
    min_area_px: int = 20  # a scored slice's tumour area at the input size, pixels
    steps: int = 300  # pretraining steps
    seed: int = 0
    batch_size: int = 32
    n_bootstrap: int = 2000
    overrides: list[str] = field(default_factory=list)  # more KEY=VALUE for the pretraining run
    resume: bool = False  # keep an existing run folder (resume it) instead of replacing it


def _write_image(path: Path, arr01: np.ndarray) -> None:
    from medfoundry.data.readers.slices import FULL_RANGE_UINT16, write_stored

    path.parent.mkdir(parents=True, exist_ok=True)
    write_stored(path, (np.clip(arr01, 0.0, 1.0) * 65535).round().astype(np.uint16), FULL_RANGE_UINT16)


def _write_mask(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def prepare_localisation_slices(cache: str | Path = ".cache/quality", size: int = 96,
                                pretrain: tuple[str, ...] = ("lung1",), score: tuple[str, ...] = ("lung2",),
                                min_area_px: int = 20) -> dict:
    """Write the pretraining slices (``ROOT/pretrain/*.png``) and the scored tumour slices with their masks
    (``ROOT/score/images``, ``ROOT/score/masks``, ``ROOT/score/manifest.csv``: ``path``, ``mask``, ``patient``,
    ``z``, ``mask_px``), ROOT = ``cache/localisation``; cached by the arguments. Returns the set's description."""
    import pandas as pd

    from medfoundry_cli.bench.offline_data import (
        CASES,
        ensure_python_package,
        fetch_pyradiomics_data,
        scale_intensity,
        square_resize,
    )

    overlap = set(pretrain) & set(score)
    if overlap:
        raise ValueError(f"cases {sorted(overlap)} are both pretrained on and scored; give disjoint patients")
    modality = {case: mod for case, _, mod in CASES}
    unknown = [c for c in (*pretrain, *score) if c not in modality]
    if unknown:
        raise ValueError(f"unknown pyradiomics case(s) {unknown}; known: {sorted(modality)}")
    root = Path(cache) / "localisation"
    info = {"size": size, "pretrain": list(pretrain), "score": list(score), "min_area_px": min_area_px, "version": 1}
    flag = root / "prepared.json"
    if flag.is_file() and {k: v for k, v in json.loads(flag.read_text()).items() if k in info} == info:
        return json.loads(flag.read_text()) | {"root": str(root)}
    ensure_python_package("nrrd", "pynrrd")
    from medfoundry.data.readers import read_nrrd

    data = fetch_pyradiomics_data(Path(cache) / "downloads")
    shutil.rmtree(root, ignore_errors=True)
    n_pretrain, rows, too_small = 0, [], 0
    for case in (*pretrain, *score):
        vol = read_nrrd(data / f"{case}_image.nrrd")
        scaled = scale_intensity(vol.array, modality[case])
        if case in pretrain:
            for z in range(vol.depth):
                _write_image(root / "pretrain" / f"{case}_{z:03d}.png", square_resize(scaled[z], size))
                n_pretrain += 1
            continue
        label = read_nrrd(data / f"{case}_label.nrrd").array > 0
        for z in range(vol.depth):
            if not label[z].any():
                continue
            mask = square_resize(label[z].astype(np.float32), size) >= 0.5
            if int(mask.sum()) < min_area_px:
                too_small += 1
                continue
            name = f"{case}_{z:03d}.png"
            _write_image(root / "score" / "images" / name, square_resize(scaled[z], size))
            _write_mask(root / "score" / "masks" / name, mask)
            rows.append({"path": f"images/{name}", "mask": f"masks/{name}", "patient": case, "z": z,
                         "mask_px": int(mask.sum())})
    pd.DataFrame(rows).to_csv(root / "score" / "manifest.csv", index=False)
    record = {**info, "n_pretrain_slices": n_pretrain, "n_scored_slices": len(rows),
              "n_tumour_slices_below_min_area": too_small,
              "mask_px": [r["mask_px"] for r in rows]}
    flag.write_text(json.dumps(record, indent=2))
    return record | {"root": str(root)}


def run_localisation(spec: LocalisationSpec, log=print) -> dict:
    """Prepare the slices, pretrain, score pretrained / random init / reference maps; returns and writes
    ``OUTPUT_DIR/localisation.json``."""
    from medfoundry.config import load_config
    from medfoundry.eval.attention import load_inputs, maps_of, save_attention_comparison
    from medfoundry.eval.localisation import (
        centre_prior,
        paired_difference,
        read_mask_manifest,
        score_maps,
        uniform_map,
    )
    from medfoundry.methods.checkpoint_backbone import load_backbone
    from medfoundry.recipes import resolve_recipe
    from medfoundry.train.loop import train

    data = prepare_localisation_slices(spec.cache, spec.size, spec.pretrain, spec.score, spec.min_area_px)
    root = Path(data["root"])
    log(f"[localisation] {data['n_pretrain_slices']} pretraining slices ({', '.join(spec.pretrain)}), "
        f"{data['n_scored_slices']} scored tumour slices ({', '.join(spec.score)}; "
        f"{data['n_tumour_slices_below_min_area']} below {spec.min_area_px} px left out)")
    run_dir = Path(spec.output_dir) / "run"
    overrides = [f"output_dir={run_dir}", f"data.root={root / 'pretrain'}", f"model.img_size={spec.size}",
                 f"crops.global_size={spec.size}", f"crops.local_size={spec.size // 2}", f"eval.img_size={spec.size}",
                 f"train.steps={spec.steps}", f"train.seed={spec.seed}", f"train.batch_size={spec.batch_size}",
                 f"train.checkpoint_every={spec.steps}", "train.tensorboard=false", *spec.overrides]
    cfg = load_config(resolve_recipe(RECIPE), overrides)
    if run_dir.exists() and not spec.resume:
        shutil.rmtree(run_dir)
    log(f"[localisation] pretraining {cfg.model.name} at {spec.size} px for {cfg.train.steps} steps ...")
    t0 = time.perf_counter()
    train(cfg)
    train_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    paths, masks, patients = read_mask_manifest(root / "score" / "manifest.csv")
    backbones = {"pretrained": load_backbone(run_dir), "random_init": load_backbone(run_dir, random_init=True)}
    sections = backbones["pretrained"].sections
    prepared = load_inputs(paths, sections, spec.size, masks)
    scores, grid = {}, (0, 0)
    for name, lb in backbones.items():
        results = maps_of(lb.backbone, prepared)
        grid = results[0].mean.shape
        scores[name] = score_maps([r.mean for r in results], prepared.masks, prepared.names, spec.n_bootstrap,
                                  spec.seed)
    scores["centre_prior"] = score_maps([centre_prior(grid)] * len(paths), prepared.masks, prepared.names,
                                        spec.n_bootstrap, spec.seed)
    scores["uniform"] = score_maps([uniform_map(grid)] * len(paths), prepared.masks, prepared.names,
                                   spec.n_bootstrap, spec.seed)
    diff = paired_difference(scores["pretrained"], scores["random_init"], spec.n_bootstrap, spec.seed)
    save_attention_comparison({k: (lb.backbone, f"{k} ({lb.label})") for k, lb in backbones.items()}, paths,
                              Path(spec.output_dir) / "attention", sections, spec.size, masks)
    score_s = time.perf_counter() - t1
    result = {"spec": asdict(spec), "recipe": RECIPE, "data": data, "grid": list(grid),
              "patients_scored": sorted(set(patients)), "train_seconds": train_s, "score_seconds": score_s,
              "checkpoint": str(backbones["pretrained"].checkpoint), "step": backbones["pretrained"].step,
              "scores": {k: v.as_dict() for k, v in scores.items()}, "pretrained_minus_random_init": diff}
    out = Path(spec.output_dir) / "localisation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"[localisation] pretraining {train_s:.0f} s, scoring {score_s:.0f} s; results in {out}")
    return result


def format_localisation(result: dict) -> str:
    """Markdown table: each map's mean scores with their 95 % intervals, then the paired difference."""
    from medfoundry.eval.localisation import SCORES

    def cell(summary: dict, key: str) -> str:
        return f"{summary[key]:.3f} [{summary[key + '_ci_low']:.3f}, {summary[key + '_ci_high']:.3f}]"

    labels = {"pretrained": f"pretrained ({result['step']} steps)", "random_init": "random init (step 0)",
              "centre_prior": "centre Gaussian prior", "uniform": "uniform map"}
    lines = ["| map | " + " | ".join(SCORES) + " |", "|---|" + "---|" * len(SCORES)]
    for key, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(cell(result["scores"][key]["summary"], k) for k in SCORES) + " |")
    diff = result["pretrained_minus_random_init"]
    lines.append("| pretrained - random init (paired) | " + " | ".join(cell(diff, k) for k in SCORES) + " |")
    s = result["scores"]["pretrained"]["summary"]
    lines.append("")
    lines.append(f"{int(s['n_images'])} tumour slices of {', '.join(result['patients_scored'])} scored "
                 f"(mean mask fraction {s['mask_fraction']:.4f}; pointing_tol within {s['tolerance_px']:g} px), "
                 f"patch grid {result['grid'][0]}x{result['grid'][1]}; pretraining on "
                 f"{result['data']['n_pretrain_slices']} slices of {', '.join(result['spec']['pretrain'])}; "
                 f"{result['train_seconds']:.0f} s pretraining, {result['score_seconds']:.0f} s scoring")
    return "\n".join(lines)


def report_localisation(spec: LocalisationSpec, json_path: str | None = None) -> dict:
    """:func:`run_localisation`, print the table, optionally copy the JSON to ``json_path``."""
    result = run_localisation(spec)
    print(format_localisation(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
