"""Whole-slide images: tiles of a fixed physical size (microns per pixel) whatever the scanner.

Two backends behind one :class:`Slide`:

* ``openslide`` (``pip install openslide-python openslide-bin``) for vendor formats it knows (Aperio
  SVS, Hamamatsu NDPI, MIRAX, Leica SCN, ...), used when installed;
* ``tifffile`` for pyramidal TIFFs (levels as SubIFDs or as separate tiled pages) and as the fallback
  for SVS when openslide is missing. It reads only the tiles a region touches.

Coordinates: ``x, y`` are level-0 pixels of the top-left corner (OpenSlide's convention).
:meth:`Slide.read_tile` picks the coarsest pyramid level that is at least as fine as the requested
microns per pixel ("the next finer level") and resizes from it, so a 224-pixel tile at 0.5 µm/px
covers 112 µm x 112 µm on a 0.25 µm/px (40x) scan as on a 0.5 µm/px (20x) one. Microns per pixel of
level 0 come from the slide's metadata (OpenSlide's ``openslide.mpp-x``, Aperio's ``MPP =``, OME
``PhysicalSizeX`` or the TIFF resolution tags in inch/centimetre units); a slide without it needs
``mpp=`` (``data.slide_mpp``).

Tissue detection: Otsu's threshold on the grey levels of a thumbnail separates tissue (darker) from
the bright glass; :meth:`Slide.tile_grid` keeps tiles whose tissue fraction reaches ``min_tissue``.
"""

from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.data.readers.base import ReaderError
from medfoundry.data.readers.interface import Reader

VENDOR_SUFFIXES = (".svs", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff")
WSI_SUFFIXES = VENDOR_SUFFIXES + TIFF_SUFFIXES


def openslide_available() -> bool:
    """True when ``import openslide`` works (the Python binding and its shared library)."""
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of 8-bit-range values: maximises the between-class variance."""
    values = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 256.0))
    centers = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * centers)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] >= 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


class _TiffBackend:
    """Pyramidal TIFF via tifffile; decodes only the tiles a region touches."""

    name = "tifffile"

    def __init__(self, path: str) -> None:
        import tifffile

        self.path = path
        self._lock = threading.Lock()
        self._pid = os.getpid()
        try:
            self._tf = tifffile.TiffFile(path)
            self.pages = self._find_levels(self._tf)
        except ReaderError:
            raise
        except Exception as err:
            raise ReaderError(f"{path}: unreadable slide ({type(err).__name__}: {err})") from err
        self.level_dimensions = [(int(p.imagewidth), int(p.imagelength)) for p in self.pages]
        self.mpp = tiff_mpp(self._tf)
        self._full_cache: dict[int, np.ndarray] = {}

    @staticmethod
    def _find_levels(tf) -> list:
        if not tf.series:
            raise ReaderError(f"{tf.filehandle.path}: unreadable slide (the TIFF holds no image)")
        base = tf.series[0]
        pages = [lvl.keyframe for lvl in base.levels]
        first = pages[0]
        if len(first.shape) not in (2, 3) or first.imagewidth < 1 or first.imagelength < 1:
            raise ReaderError(f"{tf.filehandle.path}: wrong dimensions {first.shape} for a slide")
        seen = {id(p) for p in pages}
        aspect = first.imagewidth / first.imagelength
        for page in tf.pages:  # pyramids written as separate tiled pages that tifffile did not group
            if id(page) in seen or not getattr(page, "is_tiled", False):
                continue
            if page.samplesperpixel != first.samplesperpixel or page.imagewidth >= first.imagewidth:
                continue
            if abs(page.imagewidth / page.imagelength - aspect) / aspect < 0.02:
                pages.append(page)
        return sorted(pages, key=lambda p: -int(p.imagewidth))

    def _reopen(self) -> None:
        if self._pid != os.getpid():  # a forked worker must not share the parent's file position
            import tifffile

            self._tf = tifffile.TiffFile(self.path)
            self.pages = self._find_levels(self._tf)
            self._pid = os.getpid()
            self._lock = threading.Lock()

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-``level`` pixels [y, y+h) x [x, x+w) as uint8 RGB; outside the image is white."""
        self._reopen()
        page = self.pages[level]
        width, height = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x0 >= x1 or y0 >= y1:
            return out
        if page.is_tiled and page.planarconfig != 2 and len(page.dataoffsets) > 1:
            self._read_tiles(page, out, x, y, x0, y0, x1, y1)
        else:
            full = self._full(level)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = full[y0:y1, x0:x1]
        return out

    def _full(self, level: int) -> np.ndarray:
        if level not in self._full_cache:
            with self._lock:
                self._full_cache[level] = _to_rgb(self.pages[level].asarray())
        return self._full_cache[level]

    def _read_tiles(self, page, out: np.ndarray, x: int, y: int, x0: int, y0: int, x1: int, y1: int) -> None:
        tw, tl = int(page.tilewidth), int(page.tilelength)
        across = math.ceil(page.imagewidth / tw)
        fh = self._tf.filehandle
        for ty in range(y0 // tl, (y1 - 1) // tl + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * across + tx
                with self._lock:
                    fh.seek(page.dataoffsets[index])
                    data = fh.read(page.databytecounts[index])
                if not data:  # sparse tile: background
                    continue
                segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
                tile = _to_rgb(np.asarray(segment).reshape(tl, tw, -1))
                gx0, gy0 = tx * tw, ty * tl
                sx0, sy0 = max(x0, gx0), max(y0, gy0)
                sx1, sy1 = min(x1, gx0 + tw), min(y1, gy0 + tl)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0]

    def close(self) -> None:
        if self._pid == os.getpid():
            self._tf.close()


class _OpenSlideBackend:
    """OpenSlide (vendor formats)."""

    name = "openslide"

    def __init__(self, path: str) -> None:
        import openslide

        self.path = path
        try:
            self._slide = openslide.OpenSlide(path)
        except Exception as err:
            raise ReaderError(f"{path}: unreadable slide ({type(err).__name__}: {err})") from err
        self.level_dimensions = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
        self._downsamples = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        try:
            mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
            self.mpp = (mx, my) if mx > 0 and my > 0 else None
        except (KeyError, ValueError):
            self.mpp = None

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._downsamples[level]
        rgba = np.asarray(self._slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h)))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


def tiff_mpp(tf) -> tuple[float, float] | None:
    """Level-0 microns per pixel (x, y) from Aperio, OME or TIFF resolution metadata, or None."""
    page = tf.pages[0]
    desc = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
    if match:
        mpp = float(match.group(1))
        return (mpp, mpp) if mpp > 0 else None
    if getattr(tf, "is_ome", False) and tf.ome_metadata:
        mx = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
        my = re.search(r'PhysicalSizeY="([0-9.eE+-]+)"', tf.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
        if mx:
            scale = {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit.group(1) if unit else "µm", 1.0)
            x = float(mx.group(1)) * scale
            y = float(my.group(1)) * scale if my else x
            return (x, y)
    try:
        unit = int(page.resolutionunit)
        xres, yres = page.resolution
    except (TypeError, ValueError, AttributeError):
        return None
    per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre -> microns
    if per_unit is None or xres <= 0 or yres <= 0:
        return None
    return (per_unit / xres, per_unit / yres)


class Slide:
    """A whole-slide image read through openslide or tifffile.

    Args:
        path: slide file.
        backend: ``auto`` (openslide for vendor formats when installed, else tifffile), ``openslide`` or
            ``tifffile``.
        mpp: level-0 microns per pixel, overriding (or standing in for missing) metadata.
    """

    def __init__(self, path: str | Path, backend: str = "auto", mpp: float | None = None) -> None:
        self.path = str(path)
        if not Path(self.path).is_file():
            raise ReaderError(f"{self.path}: no such slide file")
        if backend == "auto":
            vendor = Path(self.path).suffix.lower() in VENDOR_SUFFIXES
            backend = "openslide" if vendor and openslide_available() else "tifffile"
        if backend == "openslide":
            if not openslide_available():
                raise ReaderError(
                    f"{self.path}: backend 'openslide' needs: pip install openslide-python openslide-bin"
                )
            self._backend = _OpenSlideBackend(self.path)
        elif backend == "tifffile":
            self._backend = _TiffBackend(self.path)
        else:
            raise ValueError(f"unknown slide backend '{backend}' (auto, openslide, tifffile)")
        self.backend = self._backend.name
        self.level_dimensions: list[tuple[int, int]] = list(self._backend.level_dimensions)
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = [(w0 / w + h0 / h) / 2 for w, h in self.level_dimensions]
        found = self._backend.mpp
        if found is None and backend == "openslide" and Path(self.path).suffix.lower() in (".tif", ".tiff", ".svs"):
            import tifffile

            with tifffile.TiffFile(self.path) as tf:
                found = tiff_mpp(tf)
        if mpp is not None:
            self.mpp = float(mpp)
        elif found is not None:
            self.mpp = float(sum(found) / 2)
        else:
            raise ReaderError(
                f"{self.path}: no microns-per-pixel metadata (Aperio MPP, OME PhysicalSize or TIFF "
                "resolution in inch/cm); give it with mpp= (config: data.slide_mpp)"
            )

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of ``level``."""
        return self.mpp * self.level_downsamples[level]

    def level_for_mpp(self, mpp: float) -> int:
        """The coarsest level at least as fine as ``mpp`` (level 0 when ``mpp`` is finer than the scan)."""
        fine_enough = [lvl for lvl in range(self.level_count) if self.level_mpp(lvl) <= mpp * (1 + 1e-3)]
        return max(fine_enough, key=self.level_mpp, default=0)

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels of ``level`` (its own coordinates) as uint8 (h, w, 3)."""
        return self._backend.read_region(level, int(x), int(y), int(w), int(h))

    def read_tile(self, x: float, y: float, size_px: int, mpp: float) -> np.ndarray:
        """A ``size_px`` square uint8 RGB tile at ``mpp`` µm/px whose top-left is level-0 pixel (x, y).

        It covers ``size_px * mpp`` microns on each side, read from :meth:`level_for_mpp` and resized
        (bilinear, antialiased) when that level's resolution differs from ``mpp``.
        """
        from PIL import Image

        level = self.level_for_mpp(mpp)
        ds = self.level_downsamples[level]
        extent = size_px * mpp / self.mpp / ds  # tile side in level pixels
        lx, ly = x / ds, y / ds
        if abs(extent - size_px) < 1e-6 and abs(lx - round(lx)) < 1e-6 and abs(ly - round(ly)) < 1e-6:
            return self.read_region(level, round(lx), round(ly), size_px, size_px)
        x0, y0 = math.floor(lx), math.floor(ly)
        x1, y1 = math.ceil(lx + extent), math.ceil(ly + extent)
        region = self.read_region(level, x0, y0, x1 - x0, y1 - y0)
        box = (lx - x0, ly - y0, lx - x0 + extent, ly - y0 + extent)
        img = Image.fromarray(region).resize((size_px, size_px), Image.Resampling.BILINEAR, box=box)
        return np.asarray(img)

    def read_tile_um(self, x_um: float, y_um: float, size_px: int, mpp: float) -> np.ndarray:
        """:meth:`read_tile` with the top-left corner given in microns from the slide's origin."""
        return self.read_tile(x_um / self.mpp, y_um / self.mpp, size_px, mpp)

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """(uint8 RGB thumbnail whose longer side is at most ``max_side``, level-0 pixels per thumbnail pixel)."""
        from PIL import Image

        w0, h0 = self.dimensions
        target = min(max_side, max(w0, h0))
        level = 0
        for lvl, (w, h) in enumerate(self.level_dimensions):
            if max(w, h) >= target and max(w, h) < max(self.level_dimensions[level]):
                level = lvl
        w, h = self.level_dimensions[level]
        img = self.read_region(level, 0, 0, w, h)
        scale = target / max(w, h)
        if scale < 1:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))
        return img, w0 / img.shape[1]

    def tissue_mask(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """(boolean tissue mask of the thumbnail by Otsu on grey levels, level-0 pixels per mask pixel)."""
        thumb, scale = self.thumbnail(max_side)
        grey = thumb.astype(np.float32).mean(axis=-1)
        threshold = otsu_threshold(grey)
        return grey < threshold, scale

    def tile_grid(
        self, size_px: int, mpp: float, min_tissue: float = 0.25, max_side: int = 1024
    ) -> np.ndarray:
        """Level-0 (x, y) of the non-overlapping ``size_px`` tiles at ``mpp`` that hold enough tissue.

        ``min_tissue`` is the smallest tissue fraction (on the Otsu thumbnail mask) a tile must have;
        0 keeps every tile. Returns int64 (N, 2), row-major order.
        """
        extent0 = size_px * mpp / self.mpp
        w0, h0 = self.dimensions
        nx, ny = int(w0 // extent0), int(h0 // extent0)
        if nx < 1 or ny < 1:
            return np.zeros((0, 2), dtype=np.int64)
        xs = np.arange(nx) * extent0
        ys = np.arange(ny) * extent0
        if min_tissue <= 0:
            gx, gy = np.meshgrid(xs, ys)
            return np.stack([gx.ravel(), gy.ravel()], axis=1).round().astype(np.int64)
        mask, scale = self.tissue_mask(max_side)
        integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        mh, mw = mask.shape
        keep = []
        for y in ys:
            r0 = min(int(y / scale), mh - 1)
            r1 = min(max(int(math.ceil((y + extent0) / scale)), r0 + 1), mh)
            for x in xs:
                c0 = min(int(x / scale), mw - 1)
                c1 = min(max(int(math.ceil((x + extent0) / scale)), c0 + 1), mw)
                area = (r1 - r0) * (c1 - c0)
                tissue = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
                if tissue / area >= min_tissue:
                    keep.append((round(x), round(y)))
        return np.asarray(keep, dtype=np.int64).reshape(-1, 2)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_slide(path: str | Path, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a whole-slide image (see :class:`Slide`)."""
    return Slide(path, backend=backend, mpp=mpp)


def is_pyramidal_tiff(path: str | Path) -> bool:
    """True for a TIFF that looks like a whole-slide image rather than a single picture or CT slice.

    That is SVS/NDPI/SCN, or a tiled TIFF with several resolution levels, or a tiled RGB TIFF with
    micron resolution metadata.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if tf.is_svs or tf.is_ndpi or getattr(tf, "is_scn", False):
                return True
            page = tf.pages[0]
            if not page.is_tiled:
                return False
            if len(_TiffBackend._find_levels(tf)) > 1:
                return True
            return page.samplesperpixel >= 3 and tiff_mpp(tf) is not None
    except Exception:
        return False


class SlideReader(Reader):
    """Whole-slide images: vendor formats by suffix, TIFFs only when tiled and pyramidal (else they are slices)."""

    name = "slide"
    label = "whole-slide image"
    kind = "slide"
    returns = Slide
    suffixes = WSI_SUFFIXES

    def can_read(self, path: str | Path) -> bool:
        path = Path(path)
        if path.is_dir():
            return False
        suffix = path.suffix.lower()
        if suffix in TIFF_SUFFIXES:
            return is_pyramidal_tiff(path)
        return suffix in VENDOR_SUFFIXES

    def read(self, path: str | Path, backend: str = "auto", mpp: float | None = None, **options: Any) -> Slide:
        return open_slide(path, backend=backend, mpp=mpp)


SLIDE_READER = SlideReader()
