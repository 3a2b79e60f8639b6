"""Data-pipeline throughput: decoded (+ intensity-mapped) and multi-crop-augmented samples per second per core.

For each reader (DICOM series, pydicom's real CT and chest radiograph, NIfTI, PNG slices with a value
mapping, HDF5, a pyramidal TIFF slide, the real Aperio SVS if cached, and the ``prepare`` output) it
times, in one process with one torch thread (so the numbers are per core):

* ``decode``: ``source[i]`` + the intensity transform (HU window / range) -> [0, 1] tensor;
* ``+views``: the same plus DINO multi-crop views (2 global 224 px + 8 local 96 px crops, flips).

Usage: ``python benchmarks/bench_data_pipeline.py [--quick] [--seconds S]`` (``--quick``: small
inputs and short timings, under a minute on a 2-core CPU).

``--peer dinov2`` instead times the CPU multi-crop side by side with facebookresearch/dinov2's own
``DataAugmentationDINO`` on real CT frames (pydicom's ``CT_small.dcm``, pydicom-data's ``693_UNCI.dcm`` and
``eCT_Supplemental.dcm``, lung window), per core, with DINOv2's colour/blur augmentations and geometric only, in
alternating blocks, and prints both ratios (``medfoundry_cli.bench.data.compare_augmentation_with_dinov2``; the
dinov2 code is looked up in ``.cache/peers/dinov2`` and cloned there only when absent, see docs/performance.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _write_inputs(root: Path, quick: bool) -> dict[str, object]:
    """Synthetic inputs in real formats, plus the real files the installed packages ship."""
    import h5py
    import nibabel as nib
    import pydicom
    import tifffile
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    from medfoundry.data.readers import HU_UINT16, write_slice

    side, depth = (256, 12) if quick else (512, 32)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    body = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2) < (0.42 * side) ** 2
    stored = np.stack([np.where(body, 1000 + 5 * z, 0) + rng.integers(0, 40, (side, side)) for z in range(depth)])
    stored = stored.astype(np.int16)
    series = root / "dicom" / "series"
    series.mkdir(parents=True)
    uid = generate_uid()
    for z in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "CT", "BENCH", uid
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.5 * z]
        ds.PixelSpacing = [0.7, 0.7]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.Rows = ds.Columns = side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = stored[z].tobytes()
        pydicom.dcmwrite(series / f"{z:04d}.dcm", ds, enforce_file_format=True)
    (root / "nifti").mkdir()
    hu_xyz = np.swapaxes(stored - 1024, 0, 2)
    nib.save(nib.Nifti1Image(hu_xyz, np.diag([-0.7, -0.7, 2.5, 1])), root / "nifti" / "ct.nii")
    (root / "png").mkdir()
    for z in range(depth):
        write_slice(root / "png" / f"{z:04d}.png", stored[z].astype(np.float32) - 1024, HU_UINT16)
    n_cxr = 64 if quick else 512
    with h5py.File(root / "cxr.h5", "w") as f:
        f.create_dataset("cxr", data=(rng.random((n_cxr, 320, 320)) * 255).astype(np.float32))
    slide_px = 2048 if quick else 8192
    ys, xs = np.mgrid[0:slide_px, 0:slide_px]
    tissue = (np.sin(xs / 90.0) * np.cos(ys / 70.0) > -0.3)[..., None]
    rgb = np.where(tissue, np.array([170, 90, 160], np.uint8), np.array([242, 242, 242], np.uint8))
    rgb = (rgb + rng.integers(0, 12, rgb.shape)).astype(np.uint8)
    (root / "wsi").mkdir()
    with tifffile.TiffWriter(root / "wsi" / "slide.tif") as tw:  # 40x scan (0.25 µm/px), levels 1, 4, 16
        tw.write(rgb, tile=(256, 256), photometric="rgb", compression="jpeg", subifds=2,
                 resolution=(4e4, 4e4), resolutionunit="CENTIMETER", metadata=None)
        for k in (4, 16):
            tw.write(rgb[::k, ::k], tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=1,
                     metadata=None)
    return {"side": side, "depth": depth}


def _sources(root: Path):
    """(name, DataConfig) for every reader benchmarked."""
    from pydicom.data import get_testdata_file

    from medfoundry.config.data import DataConfig

    ct = DataConfig(channels=3, slices=3, intensity="window", windows=["lung"], random_window_prob=0.5)
    out = [
        ("dicom series (2.5D)", replace(ct, kind="dicom", root=str(root / "dicom"))),
        ("pydicom CT_small.dcm (real)", replace(ct, kind="dicom", root=get_testdata_file("CT_small.dcm"), slices=1)),
    ]
    if importlib.util.find_spec("data_store") is not None:  # pydicom-data (else pydicom would try to download)
        cxr = get_testdata_file("RG1_UNCI.dcm")
        out.append(("pydicom RG1_UNCI.dcm (real CXR)", DataConfig(kind="dicom", root=cxr, channels=3,
                                                                  intensity="range", value_range=[0.0, 32767.0])))
    out += [
        ("nifti (2.5D)", replace(ct, kind="nifti", root=str(root / "nifti"))),
        ("png slices + mapping (2.5D)", replace(ct, kind="slices", root=str(root / "png"))),
        ("hdf5 320x320", DataConfig(kind="hdf5", root=str(root / "cxr.h5"), channels=3, intensity="range",
                                    value_range=[0.0, 255.0])),
        ("wsi tiff 224px @0.5um", DataConfig(kind="wsi", root=str(root / "wsi"), channels=3, tile_size=224)),
    ]
    svs = REPO / ".cache" / "medfoundry" / "cmu_small_region.svs"
    if svs.is_file():
        out.append(("wsi real SVS 224px @0.5um", DataConfig(kind="wsi", root=str(svs), channels=3, tile_size=224)))
    out.append(("prepared (int16 HU, 2.5D)", replace(ct, kind="prepared", root=str(root / "prepared"))))
    return out


def _rate(fn, n_items: int, seconds: float) -> float:
    """Items per second of ``fn(i)`` over about ``seconds`` (after one warm-up call)."""
    fn(0)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(done % n_items)
        done += 1
    return done / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, short timings (< 1 minute)")
    parser.add_argument("--seconds", type=float, default=None, help="timing per measurement")
    parser.add_argument("--peer", choices=["dinov2"], default=None,
                        help="only the side-by-side with dinov2's DataAugmentationDINO on real CT frames")
    parser.add_argument("--repeats", type=int, default=7, help="--peer: alternating timed blocks per side")
    parser.add_argument("--block-images", type=int, default=24, help="--peer: images per block")
    parser.add_argument("--global-size", type=int, default=224, help="--peer: global crop side (dinov2: 224)")
    parser.add_argument("--local-size", type=int, default=96, help="--peer: local crop side (dinov2: 96)")
    parser.add_argument("--n-local", type=int, default=8, help="--peer: local crops (dinov2: 8)")
    parser.add_argument("--peer-path", default=None, help="--peer: folder holding the dinov2 code")
    parser.add_argument("--no-fetch", action="store_true", help="--peer: never clone the dinov2 code")
    parser.add_argument("--uint8-resize", action="store_true",
                        help="--peer: also time medfoundry with MultiCropTransform(uint8_resize=True)")
    parser.add_argument("--json", default=None, help="--peer: write the comparison as JSON to this file")
    args = parser.parse_args(argv)
    if args.peer:
        return _peer(args)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    torch.set_num_threads(1)

    from medfoundry.config.schema import CropsConfig
    from medfoundry.data.intensity import build_intensity_transform
    from medfoundry.data.multicrop import MultiCropTransform
    from medfoundry.data.prepare import PrepareOptions, prepare
    from medfoundry.data.sources import build_source

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        info = _write_inputs(root, args.quick)
        prepare(root / "dicom", root / "prepared", PrepareOptions(progress=False))
        print(f"inputs: CT {info['depth']}x{info['side']}x{info['side']} in DICOM/NIfTI/PNG/prepared, "
              f"HDF5 of 320x320, a {2048 if args.quick else 8192}px pyramidal TIFF "
              f"(written in {time.perf_counter() - t0:.1f}s); 1 torch thread, one process = one core")
        print(f"{'reader':34s} {'items':>6s} {'decode/s':>9s} {'+views/s':>9s}")
        crops = CropsConfig(mean=[0.5], std=[0.25])
        for name, cfg in _sources(root):
            try:
                src = build_source(cfg)
            except Exception as err:  # noqa: BLE001 - report and go on
                print(f"{name:34s} failed: {err}")
                continue
            intensity = build_intensity_transform(cfg)
            views = MultiCropTransform(crops, cfg.channels)
            torch.manual_seed(0)

            def decoded(i: int, s=src, t=intensity):
                return t(s[i].image)

            def augmented(i: int, s=src, t=intensity, v=views):
                sample = s[i]
                return v(t(sample.image), sample.region)

            decode = _rate(decoded, len(src), seconds)
            full = _rate(augmented, len(src), seconds)
            print(f"{name:34s} {len(src):6d} {decode:9.1f} {full:9.1f}")
        print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


def _peer(args: argparse.Namespace) -> int:
    """``--peer dinov2``: the comparison table and its two ratios (see the module docstring); exit code 2 with one
    line when the dinov2 code is missing and cannot be fetched."""
    from medfoundry.errors import UserError
    from medfoundry_cli.bench.data import compare_augmentation_with_dinov2
    from medfoundry_cli.bench.results import describe_machine

    torch.set_num_threads(1)
    print(f"{describe_machine(torch.device('cpu'))}; load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        result = compare_augmentation_with_dinov2(repeats=args.repeats, block_images=args.block_images,
                                                  global_size=args.global_size, local_size=args.local_size,
                                                  n_local=args.n_local, peer_path=args.peer_path,
                                                  fetch=not args.no_fetch, uint8_resize=args.uint8_resize)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.format())
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
