"""A folder of ordinary image files (PNG/JPEG/TIFF, 8- or 16-bit, grey or RGB) as an image source.

What the stored numbers mean is decided the way :mod:`medfoundry.data.readers.slices` records it: a mapping
recorded with the file (PNG text chunk, TIFF description, ``<file>.json`` sidecar) is applied, else the
configured one (``data.slice_slope`` / ``data.slice_intercept``); without either, 8-bit pictures are divided
by 255 and pictures of more than 8 bits per sample are refused unless ``data.unmapped_16bit=full_range``
says they store a [0, 1] picture over the type's full range (then / 65535). The refusal happens when the
source is built (its first file is read) and names the file and the fixes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medfoundry.config.data import DataConfig
from medfoundry.data.readers.base import ReaderError
from medfoundry.data.readers.slices import (
    MAPPING_KEY,
    UnmappedImageError,
    ValueMapping,
    apply_mapping,
    parse_mapping,
    scale_by_dtype,
    sidecar_mapping,
)
from medfoundry.data.sources import Sample, array_to_chw, list_files, register_source, to_channels

__all__ = ["ImageFolderSource", "configured_mapping", "read_image_file", "read_picture", "scale_by_dtype"]


def _load(path: Path) -> tuple[np.ndarray, ValueMapping | None]:
    """Stored pixels and the mapping recorded with the file (embedded, else in its sidecar).

    TIFFs go through tifffile (16-bit and multi-sample files that PIL mishandles); the rest through PIL
    (palette images converted to RGB).
    """
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            arr = tf.asarray()
            embedded = parse_mapping(tf.pages[0].description) if len(tf.pages) else None
    else:
        with Image.open(path) as im:
            im.load()
            embedded = parse_mapping((getattr(im, "text", {}) or {}).get(MAPPING_KEY))
            if im.mode == "P":
                im = im.convert("RGB")
            arr = np.asarray(im)
    return arr, embedded or sidecar_mapping(path)


def read_picture(
    path: str | Path, mapping: ValueMapping | None = None, unmapped_16bit: str = "refuse",
    config_keys: bool = True,
) -> tuple[np.ndarray, ValueMapping | None]:
    """(values float32, mapping used or None) of a PNG/JPEG/TIFF picture (see the module doc for the rules).

    ``mapping`` is the configured mapping for files without a recorded one; ``config_keys`` puts the ``data.*``
    fixes into the refusal's message (off for readers those keys do not reach, e.g. CLIP pairs).
    """
    path = Path(path)
    arr, recorded = _load(path)
    return apply_mapping(arr, path, recorded, mapping, unmapped_16bit, config_keys=config_keys)


def read_image_file(
    path: str | Path, mapping: ValueMapping | None = None, unmapped_16bit: str = "refuse"
) -> np.ndarray:
    """Read a PNG/JPEG/TIFF into float32 values: its recorded (else ``mapping``) value mapping, 8-bit / 255.

    A picture of more than 8 bits per sample with neither mapping raises
    :class:`~medfoundry.data.readers.slices.UnmappedImageError`, unless ``unmapped_16bit="full_range"``
    (then / 65535, exactly as before that rule).
    """
    return read_picture(path, mapping, unmapped_16bit)[0]


def configured_mapping(cfg: DataConfig) -> ValueMapping | None:
    """The ``data.slice_slope`` / ``data.slice_intercept`` mapping for files without a recorded one (None if unset)."""
    if cfg.slice_slope is None and cfg.slice_intercept is None:
        return None
    if cfg.slice_slope is None or cfg.slice_intercept is None:
        raise ValueError("set both data.slice_slope and data.slice_intercept (value = stored * slope + intercept)")
    return ValueMapping(float(cfg.slice_slope), float(cfg.slice_intercept))


def check_first_picture(path: str | Path, mapping: ValueMapping | None, unmapped_16bit: str) -> None:
    """Read one picture to raise :class:`UnmappedImageError` (a user's configuration problem) before training starts.

    Other failures (a corrupt file) are left to the training loop, which skips and counts unreadable samples.
    """
    try:
        read_picture(path, mapping, unmapped_16bit)
    except UnmappedImageError:
        raise
    except (ReaderError, OSError, ValueError):
        return


class ImageFolderSource:
    """All image files under a folder, recursively, in sorted order (values by the module doc's rules)."""

    def __init__(self, root: str | Path, extensions: list[str], channels: int, mapping: ValueMapping | None = None,
                 unmapped_16bit: str = "refuse") -> None:
        self.files = list_files(root, extensions)
        if not self.files:
            raise FileNotFoundError(
                f"data.root '{root}' holds no files with suffixes {extensions} (set data.extensions?)"
            )
        self.channels = channels
        self.mapping = mapping
        self.unmapped_16bit = unmapped_16bit
        check_first_picture(self.files[0], mapping, unmapped_16bit)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def __getitem__(self, index: int) -> Sample:
        path = self.files[index]
        values = read_image_file(path, self.mapping, self.unmapped_16bit)
        image = to_channels(array_to_chw(values), self.channels, str(path))
        return Sample(image=image, path=str(path))


@register_source("image_folder")
def build_image_folder(cfg: DataConfig) -> ImageFolderSource:
    """``data.kind=image_folder``: every image under ``data.root``."""
    return ImageFolderSource(cfg.root, cfg.extensions, cfg.channels, configured_mapping(cfg), cfg.unmapped_16bit)
