"""Image-report pair sources for CLIP-style training: manifests, CheXzero's HDF5 layout, the demo.

Pair sources (``clip.data.kind``):

* ``manifest`` - a CSV or Parquet table with an image-path column and the report text, either whole
  (``text_column``) or by section (columns such as ``findings`` / ``impression``).
* ``chexzero`` - the layout CheXzero (Tiu et al., Nature BME 2022) trains from: one HDF5 file whose
  dataset ``cxr`` holds (N, 320, 320) grey images and a CSV whose rows hold the report text (their
  ``impression`` column) in the same order.
* ``demo`` - an offline check that the pipeline learns *an* image-text association. There are no
  real image-report pairs offline, so the demo pairs the real DICOM frames that pydicom-data ships
  with text whose ``EXAMINATION`` line is derived from each frame's own DICOM header (modality and
  body part: true for that image) followed by the FINDINGS and IMPRESSION of a real Indiana
  University chest X-ray report (Demner-Fushman et al., JAMIA 2016; CC BY-NC-ND 4.0, read at run
  time from the torchxrayvision package, never stored in this repository) that belongs to a
  *different* patient, assigned by a seeded shuffle. The report text is therefore **unpaired**:
  retrieval on these pairs measures memorisation of an arbitrary assignment plus the true modality
  line, not clinical understanding.

Images are returned in [0, 1]; the training dataset and loader are in :mod:`medfoundry.data.pair_loader`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from medfoundry.config.clip import ClipDataConfig, ZeroShotConfig
from medfoundry.data.reports import ManifestWarning, _clean, load_iu_reports, select_text
from medfoundry.data.sources import array_to_chw

# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------


def read_image(path: str | Path) -> Tensor:
    """Read an image file as float32 (C, H, W) in [0, 1].

    PNG/JPEG/TIFF are read like ``data.kind=image_folder`` reads them (8-bit / 255; a recorded value mapping,
    which must give [0, 1] values, units ``unit``; a 16-bit picture without one is refused, since what its
    numbers mean is unknown); DICOM is windowed to its 0.5-99.5 percentiles
    (MONOCHROME1 inverted so that bone is bright); ``.npy`` floats are taken as they are.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".dcm", ".dicom"):
        import pydicom

        ds = pydicom.dcmread(p)
        arr = ds.pixel_array.astype(np.float64)
        if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
            arr = arr[0]
        if arr.ndim == 3:
            arr = arr[..., :3].mean(axis=-1)
        lo, hi = np.percentile(arr, 0.5), np.percentile(arr, 99.5)
        arr = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)
        if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
            arr = 1.0 - arr
        return array_to_chw(arr.astype(np.float32))
    if suffix == ".npy":  # floats as they are, uint8 / 255, wider integers only with a mapping in <file>.json
        from medfoundry.data.readers.slices import apply_mapping, sidecar_mapping

        return array_to_chw(apply_mapping(np.load(p), p, sidecar_mapping(p), config_keys=False)[0])
    from medfoundry.data.image_folder import read_picture
    from medfoundry.data.readers.base import ReaderError

    values, mapping = read_picture(p, config_keys=False)
    if mapping is not None and mapping.units != "unit":
        raise ReaderError(f"{p}: records a value mapping to {mapping.units} (slope={mapping.slope:g}, "
                          f"intercept={mapping.intercept:g}), but image-report pairs take [0, 1] pictures; export "
                          "the image as an 8-bit picture or record a [0, 1] mapping (FULL_RANGE_UINT16)")
    return array_to_chw(values)


def _read_table(path: str | Path):
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest {p} not found")
    if p.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(p)
    return pd.read_csv(p)


def _column(df, name: str, what: str, path) -> str:
    lower = {str(c).lower(): str(c) for c in df.columns}
    if name.lower() not in lower:
        raise KeyError(f"{path}: no column '{name}' for {what}; columns: {list(df.columns)}")
    return lower[name.lower()]


class _HDF5Images:
    """An HDF5 image stack (the data readers' :class:`HDF5Images`) scaled by ``1/scale`` into [0, 1] tensors."""

    def __init__(self, path: str, dataset: str, scale: float) -> None:
        from medfoundry.data.readers.hdf5 import HDF5Images

        self.images = HDF5Images(path, dataset)
        self.scale = float(scale)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return array_to_chw(np.clip(self.images.read(i) / self.scale, 0.0, 1.0))


# ----------------------------------------------------------------------------------------------
# pair sources
# ----------------------------------------------------------------------------------------------


class PairSource:
    """Image-report pairs: ``texts[i]`` (already section-selected) and :meth:`load_image`."""

    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def load_image(self, i: int) -> Tensor:  # pragma: no cover - abstract
        """Image ``i`` as float32 (C, H, W) in [0, 1]."""
        raise NotImplementedError

    def describe(self, i: int) -> str:  # pragma: no cover - abstract
        """Where pair ``i`` comes from (for error messages)."""
        raise NotImplementedError


def _section_columns(df, sections: Sequence[str]) -> dict[str, str]:
    lower = {str(c).lower(): str(c) for c in df.columns}
    return {s.lower(): lower[s.lower()] for s in sections if s.lower() in lower}


def pair_columns_problem(columns: Sequence[str], cfg: ClipDataConfig, prefix: str = "clip.data") -> str | None:
    """What a pair table with these ``columns`` lacks for ``cfg``, or None: the image column (``kind: manifest``)
    and the report text (``text_column``, or a column per ``sections`` entry), matched case-insensitively.

    The pair readers raise with it, and the start-up path check (``methods/input_paths.py``) calls it on the
    table's header so a missing column is reported before anything is built; ``prefix`` names the config keys.
    """
    have = [str(c) for c in columns]
    lower = {c.lower() for c in have}
    if cfg.kind == "manifest" and cfg.image_column.lower() not in lower:
        return f"has no image column '{cfg.image_column}' (columns: {have}); set {prefix}.image_column"
    if cfg.text_column.lower() not in lower and not any(s.lower() in lower for s in cfg.sections):
        return (f"has no text column '{cfg.text_column}' (columns: {have}); set {prefix}.text_column "
                f"(or {prefix}.sections to columns it has)")
    return None


def _texts_from_table(df, cfg: ClipDataConfig, path) -> tuple[list[str | None], int]:
    problem = pair_columns_problem(list(df.columns), cfg)
    if problem:
        raise KeyError(f"{path}: {problem}")
    sec_cols = _section_columns(df, cfg.sections)
    lower = {str(c).lower(): str(c) for c in df.columns}
    text_col = lower.get(cfg.text_column.lower())
    reports = df[text_col].tolist() if text_col else [""] * len(df)
    sec_values = {s: df[c].tolist() for s, c in sec_cols.items()}
    texts = []
    for i, report in enumerate(reports):
        cols = {s: v[i] for s, v in sec_values.items()}
        texts.append(select_text(_clean(report) if text_col else "", cfg.sections, cols, cfg.section_fallback))
    return texts, sum(t is None for t in texts)


def _warn_dropped(n_dropped: int, n_total: int, cfg: ClipDataConfig, where: str) -> None:
    if not n_dropped:
        return
    why = (f"have no text for clip.data.sections={cfg.sections} (clip.data.section_fallback={cfg.section_fallback})"
           if cfg.sections else "are empty")
    warnings.warn(f"{where}: {n_dropped} of {n_total} reports {why}; those pairs were dropped",
                  ManifestWarning, stacklevel=3)


class ManifestPairs(PairSource):
    """Pairs from a CSV/Parquet manifest (image path column + report text or section columns)."""

    def __init__(self, cfg: ClipDataConfig) -> None:
        df = _read_table(cfg.manifest)
        texts, dropped = _texts_from_table(df, cfg, cfg.manifest)  # checks the image and text columns first
        img_col = _column(df, cfg.image_column, "image paths", cfg.manifest)
        root = Path(cfg.image_root) if cfg.image_root else Path(cfg.manifest).resolve().parent
        keep = [i for i, t in enumerate(texts) if t is not None]
        _warn_dropped(dropped, len(texts), cfg, cfg.manifest)
        if cfg.max_pairs > 0:
            keep = keep[: cfg.max_pairs]
        paths = df[img_col].tolist()
        self.paths = [str(root / str(paths[i])) if not Path(str(paths[i])).is_absolute() else str(paths[i])
                      for i in keep]
        self.texts = [texts[i] for i in keep]
        if not self.texts:
            raise ValueError(f"{cfg.manifest}: no usable image-report pairs")

    def load_image(self, i: int) -> Tensor:
        return read_image(self.paths[i])

    def describe(self, i: int) -> str:
        return self.paths[i]


class CheXzeroPairs(PairSource):
    """CheXzero's layout: HDF5 ``cxr`` (N, 320, 320) images + a CSV of report text in the same row order."""

    def __init__(self, cfg: ClipDataConfig) -> None:
        self.images = _HDF5Images(cfg.hdf5, cfg.hdf5_dataset, cfg.hdf5_scale)
        df = _read_table(cfg.manifest)
        if len(df) != len(self.images):
            raise ValueError(f"{cfg.manifest} has {len(df)} rows but {cfg.hdf5} holds {len(self.images)} images; "
                             "CheXzero's layout needs one CSV row per HDF5 image, in order")
        texts, dropped = _texts_from_table(df, cfg, cfg.manifest)
        _warn_dropped(dropped, len(texts), cfg, cfg.manifest)
        self.rows = [i for i, t in enumerate(texts) if t is not None]
        if cfg.max_pairs > 0:
            self.rows = self.rows[: cfg.max_pairs]
        self.texts = [texts[i] for i in self.rows]
        self.where = cfg.hdf5

    def load_image(self, i: int) -> Tensor:
        return self.images[self.rows[i]]

    def describe(self, i: int) -> str:
        return f"{self.where}[{self.rows[i]}]"


# ---- the offline demo ------------------------------------------------------------------------

_MODALITY_NAMES = {
    "CT": "computed tomography",
    "MR": "magnetic resonance",
    "CR": "radiograph",
    "DX": "radiograph",
    "US": "ultrasound",
    "NM": "nuclear medicine",
}


@dataclass
class DemoItem:
    """One demo frame: a real pydicom-data image and what its DICOM header says."""

    path: str
    modality: str  # e.g. "computed tomography"
    examination: str  # e.g. "magnetic resonance of the head"
    report: dict[str, str] = field(default_factory=dict)  # the unpaired IU report assigned to it


_DEMO_CACHE: dict[tuple[str, int, bool], list[DemoItem]] = {}


def demo_items(demo_dir: str | Path, seed: int = 0, with_reports: bool = True) -> list[DemoItem]:
    """Export pydicom-data's real frames to ``demo_dir/images`` and describe each from its header.

    With ``with_reports`` every frame also gets a real, **unpaired** IU chest X-ray report (seeded).
    Results are cached per process (training, evaluation and the CLI ask for the same items).
    """
    key = (str(Path(demo_dir).resolve()), int(seed), bool(with_reports))
    if key in _DEMO_CACHE and all(Path(it.path).is_file() for it in _DEMO_CACHE[key]):
        return [copy.deepcopy(it) for it in _DEMO_CACHE[key]]
    items = _demo_items(demo_dir, seed, with_reports)
    _DEMO_CACHE[key] = [copy.deepcopy(it) for it in items]
    return items


def _demo_items(demo_dir: str | Path, seed: int, with_reports: bool) -> list[DemoItem]:
    import pydicom

    from medfoundry.data.bundled import export_pydicom_samples, pydicom_sample_paths

    files = export_pydicom_samples(Path(demo_dir) / "images", max_side=160)
    headers = {p.stem: pydicom.dcmread(p, stop_before_pixels=True) for p in pydicom_sample_paths()}
    items = []
    for f in files:
        ds = headers[f.stem.rsplit("_", 1)[0]]
        modality = _MODALITY_NAMES.get(str(ds.get("Modality", "")), str(ds.get("Modality", "image")).lower())
        body = str(ds.get("BodyPartExamined", "") or "").strip().lower()
        if not body:
            study = str(ds.get("StudyDescription", "") or "").strip()
            body = study.lower() if study.isalpha() else ""
        exam = f"{modality} of the {body}" if body else modality
        items.append(DemoItem(str(f), modality, exam))
    if with_reports:
        reports = load_iu_reports(len(items), seed=seed)
        for item, rep in zip(items, reports):
            item.report = rep
    return items


class DemoPairs(PairSource):
    """Real pydicom-data frames with header-derived EXAMINATION lines + unpaired real IU reports."""

    def __init__(self, cfg: ClipDataConfig) -> None:
        self.items = demo_items(cfg.demo_dir, cfg.demo_seed)
        texts = []
        for it in self.items:
            report = (f"EXAMINATION: {it.examination}. FINDINGS: {it.report['findings']} "
                      f"IMPRESSION: {it.report['impression']}")
            texts.append(select_text(report, cfg.sections, None, cfg.section_fallback) or report)
        if cfg.max_pairs > 0:
            texts = texts[: cfg.max_pairs]
        self.texts = texts

    def load_image(self, i: int) -> Tensor:
        return read_image(self.items[i].path)

    def describe(self, i: int) -> str:
        return self.items[i].path


def build_pairs(cfg: ClipDataConfig) -> PairSource:
    """The pair source of ``clip.data``."""
    if cfg.kind == "manifest":
        if not cfg.manifest:
            raise ValueError("clip.data.kind=manifest needs clip.data.manifest (a CSV or Parquet file)")
        return ManifestPairs(cfg)
    if cfg.kind == "chexzero":
        if not (cfg.manifest and cfg.hdf5):
            raise ValueError("clip.data.kind=chexzero needs clip.data.hdf5 (images) and clip.data.manifest (CSV)")
        return CheXzeroPairs(cfg)
    if cfg.kind == "demo":
        return DemoPairs(cfg)
    raise ValueError(f"unknown clip.data.kind '{cfg.kind}'")


# ----------------------------------------------------------------------------------------------
# labelled images for zero-shot evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class LabelledImages:
    """An external labelled image set: binary findings and/or one multi-class label per image."""

    load_image: object  # callable i -> (C, H, W) in [0, 1]
    n: int
    findings: list[str] = field(default_factory=list)
    binary: np.ndarray | None = None  # (N, F): 1 positive, 0 negative, -1 unknown (ignored)
    class_names: list[str] = field(default_factory=list)
    classes: np.ndarray | None = None  # (N,) class index, -1 unknown

    def __len__(self) -> int:
        return self.n


def _binary_column(values) -> np.ndarray:
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=object)
    out = np.full(len(arr), -1, dtype=np.int64)
    for i, v in enumerate(arr):
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if f == 1.0:
            out[i] = 1
        elif f == 0.0:
            out[i] = 0
    return out


def _labels_from_table(df, cfg: ZeroShotConfig, path) -> dict:
    out: dict = {}
    if cfg.findings:
        cols = [_column(df, f, "a finding", path) for f in cfg.findings]
        out["findings"] = list(cfg.findings)
        out["binary"] = np.stack([_binary_column(df[c].tolist()) for c in cols], axis=1)
    if cfg.label_column:
        col = _column(df, cfg.label_column, "the class label", path)
        values = [_clean(v) for v in df[col].tolist()]
        names = list(cfg.class_names) or sorted({v for v in values if v})
        index = {n.lower(): i for i, n in enumerate(names)}
        out["class_names"] = names
        out["classes"] = np.asarray([index.get(v.lower(), -1) for v in values], dtype=np.int64)
    if not out:
        raise ValueError("clip.eval.zeroshot needs findings (binary prompt pairs) and/or label_column (classes)")
    return out


def build_labelled_images(cfg: ZeroShotConfig, demo_dir: str = ".cache/clip_demo") -> LabelledImages:
    """The zero-shot evaluation set of ``clip.eval.zeroshot``.

    ``demo``: the demo frames labelled by their DICOM modality (multi-class over the modality names,
    and one binary finding per modality name for the prompt-pair path); a pipeline check only.
    """
    if cfg.kind == "manifest":
        df = _read_table(cfg.labels)
        img_col = _column(df, cfg.image_column, "image paths", cfg.labels)
        root = Path(cfg.image_root) if cfg.image_root else Path(cfg.labels).resolve().parent
        paths = [p if Path(str(p)).is_absolute() else str(root / str(p)) for p in df[img_col].tolist()]
        labels = _labels_from_table(df, cfg, cfg.labels)
        n = len(paths)

        def load(i: int, _paths=paths) -> Tensor:
            return read_image(_paths[i])
    elif cfg.kind == "hdf5":
        images = _HDF5Images(cfg.hdf5, cfg.hdf5_dataset, cfg.hdf5_scale)
        df = _read_table(cfg.labels)
        if len(df) != len(images):
            raise ValueError(f"{cfg.labels} has {len(df)} rows but {cfg.hdf5} holds {len(images)} images")
        labels = _labels_from_table(df, cfg, cfg.labels)
        n = len(images)
        load = images.__getitem__
    elif cfg.kind == "demo":
        items = demo_items(demo_dir, with_reports=False)
        names = list(cfg.class_names) or sorted({it.modality for it in items})
        index = {name: i for i, name in enumerate(names)}
        classes = np.asarray([index.get(it.modality, -1) for it in items], dtype=np.int64)
        findings = list(cfg.findings) or names
        binary = np.stack([[1 if it.modality == f else 0 for it in items] for f in findings], axis=1)
        labels = {"findings": findings, "binary": binary, "class_names": names, "classes": classes}
        n = len(items)

        def load(i: int, _items=items) -> Tensor:
            return read_image(_items[i].path)
    else:
        raise ValueError(f"clip.eval.zeroshot.kind='{cfg.kind}' has no images")
    if cfg.max_images > 0 and cfg.max_images < n:
        n = cfg.max_images
        for key in ("binary", "classes"):
            if key in labels:
                labels[key] = labels[key][:n]
    return LabelledImages(load, n, **labels)
