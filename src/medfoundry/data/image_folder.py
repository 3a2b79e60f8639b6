"""A folder of ordinary image files (PNG/JPEG/TIFF, 8- or 16-bit, grey or RGB) as an image source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medfoundry.config.data import DataConfig
from medfoundry.data.sources import Sample, array_to_chw, list_files, register_source, to_channels


def read_image_file(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG/TIFF into an array scaled to [0, 1] by its storage type (8-bit /255, 16-bit /65535).

    TIFFs go through tifffile (16-bit and multi-sample files that PIL mishandles); the rest through PIL.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(path)
    else:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGB")
            arr = np.asarray(im)
    return scale_by_dtype(arr, str(path))


def scale_by_dtype(arr: np.ndarray, where: str = "") -> np.ndarray:
    """Map integer storage to [0, 1] by the type's range; floats are returned as they are."""
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


class ImageFolderSource:
    """All image files under a folder, recursively, in sorted order."""

    def __init__(self, root: str | Path, extensions: list[str], channels: int) -> None:
        self.files = list_files(root, extensions)
        if not self.files:
            raise FileNotFoundError(
                f"data.root '{root}' holds no files with suffixes {extensions} (set data.extensions?)"
            )
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def __getitem__(self, index: int) -> Sample:
        path = self.files[index]
        image = to_channels(array_to_chw(read_image_file(path)), self.channels, str(path))
        return Sample(image=image, path=str(path))


@register_source("image_folder")
def build_image_folder(cfg: DataConfig) -> ImageFolderSource:
    """``data.kind=image_folder``: every image under ``data.root``."""
    return ImageFolderSource(cfg.root, cfg.extensions, cfg.channels)
