"""Real medical data that installable packages ship, fetched into a cache on first use (never into the repo).

The pyradiomics 3.0.1 test cases (its source archive through ``pip download``), and missing Python packages
installed through pip (nilearn for the MNI152 template). Used by the quality benchmark
(:mod:`medfoundry_cli.bench.quality_data`) and the demo; both say what they fetch before they fetch it.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
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


def _say(message: str) -> None:
    print(f"[fetch] {message}", flush=True)


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
    _say(f"installing {package} (needed to read the demo data) ...")
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
        _say(f"downloading the pyradiomics {PYRADIOMICS_VERSION} source archive from PyPI (34 MB) ...")
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


def scale_intensity(arr: np.ndarray, modality: str) -> np.ndarray:
    """CT through the lung window :data:`CT_WINDOW`, MR through its 0.5-99.5 percentiles, to [0, 1]."""
    if modality == "CT":
        lo, hi = CT_WINDOW
    else:
        lo, hi = np.percentile(arr, [0.5, 99.5])
    return np.clip((arr - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Pad a 2-D image to a square (centred) and resize it to ``size`` x ``size`` (antialiased bilinear)."""
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
