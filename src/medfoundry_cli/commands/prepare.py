"""Convert raw DICOM/NIfTI/PNG/whole-slide data into a fast, resumable training folder with a manifest."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder (searched recursively), single file, or CSV/Parquet manifest of paths")
    parser.add_argument("--out", required=True, help="output folder (manifest.csv, items/, report.json)")
    parser.add_argument("--tile-mpp", type=float, default=0.5, help="slide tiles: microns per pixel (0.5 ~ 20x)")
    parser.add_argument("--tile-size", type=int, default=224, help="slide tiles: side in pixels")
    parser.add_argument("--min-tissue", type=float, default=0.25, help="slide tiles: smallest tissue fraction")
    parser.add_argument("--max-tiles", type=int, default=0, help="slide tiles: at most this many per slide (0 = all)")
    parser.add_argument("--slide-mpp", type=float, default=None, help="level-0 µm/px for slides lacking it")
    parser.add_argument("--wsi-backend", choices=["auto", "openslide", "tifffile"], default="auto")
    parser.add_argument("--split", default="0.9,0.05,0.05", help="train,val,test fractions, assigned per patient")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    parser.add_argument("--force", action="store_true", help="redo items that are already finished")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--unmapped-16bit", choices=["refuse", "full_range"], default="refuse",
                        help="16-bit PNG/TIFF slices without a recorded value mapping: skip them (default), or read "
                             "them as [0, 1] pictures over 0..65535 (full_range)")


def run(args: argparse.Namespace) -> int:
    from medfoundry.data.manifest import parse_fractions
    from medfoundry.data.prepare import PrepareOptions, prepare

    try:
        fractions = parse_fractions(args.split)
    except ValueError as err:
        print(f"medfoundry prepare: error: --split: {err}", file=sys.stderr)
        return 2
    args.error_log_dir = args.out  # the CLI logs a user error's traceback there once the folder exists
    opts = PrepareOptions(
        tile_mpp=args.tile_mpp,
        tile_size=args.tile_size,
        min_tissue=args.min_tissue,
        max_tiles=args.max_tiles,
        slide_mpp=args.slide_mpp,
        wsi_backend=args.wsi_backend,
        fractions=fractions,
        seed=args.seed,
        force=args.force,
        progress=not args.no_progress,
        unmapped_16bit=args.unmapped_16bit,
    )
    report = prepare(args.src, args.out, opts)  # a missing SRC or a bad manifest: the CLI reports it (exit 2)
    print(report.summary())
    if report.interrupted:
        return 130
    return 0 if (report.written or report.already_done) else 1
