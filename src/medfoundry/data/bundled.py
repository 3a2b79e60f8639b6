"""Real medical images that installable packages ship (no hub access needed).

``pydicom-data`` (MIT) bundles real DICOM files: CT, MR, chest and extremity radiographs (CR),
ultrasound and nuclear medicine. :func:`export_pydicom_samples` writes one 16-bit PNG per frame, its value
mapping recorded, so the image-folder source can train on them; it is what ``make demo`` uses before the full demo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Real clinical images from pydicom-data, by explicit name (a wildcard lookup would try to download).
PYDICOM_SAMPLES = (
    "693_UNCI.dcm",  # CT 512x512
    "eCT_Supplemental.dcm",  # CT, 2 frames
    "MR2_UNCI.dcm",  # MR 1024x1024
    "MR-SIEMENS-DICOM-WithOverlays.dcm",  # abdominal MR
    "emri_small.dcm",  # head MR, 10 frames
    "RG1_UNCI.dcm",  # adult PA chest radiograph
    "RG3_UNCI.dcm",  # extremity radiograph
    "US1_UNCI.dcm",  # ultrasound
    "JPEG2000_UNC.dcm",  # whole-body nuclear medicine
)


def pydicom_sample_paths() -> list[Path]:
    """Paths of :data:`PYDICOM_SAMPLES` inside the installed pydicom-data package."""
    try:
        import data_store  # the import name of the pydicom-data package
    except ImportError as err:
        raise ImportError("the real sample images need `pip install pydicom-data`") from err
    root = Path(data_store.__file__).parent / "data"
    paths = [root / name for name in PYDICOM_SAMPLES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"pydicom-data at {root} lacks {missing}; reinstall pydicom-data")
    return paths


def export_pydicom_samples(out_dir: str | Path, max_side: int = 256) -> list[Path]:
    """Write each frame of the bundled DICOM samples as a 16-bit grey PNG (percentile-scaled per frame to [0, 1]).

    Each PNG records its value mapping (:data:`~medfoundry.data.readers.slices.FULL_RANGE_UINT16`: value =
    stored / 65535), so readers that refuse unmapped 16-bit pictures take them. Frames are downsized so the
    longer side is at most ``max_side`` to keep CPU demos fast. Existing files are kept (idempotent); one
    written before mappings were recorded gets the mapping added, its pixels unchanged.
    """
    import pydicom
    from PIL import Image

    from medfoundry.data.readers.slices import FULL_RANGE_UINT16, read_stored

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in pydicom_sample_paths():
        ds = pydicom.dcmread(path)
        frames = ds.pixel_array
        n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if n_frames == 1:
            frames = frames[None]
        for i, frame in enumerate(frames):
            target = out / f"{path.stem}_{i:03d}.png"
            written.append(target)
            if target.exists():
                stored, mapping = read_stored(target)
                if mapping is None:  # exported before mappings were recorded: same pixels, mapping added
                    _replace(target, stored, FULL_RANGE_UINT16)
                continue
            if frame.ndim == 3:  # colour ultrasound etc.: luminance
                frame = frame[..., :3].mean(axis=-1)
            f = frame.astype(np.float64)
            lo, hi = np.percentile(f, 0.5), np.percentile(f, 99.5)
            scaled = np.clip((f - lo) / max(hi - lo, 1e-6), 0, 1)
            img = Image.fromarray((scaled * 65535).astype(np.uint16))
            scale = max_side / max(img.size)
            if scale < 1:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                 Image.BILINEAR)
            _replace(target, np.asarray(img), FULL_RANGE_UINT16)
    return written


def _replace(target: Path, stored: np.ndarray, mapping) -> None:
    """Write ``stored`` with ``mapping`` recorded to a temporary file, then rename it to ``target``."""
    from medfoundry.data.readers.slices import write_stored

    tmp = target.with_suffix(".tmp.png")
    write_stored(tmp, stored, mapping)
    tmp.replace(target)
