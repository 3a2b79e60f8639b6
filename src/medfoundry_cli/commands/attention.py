"""Save last-layer attention (per head + mean) and patch PCA maps: medfoundry attention CHECKPOINT IMAGE... --out DIR.

For every image, DIR gets ``NAME_head{i}.png`` (class-token attention of head i overlaid on the
image), ``NAME_mean.png`` (averaged over heads), ``NAME_pca.png`` (first three principal components
of the patch features as RGB, DINOv2-style), ``NAME_panel.png`` (all of them side by side, a colour bar
on every attention map, one colour scale for all heads of the image, named in the title) and
``NAME_maps.npz`` (the raw maps). Images are preprocessed like the evaluation preprocesses them, and the
pictures show the model's [0, 1] input as it is (after the intensity mapping, never re-stretched).
``--masks`` draws label outlines: one mask file per image, or a folder holding masks with the images' names.
With masks the mean attention map is also scored against them (:mod:`medfoundry.eval.localisation`: pointing game,
IoU, pixel AUC, means with bootstrap 95 % intervals, beside a centre-prior and a uniform map): printed and written to
``DIR/localisation.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run folder or checkpoint file (.pt)")
    parser.add_argument("images", nargs="+", help="image files (PNG/JPEG/TIFF, DICOM, NIfTI/NRRD: middle slice)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--img-size", type=int, default=0,
                        help="input side (default: eval.img_size or crops.global_size; larger gives finer maps)")
    parser.add_argument("--best", action="store_true", help="use the best checkpoint (RUN/best.pt; "
                        "RUN/best.dcp from an FSDP run) instead of the newest")
    parser.add_argument("--random-init", action="store_true", help="the backbone at its random initialisation")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="change how images are read and preprocessed (the run's data/crops/eval sections), "
                             "e.g. data.intensity=window data.windows=[lung] or crops.mean=[0.5]; repeatable")
    parser.add_argument("--masks", nargs="+", default=None, metavar="MASK",
                        help="label masks whose outlines are drawn (non-zero = inside; same size as the image): "
                             "one file per image, in order, or one folder with a mask of the same file name "
                             "for each image (images without one are drawn without outline); the mean attention "
                             "is then scored against them (DIR/localisation.json)")
    parser.add_argument("--n-bootstrap", type=int, default=1000,
                        help="bootstrap resamples (over images) of the localisation scores' 95%% intervals")


def run(args: argparse.Namespace) -> int:
    from medfoundry.config.loader import apply_overrides
    from medfoundry.eval.attention import load_inputs, maps_of, save_result
    from medfoundry.methods.checkpoint_backbone import load_backbone

    missing = [p for p in args.images if not Path(p).exists()]
    if missing:
        print(f"medfoundry attention: no such image(s): {missing}", file=sys.stderr)
        return 2
    if not Path(args.checkpoint).exists():
        print(f"medfoundry attention: '{args.checkpoint}' does not exist", file=sys.stderr)
        return 2
    try:
        masks = mask_paths(args.images, args.masks)
    except ValueError as err:
        print(f"medfoundry attention: --masks: {err}", file=sys.stderr)
        return 2
    loaded = load_backbone(args.checkpoint, random_init=args.random_init, which="best" if args.best else "latest",
                           device=args.device)
    apply_overrides(loaded.sections, args.override, "--override")  # a bad key: ConfigError, exit 2
    prepared = load_inputs(args.images, loaded.sections, args.img_size, masks)
    results = maps_of(loaded.backbone, prepared)
    files = [save_result(r, Path(args.out), f"{loaded.label}: {r.name}" if loaded.label else r.name) for r in results]
    for f in files:
        print(f["panel"])
    print(f"{len(files)} image(s) written to {args.out} ({loaded.checkpoint}, {loaded.label})")
    if masks is not None:
        write_localisation(results, Path(args.out), str(loaded.checkpoint), loaded.label, args.n_bootstrap)
    return 0


def write_localisation(results: list, out: Path, checkpoint: str, label: str, n_bootstrap: int) -> dict:
    """Score each image's mean attention against its mask (and a centre prior and a uniform map on the same masks),
    print the table and write ``out/localisation.json``; returns what was written."""
    import json

    from medfoundry.eval.localisation import SCORES, centre_prior, score_maps, uniform_map

    names = [r.name for r in results]
    masks = [r.mask for r in results]
    rows = {label or "backbone": score_maps([r.mean for r in results], masks, names, n_bootstrap)}
    rows["centre prior (baseline)"] = score_maps([centre_prior(r.mean.shape) for r in results], masks, names,
                                                 n_bootstrap)
    rows["uniform map (baseline)"] = score_maps([uniform_map(r.mean.shape) for r in results], masks, names,
                                                n_bootstrap)
    first = next(iter(rows.values())).summary
    print(f"localisation (class-token attention, mean over heads, bilinear to the input): {int(first['n_images'])} "
          f"image(s) scored, {int(first['n_skipped_empty'])} without mask or with an empty one skipped; pointing_tol "
          f"within {first['tolerance_px']:g} px; 95% bootstrap intervals over images")
    width = max(len(k) for k in rows)
    print(f"  {'':<{width}}  " + "  ".join(f"{k:>22}" for k in SCORES))
    for name, sc in rows.items():
        cells = [f"{sc.summary[k]:.3f} [{sc.summary[k + '_ci_low']:.2f}, {sc.summary[k + '_ci_high']:.2f}]"
                 for k in SCORES]
        print(f"  {name:<{width}}  " + "  ".join(f"{c:>22}" for c in cells))
    record = {"checkpoint": checkpoint, "backbone": label,
              "map": "last-block class-token attention, mean over heads, bilinear upsampling to the input size",
              "scores": rows[label or "backbone"].as_dict(),
              "baselines": {"centre_prior": rows["centre prior (baseline)"].as_dict(),
                            "uniform": rows["uniform map (baseline)"].as_dict()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "localisation.json").write_text(json.dumps(record, indent=2))
    print(f"localisation scores written to {out / 'localisation.json'}")
    return record


def mask_paths(images: list[str], masks: list[str] | None) -> list[str | None] | None:
    """One mask path (or None) per image from ``--masks``: a file per image, or a folder of same-named masks.

    Raises ValueError naming what does not match (a count other than the images', a missing file).
    """
    if not masks:
        return None
    if len(masks) == 1 and Path(masks[0]).is_dir():
        folder = Path(masks[0])
        found: list[str | None] = [str(folder / Path(p).name) if (folder / Path(p).name).is_file() else None
                                   for p in images]
        for image, mask in zip(images, found):
            if mask is None:
                print(f"medfoundry attention: note: no mask {folder / Path(image).name} for {image}; "
                      "drawn without outline", file=sys.stderr)
        return found
    if len(masks) != len(images):
        raise ValueError(f"{len(masks)} mask files for {len(images)} images; give one per image, in order, "
                         "or one folder of masks named like the images")
    missing = [m for m in masks if not Path(m).is_file()]
    if missing:
        raise ValueError(f"no such mask file(s): {missing}")
    return list(masks)
