"""Save last-layer attention (per head + mean) and patch PCA maps: medfoundry attention CHECKPOINT IMAGE... --out DIR.

For every image, DIR gets ``NAME_head{i}.png`` (class-token attention of head i overlaid on the
image), ``NAME_mean.png`` (averaged over heads), ``NAME_pca.png`` (first three principal components
of the patch features as RGB, DINOv2-style), ``NAME_panel.png`` (all of them side by side, a colour bar
on every attention map, one colour scale for all heads of the image, named in the title) and
``NAME_maps.npz`` (the raw maps). Images are preprocessed like the evaluation preprocesses them, and the
pictures show the model's [0, 1] input as it is (after the intensity mapping, never re-stretched).
``--masks`` draws label outlines: one mask file per image, or a folder holding masks with the images' names.
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
    parser.add_argument("--best", action="store_true", help="use RUN/best.pt instead of the newest checkpoint")
    parser.add_argument("--random-init", action="store_true", help="the backbone at its random initialisation")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="change how images are read and preprocessed (the run's data/crops/eval sections), "
                             "e.g. data.intensity=window data.windows=[lung] or crops.mean=[0.5]; repeatable")
    parser.add_argument("--masks", nargs="+", default=None, metavar="MASK",
                        help="label masks whose outlines are drawn (non-zero = inside; same size as the image): "
                             "one file per image, in order, or one folder with a mask of the same file name "
                             "for each image (images without one are drawn without outline)")


def run(args: argparse.Namespace) -> int:
    from medfoundry.config.loader import apply_overrides
    from medfoundry.eval.attention import save_attention_maps
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
    files = save_attention_maps(loaded.backbone, args.images, args.out, loaded.sections, args.img_size, loaded.label,
                                masks=masks)
    for f in files:
        print(f["panel"])
    print(f"{len(files)} image(s) written to {args.out} ({loaded.checkpoint}, {loaded.label})")
    return 0


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
