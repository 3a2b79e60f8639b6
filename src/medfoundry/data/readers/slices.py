"""8/16-bit PNG and TIFF slices with an explicit, recorded mapping between stored values and units (HU).

Convention (the DICOM modality LUT's): ``value = stored * slope + intercept``. The mapping is written
*into the file* by :func:`write_slice` (a PNG text chunk or the TIFF ImageDescription, both holding
JSON under the key ``medfoundry.value_mapping``) or kept in a JSON sidecar ``<file>.json``, and
:func:`read_slice` applies the recorded mapping. A mapping given by the caller (e.g. from the config)
that disagrees with the recorded one is an error, never silently preferred: storing HU one way and
reading them back another (stored ``HU + 32768``, read as ``(x - 32768) * 0.1``) turns air at
-1000 HU into -100 HU without any visible failure.

Common mappings: :data:`HU_UINT16` (stored = HU + 32768, lossless for integer HU),
:data:`HU_INT16` (stored = HU) and :data:`FULL_RANGE_UINT16` / :data:`FULL_RANGE_UINT8` (a [0, 1] picture spread
over the type's full range: value = stored / 65535 or / 255, computed as exactly that division).

A picture of more than 8 bits per sample with no recorded mapping is refused (:class:`UnmappedImageError`)
unless the caller supplies a mapping or opts in to the full-range reading (``unmapped_16bit="full_range"``,
``data.unmapped_16bit``): the stored integers could be HU + 1024, HU + 32768, raw detector counts or a
[0, 1] picture, and dividing them by 65535 regardless turns a CT slice into a near-black image.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.data.readers.base import ReaderError, Volume
from medfoundry.data.readers.interface import Reader
from medfoundry.data.readers.wsi import TIFF_SUFFIXES, is_pyramidal_tiff

MAPPING_KEY = "medfoundry.value_mapping"
SLICE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


UNMAPPED_CHOICES = ("refuse", "full_range")  # what to do with >8-bit pictures without a recorded mapping


class MappingMismatchError(ReaderError):
    """A configured value mapping contradicts the one recorded with the file."""


class UnmappedImageError(ReaderError):
    """A picture of more than 8 bits per sample with no recorded or configured value mapping."""


@dataclass(frozen=True)
class ValueMapping:
    """``value = stored * slope + intercept`` (in ``units``)."""

    slope: float = 1.0
    intercept: float = 0.0
    units: str = "HU"

    def to_units(self, stored: np.ndarray) -> np.ndarray:
        """Stored integers -> float32 values in :attr:`units`.

        A full-range mapping (:meth:`full_range_divisor`) is computed as ``stored / n`` in float32, bit for bit
        what reading an 8/16-bit picture by its storage type has always given.
        """
        divisor = self.full_range_divisor()
        if divisor is not None:
            return stored.astype(np.float32) / float(divisor)
        return stored.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)

    def full_range_divisor(self) -> int | None:
        """``n`` when this mapping is ``value = stored / n`` with ``n`` = 255 or 65535 (a [0, 1] picture), else None."""
        if self.intercept != 0.0 or not self.slope > 0:
            return None
        n = round(1.0 / self.slope)
        if n in (255, 65535) and math.isclose(self.slope * n, 1.0, rel_tol=1e-9):
            return n
        return None

    def to_stored(self, values: np.ndarray, dtype: str | np.dtype, clip: bool = False) -> np.ndarray:
        """Values -> stored integers of ``dtype``; out-of-range values raise unless ``clip``."""
        dtype = np.dtype(dtype)
        stored = np.rint((np.asarray(values, dtype=np.float64) - self.intercept) / self.slope)
        info = np.iinfo(dtype)
        if not clip and stored.size and (stored.min() < info.min or stored.max() > info.max):
            lo, hi = float(np.min(values)), float(np.max(values))
            raise ValueError(
                f"values {lo:g}..{hi:g} {self.units} do not fit {dtype} with slope={self.slope:g}, "
                f"intercept={self.intercept:g}; choose another mapping or pass clip=True"
            )
        return np.clip(stored, info.min, info.max).astype(dtype)

    def same_as(self, other: ValueMapping) -> bool:
        """Equal slope and intercept (relative tolerance 1e-6)."""
        return math.isclose(self.slope, other.slope, rel_tol=1e-6) and math.isclose(
            self.intercept, other.intercept, rel_tol=1e-6, abs_tol=1e-6
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_dict(data: dict) -> ValueMapping:
        return ValueMapping(float(data["slope"]), float(data["intercept"]), str(data.get("units", "HU")))


HU_UINT16 = ValueMapping(1.0, -32768.0, "HU")  # stored = HU + 32768
HU_INT16 = ValueMapping(1.0, 0.0, "HU")  # stored = HU
FULL_RANGE_UINT16 = ValueMapping(1.0 / 65535.0, 0.0, "unit")  # a [0, 1] picture stored as round(value * 65535)
FULL_RANGE_UINT8 = ValueMapping(1.0 / 255.0, 0.0, "unit")  # a [0, 1] picture stored as round(value * 255)


def window_mapping(center: float, width: float, dtype: str = "uint8") -> ValueMapping:
    """Mapping that spreads the HU window [center - width/2, center + width/2] over ``dtype``'s range."""
    info = np.iinfo(np.dtype(dtype))
    slope = width / float(info.max - info.min)
    return ValueMapping(slope, center - width / 2 - info.min * slope, "HU")


def sidecar_path(path: str | Path) -> Path:
    """``<file>.json`` next to the image, where a mapping can be kept for files that cannot hold one."""
    return Path(str(path) + ".json")


def write_slice(
    path: str | Path,
    values: np.ndarray,
    mapping: ValueMapping = HU_UINT16,
    dtype: str = "uint16",
    sidecar: bool = False,
    clip: bool = False,
) -> None:
    """Write a 2-D array of values (e.g. HU) as a PNG/TIFF of ``dtype`` with the mapping recorded in it."""
    path = Path(path)
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"{path}: write_slice takes a 2-D array, got shape {values.shape}")
    write_stored(path, mapping.to_stored(values, dtype, clip=clip), mapping, sidecar=sidecar)


def write_stored(path: str | Path, stored: np.ndarray, mapping: ValueMapping, sidecar: bool = False) -> None:
    """Write integers that are already stored values (2-D grey or (H, W, 3) RGB) as a PNG/TIFF, recording ``mapping``.

    For writers that quantise themselves, e.g. ``(picture * 65535).round().astype(np.uint16)`` with
    :data:`FULL_RANGE_UINT16`: the pixels written are exactly ``stored``, and readers apply ``mapping``.
    """
    path = Path(path)
    stored = np.asarray(stored)
    if not np.issubdtype(stored.dtype, np.integer):
        raise ValueError(f"{path}: write_stored takes integer stored values, got {stored.dtype}")
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image, PngImagePlugin

        if stored.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"{path}: PNG holds uint8 or uint16, not {stored.dtype}")
        info = PngImagePlugin.PngInfo()
        info.add_text(MAPPING_KEY, mapping.to_json())
        Image.fromarray(stored).save(path, pnginfo=info)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, stored, description=json.dumps({MAPPING_KEY: asdict(mapping)}), metadata=None)
    else:
        raise ValueError(f"{path}: write_slice/write_stored write .png or .tif(f), not '{suffix}'")
    if sidecar:
        sidecar_path(path).write_text(json.dumps({MAPPING_KEY: asdict(mapping)}))


def parse_mapping(description: str | None) -> ValueMapping | None:
    """The mapping in a PNG text value / TIFF description / sidecar text (JSON), or None."""
    if not description:
        return None
    try:
        data = json.loads(description)
    except ValueError:
        return None
    if isinstance(data, dict) and MAPPING_KEY in data:
        data = data[MAPPING_KEY]
    if isinstance(data, dict) and "slope" in data and "intercept" in data:
        return ValueMapping.from_dict(data)
    return None


def read_stored(path: str | Path) -> tuple[np.ndarray, ValueMapping | None]:
    """(stored pixel array, recorded mapping or None) of a PNG/TIFF/JPEG: from the file, else its sidecar."""
    path = Path(path)
    stored, embedded = _load_pixels(path)
    return stored, embedded or sidecar_mapping(path)


def _load_pixels(path: Path) -> tuple[np.ndarray, ValueMapping | None]:
    """Stored array and the mapping embedded in the file (if any)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                return page.asarray(), parse_mapping(page.description)
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            text = getattr(im, "text", {}) or {}
            arr = np.asarray(im)
            return arr, parse_mapping(text.get(MAPPING_KEY))
    except FileNotFoundError as err:
        raise ReaderError(f"{path}: no such file") from err
    except Exception as err:  # PIL/tifffile raise many types on truncated or corrupt files
        raise ReaderError(f"{path}: corrupt or truncated image ({type(err).__name__}: {err})") from err


def read_mapping(path: str | Path) -> ValueMapping | None:
    """The mapping recorded in the file or its JSON sidecar, or None."""
    return read_stored(path)[1]


def sidecar_mapping(path: str | Path) -> ValueMapping | None:
    """The mapping kept in ``<file>.json``, or None."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        return parse_mapping(side.read_text())
    except OSError:
        return None


def scale_by_dtype(arr: np.ndarray, where: str = "") -> np.ndarray:
    """Map integer storage to [0, 1] by the type's range; floats are returned as they are.

    Only for data whose meaning is known to be "a picture over the type's full range" (8-bit pictures,
    ``unmapped_16bit="full_range"``); wider integers without a mapping go through :func:`plain_picture_values`.
    """
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype in (np.int16, np.int32, np.uint32):
        info = np.iinfo(arr.dtype)
        return (arr.astype(np.float32) - info.min) / float(info.max - info.min)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    raise ValueError(f"{where}: unsupported pixel type {arr.dtype}")


def unmapped_message(path: str | Path, dtype: np.dtype, config_keys: bool = True) -> str:
    """The one-line refusal of a >8-bit picture without a value mapping: the file, why, and every fix."""
    bits = np.dtype(dtype).itemsize * 8
    keys = ("set data.slice_slope and data.slice_intercept (value = stored * slope + intercept, e.g. 1 and -1024 "
            "for HU + 1024), or set data.unmapped_16bit=full_range if the file stores a [0, 1] picture scaled to "
            "the type's full range (0..65535); or " if config_keys else "")
    return (f"{path}: {bits}-bit pixels ({np.dtype(dtype)}) with no recorded value mapping, so what the stored "
            f"numbers mean is unknown (dividing HU + 1024 by 65535 would give a near-black picture); {keys}record "
            f"the mapping with the file: medfoundry.data.readers.slices.write_stored/write_slice, or a sidecar "
            f"{sidecar_path(path).name} holding {{\"{MAPPING_KEY}\": {{\"slope\": ..., \"intercept\": ..., "
            f"\"units\": ...}}}}")


def plain_picture_values(stored: np.ndarray, path: str | Path, unmapped_16bit: str = "refuse",
                         config_keys: bool = True) -> np.ndarray:
    """A picture without any value mapping -> float32: 8-bit / 255, floats and booleans as they are; wider integers
    only with ``unmapped_16bit="full_range"`` (by the type's range), else :class:`UnmappedImageError`."""
    if unmapped_16bit not in UNMAPPED_CHOICES:
        raise ValueError(f"data.unmapped_16bit={unmapped_16bit!r}: choose one of {list(UNMAPPED_CHOICES)}")
    wide_int = np.issubdtype(stored.dtype, np.integer) and stored.dtype.itemsize > 1
    if wide_int and unmapped_16bit != "full_range":
        raise UnmappedImageError(unmapped_message(path, stored.dtype, config_keys))
    return scale_by_dtype(stored, str(path))


def apply_mapping(
    stored: np.ndarray,
    path: str | Path,
    recorded: ValueMapping | None,
    configured: ValueMapping | None = None,
    unmapped_16bit: str = "refuse",
    require_mapping: bool = False,
    config_keys: bool = True,
) -> tuple[np.ndarray, ValueMapping | None]:
    """(values, mapping used) of stored pixels: the recorded mapping, else the configured one, else a plain picture.

    A configured mapping that contradicts the recorded one raises :class:`MappingMismatchError`. Without either,
    ``require_mapping`` refuses every file, otherwise :func:`plain_picture_values` decides (8-bit pictures /255,
    wider integers refused unless ``unmapped_16bit="full_range"``).
    """
    if recorded is not None and configured is not None and not recorded.same_as(configured):
        raise MappingMismatchError(
            f"{path}: configured value mapping (slope={configured.slope:g}, intercept={configured.intercept:g}) "
            f"contradicts the one recorded with the file (slope={recorded.slope:g}, "
            f"intercept={recorded.intercept:g}); remove data.slice_slope/data.slice_intercept "
            "or fix the file's mapping"
        )
    used = recorded or configured
    if used is None:
        if require_mapping:
            raise ReaderError(
                f"{path}: no value mapping recorded (PNG text chunk, TIFF description or {sidecar_path(path).name}); "
                "set data.slice_slope and data.slice_intercept (value = stored * slope + intercept), "
                "e.g. slope 1, intercept -32768 for PNGs that store HU + 32768"
            )
        return plain_picture_values(stored, path, unmapped_16bit, config_keys), None
    if not np.issubdtype(stored.dtype, np.integer):
        raise ReaderError(f"{path}: a value mapping needs integer pixels, got {stored.dtype}")
    return used.to_units(stored), used


def read_slice(
    path: str | Path, mapping: ValueMapping | None = None, require_mapping: bool = True,
    unmapped_16bit: str = "refuse",
) -> tuple[np.ndarray, ValueMapping | None]:
    """(values float32 (H, W) or (H, W, C), mapping used) of a PNG/TIFF/JPEG slice.

    The recorded mapping wins; ``mapping`` is used for files without one, and a ``mapping`` that
    contradicts the recorded one raises :class:`MappingMismatchError`. With neither, the file is
    refused when ``require_mapping`` (the default), else it is read as a plain picture (8-bit / 255;
    16-bit only with ``unmapped_16bit="full_range"``, see :func:`plain_picture_values`) and the
    mapping returned is None.
    """
    path = Path(path)
    stored, recorded = read_stored(path)
    if stored.ndim not in (2, 3) or min(stored.shape[:2]) < 1:
        raise ReaderError(f"{path}: wrong dimensions {stored.shape}; expected a 2-D image")
    return apply_mapping(stored, path, recorded, mapping, unmapped_16bit, require_mapping)


def read_slice_volume(path: str | Path, mapping: ValueMapping | None = None) -> Volume:
    """A slice file as a one-slice :class:`Volume` (Z=1) in the mapping's units."""
    values, used = read_slice(path, mapping)
    return Volume(
        array=values[None],
        spacing=(1.0, 1.0, 1.0),
        affine=np.eye(4),
        units=used.units if used else "unit",
        path=str(path),
        meta={"format": Path(path).suffix.lower().lstrip(".")},
    )


class SliceReader(Reader):
    """PNG/TIFF/JPEG slices; a tiled pyramidal TIFF is a slide (:class:`~.wsi.SlideReader`), not a slice."""

    name = "slice"
    label = "PNG/TIFF slice"
    kind = "slice"
    returns = Volume
    suffixes = SLICE_SUFFIXES

    def can_read(self, path: str | Path) -> bool:
        path = Path(path)
        suffix = path.suffix.lower()
        if path.is_dir() or suffix not in SLICE_SUFFIXES:
            return False
        return not (suffix in TIFF_SUFFIXES and is_pyramidal_tiff(path))

    def read(self, path: str | Path, slice_mapping: ValueMapping | None = None, **options: Any) -> Volume:
        return read_slice_volume(path, slice_mapping)


SLICE_READER = SliceReader()
