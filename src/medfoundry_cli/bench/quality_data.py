"""Real labelled sets for the quality benchmark, fetched through the package registries into a cache.

Three sets, each written as an image folder per split plus a ``manifest.csv`` (``path``, label columns,
``split``) that :func:`medfoundry.eval.labelled_set.load_labelled_set` reads:

* ``brain`` -- anatomical patches of the MNI152 2009 T1 template (shipped in the nilearn wheel) labelled
  by the lobe of the Harvard-Oxford cortical atlas (Debian ``mricron-data``, MNI space) at the patch
  centre. Patches are cut from sagittal slices; the left hemisphere gives ``train`` and ``val`` (a band
  of slices separated from the training slices by a gap), the right hemisphere gives ``test``, so no
  test patch shares a voxel with a training one.
* ``fashion`` -- Fashion-MNIST (Debian ``dataset-fashion-mnist``), the non-medical sanity check with
  published SSL figures: ``train``/``val`` from the official training file, ``test`` from the official
  test file.
* ``ct`` -- axial slices of the pyradiomics 3.0.1 test cases (CT and MR with tumour masks) labelled
  tumour-in-slice, split by patient; the InVesalius head CT (Debian ``invesalius-examples``) joins the
  unlabelled pretraining images when it can be fetched.

Debian packages are fetched with ``apt-get download`` (no root needed) and unpacked with ``dpkg-deb -x``
into the cache; nothing is written into the repository.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The 48 regions of the Harvard-Oxford cortical atlas (FSL), label value = index + 1.
HARVARD_OXFORD_CORTICAL = (
    "Frontal Pole", "Insular Cortex", "Superior Frontal Gyrus", "Middle Frontal Gyrus",
    "Inferior Frontal Gyrus, pars triangularis", "Inferior Frontal Gyrus, pars opercularis", "Precentral Gyrus",
    "Temporal Pole", "Superior Temporal Gyrus, anterior division", "Superior Temporal Gyrus, posterior division",
    "Middle Temporal Gyrus, anterior division", "Middle Temporal Gyrus, posterior division",
    "Middle Temporal Gyrus, temporooccipital part", "Inferior Temporal Gyrus, anterior division",
    "Inferior Temporal Gyrus, posterior division", "Inferior Temporal Gyrus, temporooccipital part",
    "Postcentral Gyrus", "Superior Parietal Lobule", "Supramarginal Gyrus, anterior division",
    "Supramarginal Gyrus, posterior division", "Angular Gyrus", "Lateral Occipital Cortex, superior division",
    "Lateral Occipital Cortex, inferior division", "Intracalcarine Cortex", "Frontal Medial Cortex",
    "Juxtapositional Lobule Cortex", "Subcallosal Cortex", "Paracingulate Gyrus",
    "Cingulate Gyrus, anterior division", "Cingulate Gyrus, posterior division", "Precuneous Cortex",
    "Cuneal Cortex", "Frontal Orbital Cortex", "Parahippocampal Gyrus, anterior division",
    "Parahippocampal Gyrus, posterior division", "Lingual Gyrus", "Temporal Fusiform Cortex, anterior division",
    "Temporal Fusiform Cortex, posterior division", "Temporal Occipital Fusiform Cortex",
    "Occipital Fusiform Gyrus", "Frontal Operculum Cortex", "Central Opercular Cortex",
    "Parietal Operculum Cortex", "Planum Polare", "Heschl's Gyrus", "Planum Temporale",
    "Supracalcarine Cortex", "Occipital Pole",
)
#: Lobe of each Harvard-Oxford label (1-based), the class of a brain patch.
LOBES = {
    "frontal": (1, 3, 4, 5, 6, 7, 25, 26, 33),
    "temporal": (8, 9, 10, 11, 12, 13, 14, 15, 16, 37, 38, 44, 45, 46),
    "parietal": (17, 18, 19, 20, 21, 31),
    "occipital": (22, 23, 24, 32, 36, 39, 40, 47, 48),
    "limbic": (27, 28, 29, 30, 34, 35),
    "insula_operculum": (2, 41, 42, 43),
}
ATLAS_FILE = "usr/share/mricron/templates/HarvardOxford-cort-maxprob-thr0-1mm.nii.gz"
FASHION_DIR = "usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")


@dataclass
class QualitySet:
    """Where a prepared benchmark set lies: per-split image folders and the labelled manifest."""

    name: str
    root: Path
    manifest: Path
    label_column: str
    counts: dict[str, int]  # images per split

    def images(self, split: str) -> Path:
        """The image folder of one split (``train`` is what pretraining sees)."""
        return self.root / "images" / split


def fetch_debian_package(package: str, cache: str | Path) -> Path:
    """Unpack the Debian package ``package`` under ``CACHE/debian/<package>`` (``apt-get download`` once).

    Returns the folder that holds the package's ``usr/`` tree. Needs ``apt-get`` and ``dpkg-deb``; no root.
    """
    dest = Path(cache) / "debian" / package
    done = dest / ".unpacked"
    if done.is_file():
        return dest
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"fetching the Debian package '{package}' needs `{tool}`, which is not on PATH; "
                               f"on a Debian/Ubuntu machine run `apt-get download {package}` and unpack it with "
                               f"`dpkg-deb -x <file>.deb {dest}`")
    debs = dest.parent / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
    files = sorted(debs.glob(f"{package}_*.deb"))
    if not files:
        raise RuntimeError(f"`apt-get download {package}` failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(files[-1]), str(tmp)], check=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    done.write_text(files[-1].name)
    return dest


#: Marker in ``prepared.json``: the set's 16-bit PNGs record their value mapping (value = stored / 65535).
MAPPED_MARKER = "pngs_record_mapping"


def _write_png(path: Path, arr01: np.ndarray) -> None:
    """A [0, 1] picture as a 16-bit PNG that records its mapping (readers refuse 16-bit PNGs without one)."""
    from medfoundry.data.readers.slices import FULL_RANGE_UINT16, write_stored

    path.parent.mkdir(parents=True, exist_ok=True)
    write_stored(path, (np.clip(arr01, 0.0, 1.0) * 65535).round().astype(np.uint16), FULL_RANGE_UINT16)


def _write_manifest(root: Path, rows: list[dict], info: dict) -> Path:
    import pandas as pd

    from medfoundry.data.manifest import write_table

    manifest = root / "manifest.csv"
    write_table(pd.DataFrame(rows), manifest)
    (root / "prepared.json").write_text(json.dumps({**info, MAPPED_MARKER: True}, indent=2))
    return manifest


def _cached(root: Path, info: dict, name: str, label: str) -> QualitySet | None:
    """The set prepared earlier with the same ``info``, or None. A set written before its PNGs recorded their
    value mapping is recognised and upgraded in place (:func:`record_full_range_mapping`: same pixels)."""
    flag = root / "prepared.json"
    if flag.is_file() and (root / "manifest.csv").is_file():
        old = json.loads(flag.read_text())
        if {k: old.get(k) for k in info} == info:
            if not old.get(MAPPED_MARKER):
                record_full_range_mapping(root / "images")
                flag.write_text(json.dumps({**old, MAPPED_MARKER: True}, indent=2))
            return QualitySet(name, root, root / "manifest.csv", label, old["counts"])
    return None


def record_full_range_mapping(folder: Path) -> int:
    """Add the full-range mapping (value = stored / 65535) to every 16-bit PNG under ``folder`` that records none.

    The stored pixels are rewritten unchanged (temporary file, then rename), so images and every number measured
    on them stay what they were. Returns how many files were upgraded.
    """
    from medfoundry.data.readers.slices import FULL_RANGE_UINT16, read_stored, write_stored

    done = 0
    for png in sorted(folder.rglob("*.png")):
        stored, mapping = read_stored(png)
        if mapping is not None or stored.dtype != np.uint16:
            continue
        tmp = png.with_name(png.name + ".tmp.png")
        write_stored(tmp, stored, FULL_RANGE_UINT16)
        tmp.replace(png)
        done += 1
    return done


def lobe_lookup() -> np.ndarray:
    """Array mapping a Harvard-Oxford label value (0..48) to a lobe index (-1 for background)."""
    table = np.full(len(HARVARD_OXFORD_CORTICAL) + 1, -1, dtype=np.int64)
    for i, labels in enumerate(LOBES.values()):
        table[list(labels)] = i
    return table


def brain_patches_from_volumes(
    template: np.ndarray, atlas: np.ndarray, x_mm: np.ndarray, out_root: Path, patch: int = 48,
    stride: int = 8, slice_step: int = 2, min_abs_x: float = 4.0, val_band: tuple[float, float] = (-40.0, -30.0),
    gap_mm: float = 4.0, jitter: bool = True, seed: int = 0,
) -> list[dict]:
    """Cut sagittal patches of ``template`` (1 mm grid, x first) labelled by the lobe of ``atlas`` at their centre.

    ``x_mm`` is the world x (mm, RAS: negative = left) of each sagittal slice. Left slices with ``|x| >=
    min_abs_x`` go to ``train``, except those inside ``val_band`` (``val``) or within ``gap_mm`` of it
    (dropped); right slices go to ``test``. Every ``slice_step``-th slice is used, patch centres lie on a
    ``stride`` grid and must fall on a cortical label. With ``jitter`` each centre moves by a seeded random
    offset of up to half a stride, so a test patch is not the pixel-aligned mirror twin of a training patch
    (the MNI152 hemispheres are nearly symmetric). Writes the PNGs and returns the manifest rows.
    """
    rng = np.random.default_rng(seed)
    lut = lobe_lookup()
    lobes = list(LOBES)
    lo, hi = np.percentile(template[template > 0], [0.5, 99.5]) if (template > 0).any() else (0.0, 1.0)
    scaled = np.clip((template - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    half = patch // 2
    padded = np.pad(scaled, ((0, 0), (half, half), (half, half)))
    rows: list[dict] = []
    for i in range(0, template.shape[0], slice_step):
        x = float(x_mm[i])
        if abs(x) < min_abs_x:
            continue
        if x > 0:
            split = "test"
        elif val_band[0] <= x <= val_band[1]:
            split = "val"
        elif val_band[0] - gap_mm < x < val_band[1] + gap_mm:
            continue
        else:
            split = "train"
        labels = atlas[i]
        for gy in range(half % stride, labels.shape[0], stride):
            for gz in range(half % stride, labels.shape[1], stride):
                cy, cz = gy, gz
                if jitter:
                    dy, dz = rng.integers(-(stride // 2), stride - stride // 2, size=2)
                    cy = int(np.clip(gy + dy, 0, labels.shape[0] - 1))
                    cz = int(np.clip(gz + dz, 0, labels.shape[1] - 1))
                lab = int(labels[cy, cz])
                if lab <= 0 or lab >= lut.size:
                    continue
                img = padded[i, cy : cy + patch, cz : cz + patch]
                # sagittal slice shown with superior up, anterior to the right
                img = np.rot90(img)
                rel = Path("images") / split / f"x{int(round(x)):+04d}_y{cy:03d}_z{cz:03d}.png"
                _write_png(out_root / rel, img)
                rows.append({"path": str(rel), "lobe": lobes[lut[lab]], "region": HARVARD_OXFORD_CORTICAL[lab - 1],
                             "x_mm": round(x, 1), "hemisphere": "left" if x < 0 else "right", "split": split})
    if not rows:
        raise ValueError("no brain patch centre fell on a cortical label; check the template/atlas grids")
    return rows


def prepare_brain_patches(cache: str | Path = ".cache/quality", patch: int = 48, stride: int = 8,
                          slice_step: int = 2, jitter: bool = True) -> QualitySet:
    """Fetch (once) the MNI152 template and the Harvard-Oxford atlas, resample and cut labelled patches."""
    root = Path(cache) / "brain"
    info = {"patch": patch, "stride": stride, "slice_step": slice_step, "jitter": jitter, "version": 3}
    if (hit := _cached(root, info, "brain", "lobe")) is not None:
        return hit
    from medfoundry_cli.bench.offline_data import ensure_python_package

    ensure_python_package("nilearn", "nilearn")
    import nibabel as nib
    from nilearn.datasets import load_mni152_template
    from nilearn.image import resample_to_img

    atlas_path = fetch_debian_package("mricron-data", cache) / ATLAS_FILE
    if not atlas_path.is_file():
        raise FileNotFoundError(f"{atlas_path}: the mricron-data package no longer ships the Harvard-Oxford atlas")
    template = load_mni152_template(resolution=1)
    atlas = resample_to_img(nib.load(atlas_path), template, interpolation="nearest", force_resample=True,
                            copy_header=True)
    t = np.asarray(template.get_fdata(), dtype=np.float32)
    a = np.asarray(atlas.get_fdata()).round().astype(np.int64)
    if abs(template.affine[0, 0]) != 1.0 or template.affine[0, 1:3].any():
        raise ValueError(f"expected a 1 mm template with x along the first axis, got affine\n{template.affine}")
    x_mm = template.affine[0, 3] + np.arange(t.shape[0]) * template.affine[0, 0]
    shutil.rmtree(root / "images", ignore_errors=True)
    rows = brain_patches_from_volumes(t, a, x_mm, root, patch, stride, slice_step, jitter=jitter)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    manifest = _write_manifest(root, rows, {**info, "counts": counts})
    return QualitySet("brain", root, manifest, "lobe", counts)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if data[:2] != b"\x00\x00" or data[2] != 8:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def prepare_fashion_mnist(cache: str | Path = ".cache/quality", n_train: int = 5000, n_val: int = 1000,
                          n_test: int = 2000, seed: int = 0) -> QualitySet:
    """Fashion-MNIST subsets (class-stratified, seeded): train/val from the official training file, test from t10k."""
    root = Path(cache) / "fashion"
    info = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed, "version": 1}
    if (hit := _cached(root, info, "fashion", "label")) is not None:
        return hit
    src = fetch_debian_package("dataset-fashion-mnist", cache) / FASHION_DIR
    train_x, train_y = _read_idx(src / "train-images-idx3-ubyte.gz"), _read_idx(src / "train-labels-idx1-ubyte.gz")
    test_x, test_y = _read_idx(src / "t10k-images-idx3-ubyte.gz"), _read_idx(src / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_y))
    picks = {"train": order[:n_train], "val": order[n_train : n_train + n_val],
             "test": rng.permutation(len(test_y))[:n_test]}
    shutil.rmtree(root / "images", ignore_errors=True)
    rows = []
    for split, idx in picks.items():
        xs, ys = (test_x, test_y) if split == "test" else (train_x, train_y)
        for j in idx:
            rel = Path("images") / split / f"{split}_{int(j):05d}.png"
            _write_png(root / rel, xs[j].astype(np.float32) / 255.0)
            rows.append({"path": str(rel), "label": FASHION_CLASSES[int(ys[j])], "split": split})
    counts = {s: len(i) for s, i in picks.items()}
    manifest = _write_manifest(root, rows, {**info, "counts": counts})
    return QualitySet("fashion", root, manifest, "label", counts)


#: pyradiomics cases by split (split by patient) for the CT/MR tumour-in-slice set.
CT_SPLITS = {"train": ("lung1", "brain1", "breast1"), "test": ("lung2", "brain2")}


def prepare_ct_slices(cache: str | Path = ".cache/quality", size: int = 64,
                      splits: dict[str, Sequence[str]] | None = None) -> QualitySet:
    """Axial slices of the pyradiomics cases, labelled tumour-in-slice, split by patient (see :data:`CT_SPLITS`).

    ``val`` is every fifth slice of the training patients (model selection only; the test patients are
    never seen before the final evaluation).
    """
    from medfoundry_cli.bench.offline_data import (
        CASES,
        ensure_python_package,
        fetch_pyradiomics_data,
        scale_intensity,
        square_resize,
    )

    splits = dict(splits or CT_SPLITS)
    root = Path(cache) / "ct"
    info = {"size": size, "splits": {k: list(v) for k, v in splits.items()}, "version": 1}
    if (hit := _cached(root, info, "ct", "tumour")) is not None:
        return hit
    ensure_python_package("nrrd", "pynrrd")
    from medfoundry.data.readers import read_nrrd

    data = fetch_pyradiomics_data(Path(cache) / "downloads")
    shutil.rmtree(root / "images", ignore_errors=True)
    split_of = {case: s for s, cases in splits.items() for case in cases}
    rows = []
    for case, region, modality in CASES:
        if case not in split_of:
            continue
        vol = read_nrrd(data / f"{case}_image.nrrd")
        mask = read_nrrd(data / f"{case}_label.nrrd").array > 0
        scaled = scale_intensity(vol.array, modality)
        for z in range(vol.depth):
            split = split_of[case]
            if split == "train" and z % 5 == 2:
                split = "val"
            rel = Path("images") / split / f"{case}_{z:03d}.png"
            _write_png(root / rel, square_resize(scaled[z], size))
            rows.append({"path": str(rel), "tumour": "tumour" if mask[z].any() else "no_tumour",
                         "region": region, "patient": case, "split": split})
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    manifest = _write_manifest(root, rows, {**info, "counts": counts})
    return QualitySet("ct", root, manifest, "tumour", counts)


PREPARERS = {"brain": prepare_brain_patches, "fashion": prepare_fashion_mnist, "ct": prepare_ct_slices}
