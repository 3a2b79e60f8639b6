"""MedMNIST ``.npz`` files: the published train/val/test image and label arrays, 2-D and 3-D, multi-label.

What this reader relies on (MedMNIST v3.0.2, github.com/MedMNIST/MedMNIST: ``README.md`` "Data Files",
``medmnist/dataset.py``, ``medmnist/info.py``, ``medmnist/evaluator.py``; the files are distributed on Zenodo,
https://doi.org/10.5281/zenodo.10519652):

* one ``.npz`` per subset and size (``chestmnist.npz`` at 28 px, ``chestmnist_64.npz``, ``_128``, ``_224``; 3-D
  subsets at 28 and ``_64``) holding exactly six arrays: ``train_images``, ``train_labels``, ``val_images``,
  ``val_labels``, ``test_images``, ``test_labels``; ``dataset.py`` reads them with ``np.load`` (no pickles) and
  takes the splits as stored: the split is the file's, never drawn again;
* images: ``(N, H, W)`` for grey 2-D subsets, ``(N, H, W, 3)`` for RGB ones, ``(N, D, H, W)`` for 3-D ones
  (``(N, 28, 28, 28)`` / 64); stored as 0-255 integers (``dataset.py`` hands 2-D rows to ``PIL.Image.fromarray``
  and divides 3-D rows by 255 to give [0, 1]); this reader gives every image as ``value / 255``;
* labels: ``(N, L)``; ``L = 1`` for binary, multi-class and ordinal subsets (values ``0 .. C``), ``L > 1`` for a
  multi-label one (ChestMNIST: ``L = 14``, task ``"multi-label, binary-class"``, values 0/1, label ``"0"`` ..
  ``"13"`` = atelectasis ... hernia in ``info.py``);
* ``evaluator.py`` scores a multi-label subset by the mean over labels of each label's ROC AUC, a multi-class
  one by the mean one-vs-rest AUC and accuracy of the arg-max.

The layout is checked from the arrays' ``.npy`` headers when the file is opened (six keys, dimensions, one
label row per image, the same image and label shape in every split), before any image is decoded; a file that
breaks it raises :class:`~medfoundry.data.readers.base.ReaderError` naming the file and the key. Arrays are
decoded on first use and kept (the published files are zip-compressed, so rows cannot be read one at a time);
:func:`open_medmnist` keeps the last files opened, so that reading one image at a time costs one decode per file.
"""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.data.readers.base import ReaderError
from medfoundry.data.readers.interface import Reader

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{split}_{part}" for split in SPLITS for part in ("images", "labels"))
ZENODO = "https://doi.org/10.5281/zenodo.10519652"
_FIX = f"write it in MedMNIST's layout or download it again ({ZENODO})"


class MedMNISTFile:
    """One MedMNIST ``.npz``: its layout (checked on opening) and its images and labels by split and row.

    ``volumetric`` is true for ``(N, D, H, W)`` images; ``channels`` is 3 for RGB rows, else 1;
    ``image_shape`` is one row's shape; ``n_labels`` is ``L`` of the ``(N, L)`` labels (``multi_label`` when > 1).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.shapes, self.dtypes = _headers(self.path)
        missing = [k for k in KEYS if k not in self.shapes]
        if missing:
            raise ReaderError(f"{self.path}: no key '{missing[0]}' (a MedMNIST .npz holds {', '.join(KEYS)}; "
                              f"keys found: {sorted(self.shapes) or 'none'}); {_FIX}")
        first = self.shapes["train_images"]
        for split in SPLITS:
            images, labels = self.shapes[f"{split}_images"], self.shapes[f"{split}_labels"]
            if len(images) not in (3, 4):
                raise ReaderError(f"{self.path}: key '{split}_images' has shape {images}; expected (N, H, W) grey, "
                                  f"(N, H, W, 3) RGB or (N, D, H, W) volumes; {_FIX}")
            if not np.issubdtype(self.dtypes[f"{split}_images"], np.integer):
                raise ReaderError(f"{self.path}: key '{split}_images' has dtype {self.dtypes[f'{split}_images']}; "
                                  f"MedMNIST images are 0-255 integers (uint8); {_FIX}")
            if len(labels) not in (1, 2) or labels[0] != images[0]:
                raise ReaderError(f"{self.path}: key '{split}_labels' has shape {labels} for {images[0]} images in "
                                  f"'{split}_images'; expected one (N, L) label row per image; {_FIX}")
            if images[1:] != first[1:]:
                raise ReaderError(f"{self.path}: key '{split}_images' holds rows of shape {images[1:]} but "
                                  f"'train_images' rows of shape {first[1:]}; every split must have one image size")
            if _n_labels(labels) != _n_labels(self.shapes["train_labels"]):
                raise ReaderError(f"{self.path}: key '{split}_labels' has {_n_labels(labels)} label(s) per image but "
                                  f"'train_labels' {_n_labels(self.shapes['train_labels'])}; {_FIX}")
        self.image_shape: tuple[int, ...] = tuple(first[1:])
        self.channels = 3 if len(first) == 4 and first[-1] == 3 else 1
        self.volumetric = len(first) == 4 and first[-1] not in (1, 3)
        self.n_labels = _n_labels(self.shapes["train_labels"])
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def multi_label(self) -> bool:
        """Whether the labels are ``(N, L)`` with ``L > 1`` (several 0/1 labels per image, e.g. ChestMNIST)."""
        return self.n_labels > 1

    def size(self, split: str) -> int:
        """Number of images of ``split``."""
        return int(self.shapes[f"{_split(split, self.path)}_images"][0])

    def __len__(self) -> int:
        return sum(self.size(s) for s in SPLITS)

    def depth(self) -> int:
        """Slices along the first image axis of a volume (1 for 2-D images)."""
        return int(self.image_shape[0]) if self.volumetric else 1

    def labels(self, split: str) -> np.ndarray:
        """The ``(N, L)`` int64 labels of ``split``; multi-label values must be 0/1, single labels non-negative."""
        key = f"{_split(split, self.path)}_labels"
        raw = self._array(key)
        values = raw.reshape(raw.shape[0], -1)
        if not np.issubdtype(values.dtype, np.integer) and not (
                np.all(np.isfinite(values)) and np.all(values == np.round(values))):
            raise ReaderError(f"{self.path}: key '{key}' holds non-integer labels; MedMNIST labels are class "
                              f"indices (or 0/1 per label); {_FIX}")
        out = values.astype(np.int64)
        if self.multi_label and not np.isin(out, (0, 1)).all():
            raise ReaderError(f"{self.path}: key '{key}' holds values other than 0/1 in a multi-label "
                              f"(N, {self.n_labels}) array; {_FIX}")
        if out.size and out.min() < 0:
            raise ReaderError(f"{self.path}: key '{key}' holds negative labels; {_FIX}")
        return out

    def images(self, split: str) -> np.ndarray:
        """The stored image array of ``split`` (decoded once, then kept); values are checked to lie in 0-255."""
        key = f"{_split(split, self.path)}_images"
        if key not in self._arrays:
            arr = self._array(key)
            if arr.dtype != np.uint8 and arr.size and (arr.min() < 0 or arr.max() > 255):
                del self._arrays[key]
                raise ReaderError(f"{self.path}: key '{key}' holds values outside 0-255 "
                                  f"({arr.min()} .. {arr.max()}); MedMNIST images are uint8; {_FIX}")
        return self._arrays[key]

    def image(self, split: str, index: int) -> np.ndarray:
        """Row ``index`` of ``split`` as float32 in [0, 1]: ``(H, W)``, ``(H, W, 3)`` or ``(D, H, W)``."""
        arr = self.images(split)
        if not 0 <= index < arr.shape[0]:
            raise IndexError(f"{self.path}: row {index} out of range for the {arr.shape[0]} {split} images")
        return arr[index].astype(np.float32) / 255.0

    def central_slice(self, split: str, index: int, axis: int, slices: int = 1, stride: int = 1) -> np.ndarray:
        """A volume's central slice across ``axis`` (0, 1 or 2 of its ``(D, H, W)``), with ``slices // 2``
        neighbours on each side ``stride`` apart (edges replicated), as float32 ``(slices, ., .)`` in [0, 1]."""
        if not self.volumetric:
            raise ValueError(f"{self.path}: 2-D images have no slices")
        vol = self.image(split, index)
        if axis not in (0, 1, 2):
            raise ValueError(f"axis {axis} is not 0, 1 or 2")
        n = vol.shape[axis]
        half = slices // 2
        idx = [min(max(n // 2 + (k - half) * stride, 0), n - 1) for k in range(slices)]
        return np.ascontiguousarray(np.moveaxis(np.take(vol, idx, axis=axis), axis, 0))

    def describe(self) -> str:
        """One line: image shape, channels, label count and split sizes (for logs and messages)."""
        kind = f"{'x'.join(map(str, self.image_shape))} volumes" if self.volumetric else (
            f"{self.image_shape[0]}x{self.image_shape[1]} {'RGB' if self.channels == 3 else 'grey'} images")
        labels = f"{self.n_labels} labels (multi-label)" if self.multi_label else "one label"
        sizes = ", ".join(f"{s} {self.size(s)}" for s in SPLITS)
        return f"{Path(self.path).name}: {kind}, {labels}; {sizes}"

    def _array(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    self._arrays[key] = data[key]
            except ValueError as err:
                raise ReaderError(f"{self.path}: key '{key}' cannot be read without unpickling ({err}); "
                                  f"MedMNIST arrays are plain numbers; {_FIX}") from err
            except (OSError, zipfile.BadZipFile, EOFError) as err:
                raise ReaderError(f"{self.path}: key '{key}' is corrupt or truncated ({type(err).__name__}: "
                                  f"{err}); {_FIX}") from err
        return self._arrays[key]


def _split(split: str, path: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"{path}: split '{split}' is not one of {SPLITS}")
    return split


def _n_labels(shape: tuple[int, ...]) -> int:
    return int(shape[1]) if len(shape) == 2 else 1


def _headers(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, np.dtype]]:
    """Shape and dtype of every array of the ``.npz`` at ``path``, from the ``.npy`` headers (nothing decoded)."""
    if not os.path.exists(path):
        raise ReaderError(f"{path}: no such file")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(fh)
                shapes[name[: -len(".npy")]] = tuple(int(s) for s in shape)
                dtypes[name[: -len(".npy")]] = dtype
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise ReaderError(f"{path}: corrupt or unreadable .npz ({type(err).__name__}: {err}); {_FIX}") from err
    return shapes, dtypes


_OPEN: OrderedDict[tuple[str, int, int], MedMNISTFile] = OrderedDict()
_KEEP = 2  # files kept decoded per process (a labelled set and a training file)


def open_medmnist(path: str | Path) -> MedMNISTFile:
    """The :class:`MedMNISTFile` at ``path``, shared by every caller while the file is unchanged (same size and
    modification time), so that reading its images one at a time decodes each array once."""
    p = str(Path(path).resolve())
    try:
        st = os.stat(p)
    except OSError:
        raise ReaderError(f"{path}: no such file") from None
    key = (p, st.st_size, st.st_mtime_ns)
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    opened = MedMNISTFile(p)
    _OPEN[key] = opened
    while len(_OPEN) > _KEEP:
        _OPEN.popitem(last=False)
    return opened


class MedMNISTReader(Reader):
    """MedMNIST ``.npz`` files; read by ``data.kind=medmnist`` and as a labelled set (``medfoundry eval --data``),
    not converted by prepare."""

    name = "medmnist"
    label = "MedMNIST .npz"
    kind = "images"
    returns = MedMNISTFile
    suffixes = (".npz",)

    def read(self, path: str | Path, **options: Any) -> MedMNISTFile:
        return open_medmnist(path)


MEDMNIST_READER = MedMNISTReader()
